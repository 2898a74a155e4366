"""`cascade serve`: a bundle behind HTTP JSON, on Starlette + uvicorn.

Why this stack: Starlette is a small, well-kept ASGI toolkit (the core under FastAPI) and uvicorn
its standard server; we validate requests ourselves (``CascadeService.parse``) so every error
names the schema's own field, which a generic model validator would not. The cascade runs in
Starlette's thread pool (onnxruntime, faiss and numpy release the GIL), so a slow request does
not block the event loop.

- ``POST /recommend``: one request object -> ``{items, scores, timings_ms, counted}``; or
  ``{"requests": [...]}`` -> ``{"results": [...]}`` in one cascade run.
- ``POST /events``: ``{"events": [{"item_id", "ts", "kind"}, ...]}`` -> ``{"accepted": n}``, once
  the events are durable (``export.online``); a bundle whose stages read an online feature.
- ``GET /features?item_id=..&ts=..``: one item's live counters at ``ts`` (the server's clock
  without one), for debugging and tests.
- ``GET /health``: ``{"status": "ok", ...}`` once the bundle is loaded.
- ``GET /metrics``: requests, errors by status, counted unknown ids / cut histories, and latency
  percentiles per stage over the last ``WINDOW`` requests.

A bad request gets a 4xx with ``{"error", "field"}``; an unexpected failure a 500 with the same
shape, counted, and the server stays up.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections import Counter, deque
from typing import Callable

import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from export.online import open_journal
from export.runtime import CascadeService, RequestError

SERVE_ENV = "CASCADE_SERVE"  # `cascade serve --workers N` hands each worker its settings here
WINDOW = 10_000  # latencies kept for the percentiles
MAX_BODY = 1 << 20  # bytes


class Metrics:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests = 0
        self.errors: Counter[str] = Counter()
        self.events = 0
        self.latency: dict[str, deque] = {}

    def observe(self, timings: dict[str, float], n: int) -> None:
        with self.lock:
            self.requests += n
            for stage, ms in timings.items():
                self.latency.setdefault(stage, deque(maxlen=WINDOW)).append(ms)

    def count_events(self, n: int) -> None:
        with self.lock:
            self.events += n

    def error(self, status: int) -> None:
        with self.lock:
            self.errors[str(status)] += 1

    def snapshot(self, service: CascadeService) -> dict:
        with self.lock:
            latency = {s: {f"p{q}": float(np.percentile(list(v), q)) for q in (50, 95, 99)} | {"count": len(v)} for s, v in self.latency.items()}
            return {"requests": self.requests, "events": self.events, "errors": dict(self.errors), "counted": dict(service.counts), "latency_ms": latency}


def make_app(service: CascadeService) -> Starlette:
    metrics = Metrics()

    def refuse(status: int, message: str, field: str | None) -> JSONResponse:
        metrics.error(status)
        return JSONResponse({"error": message, "field": field}, status_code=status)

    async def read_json(request: Request) -> tuple[object, JSONResponse | None]:
        body = await request.body()
        if len(body) > MAX_BODY:
            return None, refuse(413, f"body of {len(body)} bytes, at most {MAX_BODY}", None)
        try:
            return json.loads(body), None
        except (ValueError, UnicodeDecodeError) as e:
            return None, refuse(400, f"body is not valid JSON: {e}", None)

    async def recommend(request: Request) -> JSONResponse:
        payload, refused = await read_json(request)
        if refused is not None:
            return refused
        batch = isinstance(payload, dict) and "requests" in payload
        try:
            if batch:
                if set(payload) != {"requests"}:
                    raise RequestError(sorted(set(payload) - {"requests"})[0], "a batch body holds only 'requests'")
                results = await run_in_threadpool(service.recommend_batch, payload["requests"])
            else:
                results = [await run_in_threadpool(service.recommend, payload)]
        except RequestError as e:
            return refuse(422, str(e), e.field)
        except Exception as e:  # noqa: BLE001  a failure inside the cascade must not take the server down
            return refuse(500, f"{type(e).__name__}: {e}", None)
        metrics.observe(results[0]["timings_ms"], len(results))
        return JSONResponse({"results": results} if batch else results[0])

    async def events(request: Request) -> JSONResponse:
        payload, refused = await read_json(request)
        if refused is not None:
            return refused
        try:
            accepted = await run_in_threadpool(service.ingest, payload)
        except RequestError as e:
            return refuse(422, str(e), e.field)
        except Exception as e:  # noqa: BLE001  a journal that fails refuses the batch, the server stays up
            return refuse(500, f"{type(e).__name__}: {e}", None)
        metrics.count_events(accepted)
        return JSONResponse({"accepted": accepted})

    async def features(request: Request) -> JSONResponse:
        query = request.query_params
        try:
            item_id = _number(query.get("item_id"), "item_id")
            ts = _number(query.get("ts"), "ts") if "ts" in query else None
            return JSONResponse(await run_in_threadpool(service.features, item_id, ts))
        except RequestError as e:
            return refuse(422, str(e), e.field)

    async def health(request: Request) -> JSONResponse:
        m = service.manifest
        online = service.online and {"features": m["online"], "events": len(service.online.live), "durable": service.online.journal is not None}
        return JSONResponse({"status": "ok", "pid": os.getpid(), "dataset": m["dataset"], "items": m["items"], "stages": {s["name"]: {"model": s["model"], "quota": s["quota"]} for s in m["stages"]}, "online": online or None})

    async def metrics_route(request: Request) -> JSONResponse:
        return JSONResponse(metrics.snapshot(service))

    routes = [Route("/recommend", recommend, methods=["POST"]), Route("/events", events, methods=["POST"]), Route("/features", features), Route("/health", health), Route("/metrics", metrics_route)]
    return Starlette(routes=routes)


def _number(text: str | None, field: str) -> int | float:
    """A query parameter that must be a number (``/features?item_id=3&ts=...``)."""
    if text is None:
        raise RequestError(field, "missing (GET /features?item_id=ID&ts=SECONDS)")
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise RequestError(field, f"expected a number, got '{text[:40]}'") from None


def service_from(settings: dict) -> CascadeService:
    """The service ``cascade serve`` describes: ``{bundle, threads, state, store}``."""
    journal = open_journal(settings.get("state"), settings.get("store"))
    return CascadeService(settings["bundle"], threads=settings.get("threads", 1), journal=journal)


def app_from_env() -> Starlette:
    """One worker's app (uvicorn's factory under ``--workers``): its own service, reading the
    shared journal."""
    return make_app(service_from(json.loads(os.environ[SERVE_ENV])))


def serve_in_thread(service: CascadeService) -> tuple[str, Callable[[], None]]:
    """``service`` behind uvicorn on a free 127.0.0.1 port in a daemon thread, once it listens:
    (its base URL, a function that stops it). What `cascade run` replays through, and tests use."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(make_app(service), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the server did not start listening within 30 s")
        time.sleep(0.02)

    def stop() -> None:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()

    return f"http://127.0.0.1:{sock.getsockname()[1]}", stop
