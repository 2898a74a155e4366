"""`cascade serve`: a bundle behind HTTP JSON, on Starlette + uvicorn.

Why this stack: Starlette is a small, well-kept ASGI toolkit (the core under FastAPI) and uvicorn
its standard server; we validate requests ourselves (``CascadeService.parse``) so every error
names the schema's own field, which a generic model validator would not. The cascade runs in
Starlette's thread pool (onnxruntime, faiss and numpy release the GIL), so a slow request does
not block the event loop.

- ``POST /recommend``: one request object -> ``{items, scores, timings_ms, counted}``; or
  ``{"requests": [...]}`` (at most ``Limits.max_batch``) -> ``{"results": [...]}``.
- ``POST /events``: ``{"events": [{"item_id", "ts", "kind"}, ...]}`` -> ``{"accepted": n}``, once
  the events are durable (``export.online``); a bundle whose stages read an online feature.
- ``GET /features?item_id=..&ts=..``: one item's live counters at ``ts`` (the server's clock
  without one), for debugging and tests.
- ``GET /health``: the bundle, the request contract (``CascadeService.contract``) and the limits.
- ``GET /metrics``: Prometheus text (``ServerMetrics``); ``GET /metrics.json`` a summary.
- ``POST /admin/reload`` ``{"bundle": DIR}``: verify a bundle and swap it in (``Serving``); from
  loopback, or with the ``--admin-token``.

Dynamic batching (``Batcher``): requests that arrive while the cascade is busy wait in a bounded
queue and run together as its next batch; one that arrives when it is idle runs at once, so a
lone client waits for nobody. Limits (``export.http``) hold before a client's bytes cost memory.
A bad request gets a 4xx with ``{"error", "field"}``; an unexpected failure a 500 with the same
shape; every response is counted by route and status, and the server stays up.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import http.client
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter, deque
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import numpy as np
import prometheus_client as prom
import uvicorn
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from export.bundle import BundleError
from export.http import GuardedHttpTools, Limits, Refused, guarded_protocol, limits_from, parse_json, read_body
from export.runtime import CascadeService, ParsedRequest, RequestError
from export.supervisor import SERVE_ENV, service_from, write_settings

WINDOW = 10_000  # latencies kept for /metrics.json's percentiles
CONCURRENT_BATCHES = os.cpu_count() or 1  # cascade batches at once, each single-threaded: one a core (3 on 2 cores: slower)
ROUTES = ("/recommend", "/events", "/features", "/health", "/metrics", "/metrics.json", "/admin/reload")
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
log = logging.getLogger("cascade.serve")
prom.disable_created_metrics()  # the *_created samples: noise on an operator's dashboards


class ServerMetrics:
    """The server's Prometheus metrics (its own registry; across ``--workers``, summed by
    prometheus_client's multiprocess mode) and the JSON summary of this process."""

    def __init__(self) -> None:
        r = self.registry = prom.CollectorRegistry()
        multi = "PROMETHEUS_MULTIPROC_DIR" in os.environ
        self.responses = prom.Counter("cascade_http_responses", "HTTP responses by route and status, refusals included", ["route", "status"], registry=r)
        self.recommendations = prom.Counter("cascade_recommendations", "requests served, each request of a batch counted", registry=r)
        self.stage_seconds = prom.Histogram("cascade_stage_seconds", "seconds per request and stage (queue: waiting for its batch; total: the cascade)", ["stage"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = prom.Histogram("cascade_batch_size", "requests per cascade run", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), registry=r)
        self.counted = prom.Counter("cascade_counted", "what requests held that the cascade could not read: unknown ids, missing fields, cut histories", ["what"], registry=r)
        self.events = prom.Counter("cascade_events", "online events accepted (durable)", registry=r)
        self.bundle = prom.Gauge("cascade_bundle_info", "the bundle served, by its manifest's sha256", ["sha256", "dataset"], registry=r, multiprocess_mode="liveall")
        self.lock = threading.Lock()
        self.requests, self.events_n = 0, 0
        self.errors: Counter[str] = Counter()
        self.latency: dict[str, deque] = {}
        self.counts: Counter[str] = Counter()
        self.multiprocess = multi

    def response(self, route: str, status: int) -> None:
        self.responses.labels(route, str(status)).inc()
        if status >= 400:
            with self.lock:
                self.errors[str(status)] += 1

    def served(self, results: list[dict[str, Any]]) -> None:
        self.recommendations.inc(len(results))
        with self.lock:
            self.requests += len(results)
            for r in results:
                for stage, ms in r["timings_ms"].items():
                    self.stage_seconds.labels(stage).observe(ms / 1000)
                    self.latency.setdefault(stage, deque(maxlen=WINDOW)).append(ms)
                for what, n in r["counted"].items():
                    self.counted.labels(what).inc(n)
                    self.counts[what] += n

    def accepted(self, n: int) -> None:
        self.events.inc(n)
        with self.lock:
            self.events_n += n

    def serving(self, service: CascadeService, previous: CascadeService | None = None) -> None:
        if previous is not None:
            self.bundle.remove(previous.sha256, previous.manifest["dataset"])
        self.bundle.labels(service.sha256, service.manifest["dataset"]).set(1)

    def text(self) -> bytes:
        if not self.multiprocess:
            return prom.generate_latest(self.registry)
        merged = prom.CollectorRegistry()
        MultiProcessCollector(merged)
        return prom.generate_latest(merged)

    def summary(self) -> dict[str, Any]:
        with self.lock:
            latency = {s: {f"p{q}": float(np.percentile(list(v), q)) for q in (50, 95, 99)} | {"count": len(v)} for s, v in self.latency.items()}
            return {"pid": os.getpid(), "requests": self.requests, "events": self.events_n, "errors": dict(self.errors), "counted": dict(self.counts), "latency_ms": latency}


class Batcher:
    """Requests for one service, run as few cascade batches as the load allows: a submission
    that finds a free runner starts at once; ones that arrive while ``CONCURRENT_BATCHES`` run
    queue (at most ``limits.max_queue`` requests, then 503) and go together, up to
    ``limits.max_batch`` requests, as the next batch. A request's result does not depend on its
    batch (``tests/export/test_hostile.py`` checks it)."""

    def __init__(self, service: CascadeService, limits: Limits, metrics: ServerMetrics):
        self.service, self.limits, self.metrics = service, limits, metrics
        self.pending: deque[tuple[list[ParsedRequest], asyncio.Future, float]] = deque()
        self.waiting = self.running = 0
        self.tasks: set[asyncio.Task] = set()
        self.idle = asyncio.Event()
        self.idle.set()

    async def submit(self, parsed: list[ParsedRequest]) -> list[dict[str, Any]]:
        if self.waiting + len(parsed) > self.limits.max_queue:
            raise Refused(503, f"{self.waiting} requests are waiting for the cascade, at most {self.limits.max_queue}; retry shortly")
        future = asyncio.get_running_loop().create_future()
        self.pending.append((parsed, future, time.perf_counter()))
        self.waiting += len(parsed)
        self.idle.clear()
        self._dispatch()
        return await future

    def _dispatch(self) -> None:
        while self.pending and self.running < CONCURRENT_BATCHES:
            taken = [self.pending.popleft()]
            n = len(taken[0][0])
            while self.pending and n + len(self.pending[0][0]) <= self.limits.max_batch:
                taken.append(self.pending.popleft())
                n += len(taken[-1][0])
            self.waiting -= n
            self.running += 1
            task = asyncio.create_task(self._run(taken))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _run(self, taken: list[tuple[list[ParsedRequest], asyncio.Future, float]]) -> None:
        start = time.perf_counter()
        try:
            results = await run_in_threadpool(self.service.run_parsed, [p for parsed, _, _ in taken for p in parsed])
            self.metrics.batch_size.observe(len(results))
            at = 0
            for parsed, future, queued in taken:
                mine, at = results[at : at + len(parsed)], at + len(parsed)
                for r in mine:
                    r["timings_ms"] = {"queue": round((start - queued) * 1000, 3), **r["timings_ms"]}
                if not future.done():
                    future.set_result(mine)
        except Exception as e:  # noqa: BLE001  each request of the batch hears of it
            for _, future, _ in taken:
                if not future.done():
                    future.set_exception(e)
        finally:
            self.running -= 1
            self._dispatch()
            if not self.running and not self.pending:
                self.idle.set()

    async def drain(self) -> None:
        await self.idle.wait()


class Serving:
    """What the app serves now: a service and its batcher, swapped whole by ``reload``.
    Requests keep the pair they started with, so those in flight finish on the old bundle,
    which is closed once its batcher is idle."""

    def __init__(self, service: CascadeService, limits: Limits, metrics: ServerMetrics, settings: dict[str, Any]):
        self.limits, self.metrics, self.settings = limits, metrics, settings
        self.service = service
        self.batcher: Batcher | None = None  # made in the event loop, on first use
        self.reloading = asyncio.Lock()
        metrics.serving(service)

    def current(self) -> tuple[CascadeService, Batcher]:
        if self.batcher is None or self.batcher.service is not self.service:
            self.batcher = Batcher(self.service, self.limits, self.metrics)
        return self.service, self.batcher

    def load(self, bundle: str) -> CascadeService:
        """A bundle verified (every file's sha256, its online features compatible with the counters
        served) and run once on an empty request: ``BundleError`` / an exception otherwise."""
        old = self.service
        new = CascadeService(bundle, threads=self.settings.get("threads", 1), online=old.online)
        try:
            new.run_parsed([new.parse({})])
        except Exception:
            new.close()
            raise
        return new

    async def reload(self, bundle: str) -> dict[str, Any]:
        async with self.reloading:
            new = await run_in_threadpool(self.load, bundle)
            old, old_batcher = self.current()
            new.owns_online, old.owns_online = old.owns_online, False  # the counters move on
            self.service, self.settings = new, self.settings | {"bundle": str(bundle)}
            self.metrics.serving(new, old)
            asyncio.get_running_loop().create_task(self._retire(old, old_batcher))
            return {"bundle": str(bundle), "sha256": new.sha256, "previous": old.sha256}

    async def _retire(self, old: CascadeService, batcher: Batcher) -> None:
        await batcher.drain()
        old.close()


def _refusal(status: int, message: str, field: str | None = None, close: bool = False) -> JSONResponse:
    headers = {"connection": "close"} if close else None  # the rest of an unread body is never read
    return JSONResponse({"error": message, "field": field}, status_code=status, headers=headers)


def _guarded(handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """``handler`` with its refusals as JSON: ``Refused`` and ``RequestError`` as 4xx/503, and
    any other failure as a 500 with one log line, never a traceback per hit."""

    async def guarded(request: Request) -> Response:
        try:
            return await handler(request)
        except Refused as e:
            return _refusal(e.status, e.message, e.field, close=e.status in (408, 413))
        except RequestError as e:
            return _refusal(422, str(e), e.field)
        except Exception as e:  # noqa: BLE001  a failure inside the cascade must not take the server down
            log.error("%s %s: %s: %s", request.method, request.url.path, type(e).__name__, e)
            return _refusal(500, f"{type(e).__name__}: {e}")

    return guarded


class _Counted:
    """The ASGI app with every response counted by route (known routes only) and status."""

    def __init__(self, app: Starlette, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in ROUTES else "(other)"

        async def counted(message: dict) -> None:
            if message["type"] == "http.response.start":
                self.metrics.response(route, message["status"])
            await send(message)

        await self.app(scope, receive, counted)


def make_app(service: CascadeService, limits: Limits = Limits(), metrics: ServerMetrics | None = None, settings: dict[str, Any] | None = None) -> _Counted:
    """The ASGI app serving ``service``. ``settings``: what ``cascade serve`` was given (the
    admin token; under ``--workers``, the file each worker reads, which a reload rewrites)."""
    metrics = metrics or ServerMetrics()
    settings = settings or {}
    serving = Serving(service, limits, metrics, settings)

    async def read_json(request: Request) -> Any:
        return parse_json(await read_body(request, limits), limits)

    async def recommend(request: Request) -> JSONResponse:
        payload = await read_json(request)
        service, batcher = serving.current()
        if isinstance(payload, dict) and "requests" in payload:
            if set(payload) != {"requests"}:
                raise RequestError(sorted(set(payload) - {"requests"})[0], "a batch body holds only 'requests'")
            if isinstance(payload["requests"], list) and len(payload["requests"]) > limits.max_batch:
                raise Refused(413, f"a batch of {len(payload['requests'])} requests, at most {limits.max_batch} (--max-batch)", "requests")
            results = await batcher.submit(service.parse_batch(payload["requests"]))
            metrics.served(results)
            return JSONResponse({"results": results})
        results = await batcher.submit([service.parse(payload)])
        metrics.served(results)
        return JSONResponse(results[0])

    async def events(request: Request) -> JSONResponse:
        payload = await read_json(request)
        accepted = await run_in_threadpool(serving.service.ingest, payload)
        metrics.accepted(accepted)
        return JSONResponse({"accepted": accepted})

    async def features(request: Request) -> JSONResponse:
        query = request.query_params
        item_id = _number(query.get("item_id"), "item_id")
        ts = _number(query.get("ts"), "ts") if "ts" in query else None
        return JSONResponse(await run_in_threadpool(serving.service.features, item_id, ts))

    async def health(request: Request) -> JSONResponse:
        s = serving.service
        m = s.manifest
        online = s.online and {"features": m["online"], "events": len(s.online.live), "durable": s.online.journal is not None}
        return JSONResponse(
            {
                "status": "ok",
                "pid": os.getpid(),
                "bundle": {"path": str(s.root), "sha256": s.sha256},
                "dataset": m["dataset"],
                "items": m["items"],
                "stages": {st["name"]: {"model": st["model"], "quota": st["quota"]} for st in m["stages"]},
                "request": s.contract(),
                "limits": limits.describe(),
                "online": online or None,
            }
        )

    async def prometheus(request: Request) -> Response:
        return Response(metrics.text(), media_type=prom.CONTENT_TYPE_LATEST)

    async def metrics_json(request: Request) -> JSONResponse:
        return JSONResponse(metrics.summary())

    async def reload(request: Request) -> JSONResponse:
        _authorise(request, settings.get("admin_token"))
        payload = await read_json(request)
        if not isinstance(payload, dict) or not isinstance(payload.get("bundle"), str) or set(payload) != {"bundle"}:
            raise RequestError("bundle", 'expected {"bundle": "DIR"}, a bundle written by `cascade export`')
        try:
            if settings.get("file"):  # --workers: this worker checks it; the supervisor replaces each worker
                await run_in_threadpool(lambda: serving.load(payload["bundle"]).close())
                write_settings(Path(settings["file"]), json.loads(Path(settings["file"]).read_text()) | {"bundle": payload["bundle"]})
                os.kill(os.getppid(), signal.SIGHUP)
                return JSONResponse({"bundle": payload["bundle"], "workers": "each replaced in turn (uvicorn starts the new one before it stops the old)"}, status_code=202)
            return JSONResponse(await serving.reload(payload["bundle"]))
        except (BundleError, ValueError, OSError) as e:
            raise RequestError("bundle", f"refused, the served bundle stays: {e}") from None

    routes = [
        Route("/recommend", _guarded(recommend), methods=["POST"]),
        Route("/events", _guarded(events), methods=["POST"]),
        Route("/features", _guarded(features)),
        Route("/health", _guarded(health)),
        Route("/metrics", _guarded(prometheus)),
        Route("/metrics.json", _guarded(metrics_json)),
        Route("/admin/reload", _guarded(reload), methods=["POST"]),
    ]
    async def not_routed(request: Request, exc: Exception) -> JSONResponse:
        status = getattr(exc, "status_code", 404)
        return _refusal(status, f"{request.method} {request.url.path[:80]}: {'no such route' if status == 404 else 'method not allowed'} (routes: {', '.join(ROUTES)})")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        serving.service.close()
        if metrics.multiprocess:  # this worker's gauges leave the sum (its counters stay)
            mark_process_dead(os.getpid())

    app = Starlette(routes=routes, exception_handlers={404: not_routed, 405: not_routed}, lifespan=lifespan)
    app.state.serving = serving
    return _Counted(app, metrics)


def _authorise(request: Request, token: str | None) -> None:
    """Admin routes: a client on loopback, or one that shows the token."""
    if token:
        given = request.headers.get("authorization", "").removeprefix("Bearer ")
        if hmac.compare_digest(given.encode(), token.encode()):
            return
    elif request.client is not None and request.client.host in ("127.0.0.1", "::1"):
        return
    raise Refused(403, "admin routes answer loopback clients, or ones that send 'Authorization: Bearer TOKEN' (--admin-token)")


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


def uvicorn_config(app: Any, limits: Limits, metrics: ServerMetrics, **kwargs: Any) -> uvicorn.Config:
    """uvicorn with the header limits and timeouts of ``limits`` (``export.http``)."""
    protocol = guarded_protocol(limits, metrics.response)
    return uvicorn.Config(app, http=protocol, timeout_keep_alive=limits.idle_timeout_s, log_level="warning", **kwargs)


def app_from_env() -> _Counted:
    """One worker's app (uvicorn's factory under ``--workers``): its own service, reading the
    shared journal and the settings file a reload rewrites."""
    path = Path(os.environ[SERVE_ENV])
    settings = json.loads(path.read_text()) | {"file": str(path)}
    limits, metrics = limits_from(settings), ServerMetrics()
    # uvicorn imports the worker's protocol by name: its limits are set on the class itself
    GuardedHttpTools.limits, GuardedHttpTools.refused = limits, staticmethod(metrics.response)
    return make_app(service_from(settings), limits, metrics, settings)


def serve_in_thread(service: CascadeService, limits: Limits = Limits(), settings: dict[str, Any] | None = None) -> tuple[str, Callable[[], None]]:
    """``service`` behind uvicorn on a free 127.0.0.1 port in a daemon thread, once it listens:
    (its base URL, a function that stops it). What `cascade run` replays through, and tests use."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    metrics = ServerMetrics()
    server = uvicorn.Server(uvicorn_config(make_app(service, limits, metrics, settings), limits, metrics))
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


def start_subprocess(bundle: str | Path, *options: str, cwd: str | Path | None = None, timeout: float = 120) -> tuple[subprocess.Popen, int]:
    """`cascade serve BUNDLE OPTIONS` in a child process on a free 127.0.0.1 port (the tree at
    ``cwd`` first on its path, when given), once it answers ``/health``: (the process, its port).
    Stop it with ``stop_subprocess``."""
    return start_subprocesses([bundle], *options, cwd=cwd, timeout=timeout)[0]


def start_subprocesses(bundles: list[str | Path], *options: str, cwd: str | Path | None = None, timeout: float = 120) -> list[tuple[subprocess.Popen, int]]:
    """``start_subprocess`` for several bundles, started together (their imports overlap)."""
    env = {**os.environ} | ({"PYTHONPATH": str(cwd)} if cwd is not None else {})
    started = []
    try:
        for bundle in bundles:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            started.append((subprocess.Popen([sys.executable, "-m", "cascade.cli", "serve", str(bundle), "--port", str(port), *options], cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE), port))
        deadline = time.monotonic() + timeout
        for (proc, port), bundle in zip(started, bundles):
            while not _answers(port):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"`cascade serve {bundle}` did not answer: {proc.stderr.read().decode()[-2000:] if proc.poll() is not None else 'still starting'}")
                time.sleep(0.3)
    except BaseException:
        for proc, _ in started:
            proc.kill()
        raise
    return started


def _answers(port: int) -> bool:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        conn.request("GET", "/health")
        return conn.getresponse().status == 200
    except OSError:
        return False


def stop_subprocess(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()

