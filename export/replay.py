"""Replay parity: the logged test split through a running server, as live traffic would reach it.

The test split's exposures go to ``POST /events`` in time order, interleaved with the test requests
at their ``ts`` (each request is sent once every exposure logged before it has been posted, and
none logged at or after it), with ``trace: true`` so the server returns each stage's survivors.
The reference is the torch cascade of ``cascade eval``, whose item trend counts every logged
exposure. The share of requests whose every stage keeps the same items is the parity.

Ties: a stage keeps its top quota by score with ties to the earlier candidate, in torch and in the
bundle alike (``cascade.top_mask``), so an exact tie never splits the two; a score that differs by
rounding (onnxruntime against torch, ~1e-6) can still swap two candidates at a quota's edge. Such
requests count as different: nothing here forgives a near-tie.
"""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

import numpy as np

from cascade.cascade import Cascade
from cascade.data.lists import ListBatch
from cascade.data.trend import ItemTrend
from cascade.eval_data import EvalData
from cascade.evaluate import Truth
from cascade.saved import STAGE_NAMES
from export.online import MAX_EVENTS

Post = Callable[[str, dict], dict]


def http_post(base_url: str, timeout: float = 60) -> Post:
    """``post(path, body) -> response`` against a server at ``base_url`` (urllib: no extra library)."""

    def post(path: str, body: dict) -> dict:
        req = urllib.request.Request(base_url + path, json.dumps(body).encode(), {"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())

    return post


def request_body(lists: ListBatch, row: int, user_fields: list[str]) -> dict[str, Any]:
    """Logged request ``row`` as the JSON a client sends: its user fields, history (padding
    dropped), ts, and ``trace``."""
    body: dict[str, Any] = {}
    for name in user_fields:
        v = lists.user[name][row]
        body[name] = [int(x) for x in v if x > 0] if np.ndim(v) else int(v)
    h = lists.history[row]
    return body | {"history": [int(x) for x in h[h > 0]], "ts": int(lists.ts[row]), "trace": True}


def kept_set(stage, row: int) -> set[int]:
    return set(stage.lists.item["item_id"][row][stage.kept[row]].tolist())


def replay(post: Post, data: EvalData, reference: Cascade, trend: ItemTrend | None, events_until: int, user_fields: list[str], n: int | None = None, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Replay the first ``n`` test requests in time order (every one without ``n``) with the
    exposures logged from ``events_until`` (the bundle's snapshot ends there) up to the last of
    them (none without ``trend``: a bundle without online features); compare each stage's
    survivors with ``reference``'s on the same requests. ``per_request`` holds what was served:
    each request's joint recall (its logged positives among the items shown; NaN without one)
    and the server's own milliseconds (``timings_ms.total``)."""
    logged = data.first("test", n or len(data.ds.requests["request_id"]))
    logged = logged.take(np.argsort(logged.ts, kind="stable"))
    truth = Truth.of(logged)
    requests = logged.take_columns(np.zeros((len(logged), 0), int))
    want = reference.run(requests)
    item = ts = np.zeros(0, np.int64)
    if trend is not None:
        item, ts = trend.by_time
        pending = (ts >= events_until) & (ts < requests.ts.max())
        item, ts = item[pending], ts[pending]
    joint, server_ms = np.full(len(requests), np.nan), np.zeros(len(requests))
    sent, same = 0, {name: 0 for name in STAGE_NAMES} | {"every_stage": 0, "final_order": 0}
    example: dict[str, Any] = {}
    seconds = {"events": 0.0, "requests": 0.0}
    for row in range(len(requests)):
        upto = int(np.searchsorted(ts, requests.ts[row], side="left"))  # strictly before the request
        start = time.perf_counter()
        for a in range(sent, upto, MAX_EVENTS):
            b = min(a + MAX_EVENTS, upto)
            post("/events", {"events": [{"item_id": int(i), "ts": int(t), "kind": "exposure"} for i, t in zip(item[a:b], ts[a:b])]})
        sent = max(sent, upto)
        seconds["events"] += time.perf_counter() - start
        start = time.perf_counter()
        body = request_body(requests, row, user_fields)
        got = post("/recommend", body)
        seconds["requests"] += time.perf_counter() - start
        if not example:
            example = {"request": body, "response": {key: got[key] for key in ("items", "stages")}}
        if truth.n_positives[row]:
            joint[row] = np.isin(got["items"], truth.positives[row][truth.positives[row] > 0]).sum() / truth.n_positives[row]
        server_ms[row] = got["timings_ms"]["total"]
        stages = [set(got["stages"][name]) == kept_set(want.stages[i], row) for i, name in enumerate(STAGE_NAMES)]
        for name, ok in zip(STAGE_NAMES, stages):
            same[name] += ok
        same["every_stage"] += all(stages)
        same["final_order"] += got["items"] == want.items[row][want.items[row] > 0].tolist()
        if progress is not None:
            progress(row + 1)
    r = len(requests)
    out = {"requests": r, "events": sent} | {f"same_{name}_survivors": same[name] / r for name in STAGE_NAMES}
    out |= {"same_every_stage": same["every_stage"] / r, "same_final_order": same["final_order"] / r}
    out |= {"joint_recall": float(np.nanmean(joint)) if (~np.isnan(joint)).any() else float("nan"), "server_ms": {f"p{q}": float(np.percentile(server_ms, q)) for q in (50, 99)}}
    return out | {"seconds": {k: round(v, 2) for k, v in seconds.items()}, "example": example, "per_request": {"joint_recall": joint, "server_ms": server_ms}}


def replay_served(bundle: str | Path, data: EvalData, reference: Cascade, n: int | None = None, every: float = 30.0) -> dict[str, Any]:
    """``replay`` through the bundle served over HTTP on 127.0.0.1 (a fresh service: its snapshot
    and nothing else), a progress line every ``every`` seconds."""
    from export.runtime import CascadeService
    from export.serve import serve_in_thread

    service = CascadeService(bundle)
    if service.online is None:
        raise ValueError(f"{bundle}: its stages read no online feature; nothing to replay")
    url, stop = serve_in_thread(service)
    last = [time.monotonic()]

    def progress(done: int) -> None:
        if time.monotonic() - last[0] >= every:
            last[0] = time.monotonic()
            print(f"  replay: {done:,} requests served", flush=True)

    try:
        return replay(http_post(url), data, reference, data.trend(), service.online.definition.events_until, list(service.user_fields), n, progress)
    finally:
        stop()
        service.close()


def summary(report: dict[str, Any]) -> str:
    """The replay in one line, and the first replayed request with what each stage kept."""
    same = " ".join(f"{name} {report[f'same_{name}_survivors']:.4f}" for name in STAGE_NAMES)
    ex = report["example"]
    request = {k: (v[-5:] if k == "history" else v) for k, v in ex["request"].items()}
    stages = ", ".join(f"{name} kept {len(ids)}" for name, ids in ex["response"]["stages"].items())
    return (
        f"replay of the test split through the served bundle (HTTP, exposures and requests in time order): {report['requests']:,} requests, {report['events']:,} events; "
        f"same survivors: {same}; every stage {report['same_every_stage']:.4f}; final order {report['same_final_order']:.4f}; "
        f"served joint recall {report['joint_recall']:.4f}, server p99 {report['server_ms']['p99']:.2f} ms ({sum(report['seconds'].values()):.0f}s)\n"
        f"  a replayed request (history: its last 5): {json.dumps(request)}\n  -> {stages}; shown {ex['response']['items']}"
    )
