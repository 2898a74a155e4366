"""The most requests/s this machine's cores can serve of the benchmark bundle, against the servers.

    python benchmarks/serving_ceiling.py [--baseline REF] [--requests 2000] [--rounds 2]

1. The cascade alone, in process, no HTTP: ``CascadeService.recommend_batch`` of this tree over
   batches of 1, 2, 4, 8 and 16 requests, the CPU seconds a request costs (all threads, by
   ``time.process_time``) and each stage's share. The ceiling is ``cores / CPU seconds`` at the
   cheapest batch: what the cores serve if parsing, HTTP and JSON cost nothing.
2. In the same run, ``cascade serve`` of the baseline (``--baseline``, the server before its
   limits and batching) and of this tree, at concurrency 8 over loopback, alternating rounds, as
   ``server_load.py`` loads them, with the CPU seconds each request cost the server process
   (``/proc/PID/stat``) and the load client (this process's threads, which share the cores).

It answers whether a throughput target is within the machine's reach: issue 32 asks for 2x the
baseline at concurrency 8. Writes benchmarks/results/serving_ceiling.{md,json} and the section
"The compute ceiling" of benchmarks/results/serving.md.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from export.runtime import CascadeService
from provenance import ROOT, replace_section, write_results
from server_load import bundle_and_baseline, parser_for
from serving import http_load, start_server, stop_server

SECTION = "## The compute ceiling"
BATCHES = (1, 2, 4, 8, 16)
STAGES = ("recall", "prerank", "rank")


def in_process(bundle: Path, reqs: list[dict], n: int) -> list[dict]:
    """CPU ms per request of the cascade alone, per batch size, with each stage's wall ms per request."""
    service = CascadeService(bundle)
    service.recommend_batch(reqs[:32])  # warm-up: sessions, allocator pools
    rows = []
    for size in BATCHES:
        cpu, wall, done = time.process_time(), time.perf_counter(), 0
        stage_ms = dict.fromkeys(STAGES, 0.0)
        for i in range(0, n, size):
            out = service.recommend_batch(reqs[i : i + size])
            done += len(out)
            for name in STAGES:  # a batch's timings are the batch's: counted once per batch
                stage_ms[name] += out[0]["timings_ms"][name]
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        rows.append({"batch": size, "cpu_ms_per_request": cpu / done * 1e3, "wall_ms_per_request": wall / done * 1e3, **{f"{k}_ms_per_request": v / done for k, v in stage_ms.items()}})
        r = rows[-1]
        print(f"  batch {size}: {r['cpu_ms_per_request']:.2f} CPU ms a request (" + ", ".join(f"{k} {r[k + '_ms_per_request']:.2f}" for k in STAGES) + ")", flush=True)
    service.close()
    return rows


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    args = parser_for(__doc__).parse_args()
    with bundle_and_baseline(args) as (baseline_tree, bundle, reqs, peak):
        print("[1/2] the cascade in process", flush=True)
        alone = in_process(bundle, reqs, min(args.requests, 800))
        print("[2/2] the servers at concurrency 8", flush=True)
        servers = {"baseline": start_server(bundle, baseline_tree), "this tree": start_server(bundle, ROOT)}
        loads = []
        try:
            for _, port in servers.values():
                http_load(port, reqs[:100], 8, 30)
            for r in range(args.rounds):
                for name, (proc, port) in servers.items():
                    server_cpu, client_cpu = cpu_seconds(proc.pid), time.process_time()
                    got = http_load(port, reqs, 8, 120)
                    server_cpu, client_cpu = cpu_seconds(proc.pid) - server_cpu, time.process_time() - client_cpu
                    loads.append({"server": name, "round": r + 1, **got, "server_cpu_ms_per_request": server_cpu / got["n"] * 1e3, "client_cpu_ms_per_request": client_cpu / got["n"] * 1e3})
                    print(f"  round {r + 1} {name}: {got['requests_per_s']:.0f} req/s, p99 {got['p99_ms']:.1f} ms, errors {got['errors']}; CPU ms a request: server {loads[-1]['server_cpu_ms_per_request']:.2f}, client {loads[-1]['client_cpu_ms_per_request']:.2f}", flush=True)
        finally:
            for proc, _ in servers.values():
                stop_server(proc)
    report(args, peak, alone, loads)


