"""What the online item features cost a served cascade, on this machine, all in one run.

    python benchmarks/online_features.py [--events 1000000] [--seconds 8]

1. The counters' share of a request: one request of 1,000 candidates, the item trend over 4
   windows (1, 7, 30, 365 days) on the list and the count scale, against a live store holding
   ``--events`` exposures (MovieLens-1M holds a million) spread over three years and a catalog of
   100,000 items: the journal's tail read (``EventStore.sync``, nothing new) plus
   ``Catalog.add_trend``; quiet, and with 100 new events arriving before every request (the delta
   level, folded into the base every ``MERGE_AT``).
2. Durable ingestion on one core (this process pinned to one CPU): ``json.loads`` of a POST body,
   ``EventStore.parse_events`` and ``append`` into a SQLite journal (WAL, synchronous=FULL: each
   commit fsynced) on this machine's disk, in batches of 100, 1,000 and 10,000 events.
3. The same over HTTP: `cascade serve --state` in a subprocess pinned to one CPU, a client on the
   other posting batches of 1,000, one at a time and 4 at once (group commit shares fsyncs).

Every loop is bounded in count and ``--seconds``. The fp32 matmul peak (1 thread) is measured in
the same run. Writes benchmarks/results/online_features.{md,json} and the section "Online item
features" of benchmarks/results/serving.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch

from cascade.cascade import Catalog, requests_batch
from cascade.data.trend import DAY, TrendSpec, event_keys
from export.online import EventStore, OnlineFeatures, SqliteJournal

from provenance import ROOT, replace_section, write_results

WINDOWS = (1, 7, 30, 365)
CATALOG = 100_000
CANDIDATES = 1_000
START = 946_684_800  # 2000-01-01, the log's first second
SPAN = 3 * 365 * DAY
SECTION = "## Online item features"


def matmul_peak() -> float:
    torch.set_num_threads(1)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    best = 0.0
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        best = max(best, 2 * 1024**3 / (time.perf_counter() - start) / 1e9)
    return best


def percentiles(ms: list[float]) -> dict[str, float]:
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)), "n": len(ms)}


def random_events(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    # Zipf-like popularity: a few items take most exposures, as in any catalog
    item = np.minimum(rng.zipf(1.2, n), CATALOG).astype(np.int64)
    return item, START + rng.integers(0, SPAN, n)


def counter_cost(n_events: int, seconds: float, rng: np.random.Generator) -> list[dict]:
    rows = []
    ids = np.arange(1, CATALOG + 1)
    base = event_keys(*random_events(rng, n_events))
    user = {"user_id": np.array([1])}
    for scale in ("list", "count"):
        for arriving in (0, 100):
            store = EventStore(OnlineFeatures(TrendSpec(WINDOWS, scale), START + SPAN), base, np.ones(CATALOG + 1, bool), SqliteJournal(Path(tempfile.mkdtemp(dir=ROOT / "runs"))), "bench")
            catalog = Catalog(ids, {"item_id": ids}, store, TrendSpec(WINDOWS, scale))
            plain = Catalog(ids, {"item_id": ids})
            with_trend, without, deadline = [], [], time.monotonic() + seconds
            at = START + SPAN
            for i in range(1000):
                if time.monotonic() > deadline and i >= 100:
                    break
                if arriving:
                    item, _ = random_events(rng, arriving)
                    store.append(event_keys(item, np.full(arriving, at)))
                at += 1
                req = requests_batch(user, np.zeros((1, 1), np.int64), ts=np.array([at]))
                cands = rng.choice(ids, size=(1, CANDIDATES), replace=False)
                start = time.perf_counter()
                plain.attach(req, cands)
                mid = time.perf_counter()
                store.sync()
                catalog.attach(req, cands)
                end = time.perf_counter()
                without.append((mid - start) * 1000)
                with_trend.append((end - mid) * 1000)
            store.close()
            added = percentiles(with_trend)
            rows.append({"scale": scale, "arriving_per_request": arriving, "events": int(len(store.live)), "attach_without_trend": percentiles(without), "with_trend": added})
            print(f"  {scale} scale, {arriving} events arriving per request: counters p50 {added['p50_ms']:.3f} ms, p99 {added['p99_ms']:.3f} ms (attach alone {rows[-1]['attach_without_trend']['p50_ms']:.3f})", flush=True)
    return rows


def body(rng: np.random.Generator, n: int) -> bytes:
    item, ts = random_events(rng, n)
    return json.dumps({"events": [{"item_id": int(i), "ts": int(t), "kind": "exposure"} for i, t in zip(item, ts)]}).encode()


def ingestion(seconds: float, rng: np.random.Generator) -> list[dict]:
    rows = []
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    try:
        for batch in (100, 1_000, 10_000):
            state = Path(tempfile.mkdtemp(dir=ROOT / "runs"))
            store = EventStore(OnlineFeatures(TrendSpec(WINDOWS, "list"), START), np.zeros(0, np.int64), np.ones(CATALOG + 1, bool), SqliteJournal(state), "bench")
            bodies = [body(rng, batch) for _ in range(20)]
            sent, start, i = 0, time.perf_counter(), 0
            while time.perf_counter() - start < seconds and sent < 2_000_000:
                store.append(store.parse_events(json.loads(bodies[i % len(bodies)]), now=START + SPAN))
                sent, i = sent + batch, i + 1
            took = time.perf_counter() - start
            journalled = len(store.journal.read_after(0)[2])
            store.close()
            shutil.rmtree(state)
            rows.append({"batch": batch, "events": sent, "seconds": took, "events_per_s": sent / took, "commits_per_s": i / took, "journalled": journalled})
            print(f"  batches of {batch:,}: {sent / took:,.0f} events/s ({i / took:,.0f} fsynced commits/s)", flush=True)
    finally:
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    return rows


def http_ingestion(seconds: float, rng: np.random.Generator, bundle: Path) -> list[dict]:
    rows = []
    cpus = sorted(os.sched_getaffinity(0))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    state = Path(tempfile.mkdtemp(dir=ROOT / "runs"))
    proc = subprocess.Popen([sys.executable, "-m", "cascade.cli", "serve", str(bundle), "--port", str(port), "--state", str(state)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=lambda: os.sched_setaffinity(0, {cpus[0]}))
    url = f"http://127.0.0.1:{port}/events"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(url.replace("/events", "/health"), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("the server did not start: " + proc.stderr.read().decode()[-2000:])
                time.sleep(0.2)
        items = np.load(bundle / "catalog.npz")["item_id"]
        os.sched_setaffinity(0, {cpus[-1]})
        for clients in (1, 4):
            bodies = []
            for _ in range(20):
                ts = START + rng.integers(0, SPAN, 1000)
                bodies.append(json.dumps({"events": [{"item_id": int(i), "ts": int(t), "kind": "exposure"} for i, t in zip(rng.choice(items, 1000), ts)]}).encode())
            sent = [0] * clients
            stop = time.perf_counter() + seconds

            def client(c: int) -> None:
                i = 0
                while time.perf_counter() < stop and sent[c] < 1_000_000:
                    req = urllib.request.Request(url, bodies[(i + c) % len(bodies)], {"Content-Type": "application/json"}, method="POST")
                    with urllib.request.urlopen(req, timeout=30) as r:
                        assert json.loads(r.read())["accepted"] == 1000
                    sent[c], i = sent[c] + 1000, i + 1

            start = time.perf_counter()
            threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            took = time.perf_counter() - start
            rows.append({"clients": clients, "batch": 1000, "events": sum(sent), "seconds": took, "events_per_s": sum(sent) / took})
            print(f"  over HTTP, {clients} client(s), batches of 1,000: {sum(sent) / took:,.0f} events/s", flush=True)
    finally:
        os.sched_setaffinity(0, set(cpus))
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(state, ignore_errors=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000, help="exposures in the live store")
    parser.add_argument("--seconds", type=float, default=8.0, help="time budget of each loop")
    parser.add_argument("--bundle", type=Path, default=None, help="a bundle with online features for the HTTP part (default: the test world's, made here)")
    args = parser.parse_args()
    (ROOT / "runs").mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    peak = matmul_peak()
    print(f"fp32 matmul peak (1 thread): {peak:.1f} GFLOP/s", flush=True)
    print(f"1. counters of one request of {CANDIDATES:,} candidates, {len(WINDOWS)} windows, {args.events:,} events", flush=True)
    cost = counter_cost(args.events, args.seconds, rng)
    print("2. durable ingestion on one core (SQLite WAL, synchronous=FULL)", flush=True)
    ingest = ingestion(args.seconds, rng)
    http = []
    if args.bundle is not None:
        print(f"3. over HTTP: cascade serve {args.bundle} --state, pinned to one CPU", flush=True)
        http = http_ingestion(args.seconds, rng, args.bundle)
    lines = [
        f"fp32 matmul peak in this run (1 thread): {peak:.1f} GFLOP/s. The counters of one request of {CANDIDATES:,} candidates over {len(WINDOWS)} windows ({', '.join(map(str, WINDOWS))} days), a catalog of {CATALOG:,} items, the live store holding {args.events:,} exposures (Zipf 1.2 over items, uniform over three years): the journal's tail read plus `Catalog.add_trend`, beside the catalog's attach of the static fields alone.",
        "",
        "| scale | new events before each request | counters p50 ms | p99 ms | static attach p50 ms | n |",
        "|---|---:|---:|---:|---:|---:|",
        *[f"| {r['scale']} | {r['arriving_per_request']} | {r['with_trend']['p50_ms']:.3f} | {r['with_trend']['p99_ms']:.3f} | {r['attach_without_trend']['p50_ms']:.3f} | {r['with_trend']['n']} |" for r in cost],
        "",
        "Durable ingestion on one core: `json.loads` of the body, `parse_events` (every field checked) and `append` (SQLite WAL, synchronous=FULL: each commit fsynced to this machine's ext4 disk before it returns).",
        "",
        "| batch | events/s | fsynced commits/s | events | s |",
        "|---:|---:|---:|---:|---:|",
        *[f"| {r['batch']:,} | {r['events_per_s']:,.0f} | {r['commits_per_s']:,.0f} | {r['events']:,} | {r['seconds']:.1f} |" for r in ingest],
    ]
    if http:
        lines += [
            "",
            f"Over HTTP: `cascade serve {args.bundle} --state DIR` pinned to one CPU, the client on the other, batches of 1,000 events.",
            "",
            "| clients | events/s | events | s |",
            "|---:|---:|---:|---:|",
            *[f"| {r['clients']} | {r['events_per_s']:,.0f} | {r['events']:,} | {r['seconds']:.1f} |" for r in http],
        ]
    write_results("online_features", ["# Online item features: cost", "", *lines], {"matmul_peak_gflops": peak, "counters": cost, "ingestion": ingest, "http_ingestion": http})
    replace_section(ROOT / "benchmarks" / "results" / "serving.md", SECTION, [*lines, "", "(from `benchmarks/online_features.py`; its own table: online_features.md)"])


if __name__ == "__main__":
    main()
