"""`cascade serve` under load, against the server as it was before its limits and batching, in one run.

    python benchmarks/server_load.py [--baseline REF] [--requests 2000] [--soak-s 600]

1. The 100k-item benchmark bundle (``serving.py``'s: recall 1000 over an IVF index -> pre-rank 200
   -> rank 20, untrained towers at their serving sizes) served by this tree and by ``--baseline``
   (a git ref checked out in a temporary worktree, its own `cascade serve`), each loaded at
   concurrency 1 and 8 over loopback, alternating, two rounds: p50 / p99 and requests/s.
   The same for this tree with ``--workers 2``, and the memory of every process after the load
   (RSS and PSS: PSS splits the pages processes share, such as the memory-mapped item vectors).
2. A soak: ``--soak-s`` seconds at concurrency 8 of valid requests with one hostile request in
   ten (an oversized batch, a declared 200 MiB body, JSON nested 100,000 levels, not JSON, an
   unknown field), the server's RSS sampled every 5 s: errors on valid requests and the drift
   from the RSS after the warm-up.

The fp32 matmul peak (1 thread) is measured in the same run. Every loop is bounded in count and
time. Writes benchmarks/results/server_load.{md,json} and the section "Server under load" of
benchmarks/results/serving.md.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from provenance import ROOT, replace_section, write_results
from serving import bodies, catalog_bundles, http_load, matmul_peak, percentiles, post_recommend, start_server, stop_server

SECTION = "## Server under load"
BASELINE = "1d606ad"  # the last commit before cascade serve's limits, Prometheus metrics and batching


def memory(pid: int) -> dict[str, float]:
    """RSS and PSS of a process, MiB."""
    rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
    get = lambda name: int(re.search(rf"^{name}:\s+(\d+) kB", rollup, re.M).group(1)) / 1024  # noqa: E731
    return {"rss_mib": get("Rss"), "pss_mib": get("Pss")}


def workers(pid: int) -> list[dict]:
    """The memory of each worker process of a ``--workers`` server (its children, less
    multiprocessing's resource tracker)."""
    out = []
    for child in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split():
        if "resource_tracker" not in Path(f"/proc/{child}/cmdline").read_text():
            out.append({"process": f"worker {len(out) + 1}", **memory(int(child))})
    return out


def load_rounds(bundle: Path, trees: dict[str, tuple[Path, list[str]]], reqs: list[dict], rounds: int) -> list[dict]:
    rows = []
    servers = {name: start_server(bundle, cwd, *more) for name, (cwd, more) in trees.items()}
    try:
        for name, (_, port) in servers.items():  # warm-up: sessions, allocator pools
            http_load(port, reqs[:100], 8, 30)
        for r in range(rounds):
            for c in (1, 8):
                for name, (_, port) in servers.items():
                    got = http_load(port, reqs, c, 120)
                    rows.append({"server": name, "round": r + 1, **got})
                    print(f"  round {r + 1} {name} c={c}: p50 {got['p50_ms']:.2f} p99 {got['p99_ms']:.2f} ms, {got['requests_per_s']:.0f} req/s, errors {got['errors']}", flush=True)
        for name, (proc, _) in servers.items():
            rows.append({"server": name, "memory": memory(proc.pid)} | ({"workers": workers(proc.pid)} if "workers" in name else {}))
    finally:
        for proc, _ in servers.values():
            stop_server(proc)
    return rows


HOSTILE = [
    (b"POST /recommend HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n", json.dumps({"requests": [{}] * 20_000}).encode(), 413),
    (b"POST /recommend HTTP/1.1\r\nHost: x\r\nContent-Length: 209715200\r\n\r\n", b" " * 65536, 413),
    (b"POST /recommend HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n", b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400),
    (b"POST /recommend HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n", b"{not json", 400),
    (b"POST /recommend HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n", b'{"usr": 1}', 422),
]


def hostile(port: int, case: int) -> int | None:
    head, body, _ = HOSTILE[case]
    data = (head % len(body) if b"%d" in head else head) + body
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass
        reply = b""
        try:
            while chunk := s.recv(65536):
                reply += chunk
                if b"\r\n\r\n" in reply and b"connection: close" not in reply.lower():
                    break
        except (ConnectionResetError, TimeoutError):
            pass
    return int(reply.split()[1]) if reply else None


def soak(bundle: Path, reqs: list[dict], seconds: float) -> dict:
    proc, port = start_server(bundle, ROOT)
    lock, stats = threading.Lock(), {"valid": 0, "valid_errors": 0, "hostile": 0, "hostile_wrong": 0, "latency": []}
    samples: list[tuple[float, float]] = []
    try:
        http_load(port, reqs[:400], 8, 60)
        baseline_rss = memory(proc.pid)["rss_mib"]
        deadline = time.monotonic() + seconds
        t0 = time.monotonic()

        def client(seed: int) -> None:
            rng = random.Random(seed)
            connect = lambda: http.client.HTTPConnection("127.0.0.1", port, timeout=30)  # noqa: E731
            conn = connect()
            while time.monotonic() < deadline:
                if rng.random() < 0.1:
                    case = rng.randrange(len(HOSTILE))
                    ok = hostile(port, case) == HOSTILE[case][2]
                    with lock:
                        stats["hostile"] += 1
                        stats["hostile_wrong"] += not ok
                    continue
                body = json.dumps(reqs[rng.randrange(len(reqs))])
                t = time.perf_counter()
                ok, conn = post_recommend(conn, body, connect)
                with lock:
                    stats["valid"] += 1
                    stats["valid_errors"] += not ok
                    stats["latency"].append(time.perf_counter() - t)
            conn.close()

        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            time.sleep(5)
            samples.append((time.monotonic() - t0, memory(proc.pid)["rss_mib"]))
        for t in threads:
            t.join()
        final = memory(proc.pid)["rss_mib"]
    finally:
        stop_server(proc)
    lat = stats.pop("latency")
    return {
        "seconds": seconds,
        **stats,
        **{f"valid_{k}": v for k, v in percentiles(lat).items()},
        "rss_after_warmup_mib": baseline_rss,
        "rss_final_mib": final,
        "rss_max_mib": max(r for _, r in samples),
        "rss_drift": final / baseline_rss - 1,
        "rss_samples": samples,
    }


def parser_for(doc: str) -> argparse.ArgumentParser:
    """The options every load benchmark of the benchmark bundle against a baseline takes."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--baseline", default=BASELINE, help="git ref of the server to compare against")
    parser.add_argument("--requests", type=int, default=2000, help="requests per load measurement")
    parser.add_argument("--catalog", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=2)
    return parser


@contextmanager
def bundle_and_baseline(args) -> Iterator[tuple[Path, Path, list[dict], float]]:
    """(the baseline's tree checked out in a temporary worktree, the IVF benchmark bundle, the
    request bodies, the fp32 matmul peak of one thread), all removed afterwards."""
    tmp = Path(tempfile.mkdtemp(prefix="server-load."))
    baseline_tree = tmp / "baseline"
    subprocess.run(["git", "worktree", "add", "--detach", str(baseline_tree), args.baseline], cwd=ROOT, check=True, capture_output=True)
    try:
        peak = matmul_peak(1)
        print(f"fp32 matmul peak (1 thread): {peak:.1f} GFLOP/s", flush=True)
        bundles, ds, _ = catalog_bundles(args, tmp)
        yield baseline_tree, bundles["ivf"], bodies(ds, args.requests), peak
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(baseline_tree)], cwd=ROOT, capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = parser_for(__doc__)
    parser.add_argument("--soak-s", type=float, default=600.0)
    args = parser.parse_args()
    with bundle_and_baseline(args) as (baseline_tree, bundle, reqs, peak):
        print("[1/2] load, baseline against this tree (one process, and --workers 2)", flush=True)
        trees = {"baseline": (baseline_tree, []), "this tree": (ROOT, []), "this tree, --workers 2": (ROOT, ["--workers", "2"])}
        rows = load_rounds(bundle, trees, reqs, args.rounds)
        print(f"[2/2] soak, {args.soak_s:.0f} s", flush=True)
        soaked = soak(bundle, reqs, args.soak_s)
        print({k: v for k, v in soaked.items() if k != "rss_samples"}, flush=True)
    report(args, peak, rows, soaked)


def report(args, peak: float, rows: list[dict], soaked: dict) -> None:
    loads = [r for r in rows if "concurrency" in r]
    lines = [
        f"The {args.catalog:,}-item benchmark bundle (recall 1000 over IVF1024 nprobe 128 -> pre-rank 200 -> rank 20), "
        f"`cascade serve` of this tree against the baseline ({args.baseline}: no limits, no batching), each loaded over loopback "
        f"by {{1, 8}} keep-alive clients with up to {args.requests:,} requests, alternating, {args.rounds} rounds. "
        f"fp32 matmul peak in this run: {peak:.1f} GFLOP/s (1 thread).",
        "",
        "| round | server | concurrency | p50 ms | p99 ms | requests/s | errors | n |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
        *[f"| {r['round']} | {r['server']} | {r['concurrency']} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['requests_per_s']:.0f} | {r['errors']} | {r['n']} |" for r in loads],
        "",
    ]
    for server in ("this tree", "this tree, --workers 2"):
        for c in (1, 8):
            get = lambda name, key: float(np.median([r[key] for r in loads if r["server"] == name and r["concurrency"] == c]))  # noqa: E731
            lines.append(
                f"- {server}, concurrency {c} (median of rounds): {get(server, 'requests_per_s'):.0f} req/s against the baseline's {get('baseline', 'requests_per_s'):.0f} "
                f"(x{get(server, 'requests_per_s') / get('baseline', 'requests_per_s'):.2f}); p99 {get(server, 'p99_ms'):.1f} ms against {get('baseline', 'p99_ms'):.1f}"
            )
    mem = {r["server"]: r["memory"] for r in rows if "memory" in r}
    pool = next(r["workers"] for r in rows if "workers" in r)
    lines += [
        "",
        "Memory after the load (MiB; PSS counts a page shared by n processes as 1/n):",
        "",
        "| process | RSS | PSS |",
        "|---|---:|---:|",
        *[f"| one server, {name} | {m['rss_mib']:.0f} | {m['pss_mib']:.0f} |" for name, m in mem.items() if "workers" not in name],
        f"| --workers 2: the supervisor | {mem['this tree, --workers 2']['rss_mib']:.0f} | {mem['this tree, --workers 2']['pss_mib']:.0f} |",
        *[f"| --workers 2: {w['process']} | {w['rss_mib']:.0f} | {w['pss_mib']:.0f} |" for w in pool],
        "",
        f"Soak: {soaked['seconds']:.0f} s at concurrency 8, one request in ten hostile (oversized batch, declared 200 MiB body, JSON nested 100,000 levels, not JSON, an unknown field):",
        "",
        "| valid requests | errors on valid | valid p50 / p99 ms | hostile requests | hostile with a wrong status | RSS after warm-up MiB | max MiB | final MiB | drift |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {soaked['valid']:,} | {soaked['valid_errors']} | {soaked['valid_p50_ms']:.2f} / {soaked['valid_p99_ms']:.2f} | {soaked['hostile']:,} | {soaked['hostile_wrong']} | {soaked['rss_after_warmup_mib']:.0f} | {soaked['rss_max_mib']:.0f} | {soaked['rss_final_mib']:.0f} | {soaked['rss_drift']:+.1%} |",
    ]
    write_results("server_load", ["# cascade serve under load", "", *lines], {"matmul_peak_gflops": peak, "baseline": args.baseline, "load": rows, "soak": soaked})
    replace_section(ROOT / "benchmarks" / "results" / "serving.md", SECTION, [*lines, "", "(from `benchmarks/server_load.py`; its own table: server_load.md)"])
    print("\n".join(lines))


if __name__ == "__main__":
    main()