def median(xs: list[float]) -> float:
    xs = sorted(xs)
    return (xs[(len(xs) - 1) // 2] + xs[len(xs) // 2]) / 2


def report(args, peak: float, alone: list[dict], loads: list[dict]) -> None:
    cores = os.cpu_count() or 1
    best = min(alone, key=lambda r: r["cpu_ms_per_request"])
    ceiling = cores / best["cpu_ms_per_request"] * 1e3
    of = lambda name, key: median([r[key] for r in loads if r["server"] == name])  # noqa: E731
    served = {name: of(name, "requests_per_s") for name in ("baseline", "this tree")}
    server_ms, client_ms = of("this tree", "server_cpu_ms_per_request"), of("this tree", "client_cpu_ms_per_request")
    target = 2 * served["baseline"]
    budget_ms = cores / target * 1e3  # the CPU a request may cost, server and client together, at 2x
    lines = [
        f"The {args.catalog:,}-item benchmark bundle (recall 1000 over IVF1024 nprobe 128 -> pre-rank 200 -> rank 20). "
        f"The cascade alone in process (`CascadeService.recommend_batch`, no HTTP, no JSON): the CPU it costs a request at each batch size. "
        f"fp32 matmul peak in this run: {peak:.1f} GFLOP/s (1 thread); {cores} cores.",
        "",
        "| batch | CPU ms a request | recall ms | pre-rank ms | rank ms |",
        "|---:|---:|---:|---:|---:|",
        *(f"| {r['batch']} | {r['cpu_ms_per_request']:.2f} | {r['recall_ms_per_request']:.2f} | {r['prerank_ms_per_request']:.2f} | {r['rank_ms_per_request']:.2f} |" for r in alone),
        "",
        f"- The ceiling: {cores} cores / {best['cpu_ms_per_request']:.2f} CPU ms (batch {best['batch']}) = **{ceiling:.0f} requests/s** with parsing, HTTP and JSON free.",
        f"- Served in the same run at concurrency 8 (median of {args.rounds} rounds of {args.requests:,} requests): the baseline ({args.baseline}) {served['baseline']:.0f} req/s, this tree {served['this tree']:.0f} req/s "
        f"(x{served['this tree'] / served['baseline']:.2f}, {served['this tree'] / ceiling:.0%} of the ceiling).",
        f"- CPU a request under that load, this tree: the server process {server_ms:.2f} ms (of which the cascade alone {best['cpu_ms_per_request']:.2f}: "
        f"{server_ms - best['cpu_ms_per_request']:.2f} ms of HTTP, JSON, parsing and thread hand-offs), the load client on the same cores {client_ms:.2f} ms.",
        f"- 2x the baseline is {target:.0f} req/s: {cores} cores allow {budget_ms:.2f} CPU ms a request for server and client together. "
        f"The cascade alone takes {best['cpu_ms_per_request']:.2f} of them, leaving {budget_ms - best['cpu_ms_per_request']:.2f} ms for the server's HTTP work and the client, "
        f"which take {server_ms - best['cpu_ms_per_request'] + client_ms:.2f} ms today" + (" (2x is beyond these cores while the client shares them)." if budget_ms - best["cpu_ms_per_request"] < client_ms else "."),
    ]
    print("\n".join(lines))
    write_results("serving_ceiling", ["# The compute ceiling of cascade serve", "", *lines], {"matmul_peak_gflops": peak, "cores": cores, "baseline": args.baseline, "in_process": alone, "ceiling_requests_per_s": ceiling, "load": loads, "served_median": served, "cpu_ms_budget_at_2x": budget_ms})
    replace_section(ROOT / "benchmarks" / "results" / "serving.md", SECTION, [*lines, "", "(from `benchmarks/serving_ceiling.py`; its own table: serving_ceiling.md)"])


if __name__ == "__main__":
    main()
