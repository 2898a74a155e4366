"""The latency-budget planner against the served cascade: is what `cascade plan` predicts what
serving its quotas measures?

    python benchmarks/plan_check.py runs/quickstart/cascade_distilled:2.5,4 runs/ml1m/cascade_blend:4,6

Each argument is RUN_DIR:BUDGETS (ms; the run's bundle at RUN_DIR/bundle, as `cascade run` writes
it). For each budget:
1. the plan (``export.plan.plan``, what `cascade plan RUN_DIR/bundle --budget-ms ...` prints):
   the quotas, the predicted joint recall with its bootstrap CI, the predicted p99;
2. the run exported with those quotas (`cascade export RUN_DIR --quotas R,P,K`) and served by
   `cascade serve` in a child process on 127.0.0.1;
3. its p99 (the server's own cascade time, ``timings_ms.total``, what the plan predicts) timed in
   the same rounds as the plan's probes measured again: this machine's speed drifts by up to 2x
   from one minute to the next, so the prediction compared is the plan's cost model on curves
   of the same minutes (the plan-time prediction is beside it);
4. the test split replayed through it over HTTP (exposures posted in time order where the stages
   read the item trend): the joint recall of the items it showed, and its parity with the torch
   cascade at those quotas.
The checks: the served p99 within 20% of the prediction, the served joint recall inside the
predicted CI. Writes benchmarks/results/plan_check.{md,json}.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cascade.saved import STAGE_NAMES
from export.bundle import IndexSpec, write_bundle
from export.plan import measure_costs, plan, request_bodies
from export.replay import http_post, replay
from export.serve import start_subprocess, stop_subprocess
from export.runtime import CascadeService
from export.stages import from_run, torch_cascade

from provenance import write_results
from serving import matmul_peak

TOLERANCE = 0.20


def check(run_dir: Path, result: dict, quotas: dict[str, int], out: Path, cost_requests: int) -> dict:
    """``run_dir`` exported at ``quotas`` (what `cascade export RUN_DIR --quotas` writes) and
    served: its p99 beside the plan's cost curves measured again in the same rounds (the
    prediction as of these minutes), then the test split replayed through it for its joint
    recall and its parity with the torch cascade at those quotas."""
    data, stages, trend = from_run(run_dir, tuple(quotas[name] for name in STAGE_NAMES))
    bundle = write_bundle(data, *stages, out, IndexSpec("flat"), source={"run_dir": str(run_dir.resolve())}, trend=trend)
    service = CascadeService(bundle)
    events_until, fields = (service.online.definition.events_until if service.online else 0), list(service.user_fields)
    service.close()
    curves, totals = measure_costs(run_dir / "bundle", request_bodies(data, fields, cost_requests), result["recall_sizes"], result["prerank_sizes"], {"served": bundle})
    proc, port = start_subprocess(bundle)
    try:
        report = replay(http_post(f"http://127.0.0.1:{port}"), data, torch_cascade(data, stages, trend), data.trend() if trend else None, events_until, fields)
    finally:
        stop_subprocess(proc)
    predicted = curves.per_request(quotas["recall"], quotas["prerank"])
    return report | {
        "served_p99_ms": float(np.percentile(totals["served"], 99)), "same_window_p99_ms": float(np.percentile(predicted, 99)),
        "served_p50_ms": float(np.percentile(totals["served"], 50)), "same_window_p50_ms": float(np.percentile(predicted, 50)),
        "timed_requests": len(totals["served"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="RUN_DIR:B1,B2 (budgets in ms)")
    parser.add_argument("--requests", type=int, default=2000, help="test requests the plan's quality is measured on")
    parser.add_argument("--cost-requests", type=int, default=1000, help="requests timed at each probed quota pair (the first test requests, cycled where the split has fewer)")
    args = parser.parse_args()
    rows = []
    for spec in args.runs:
        run, _, budgets = spec.rpartition(":")
        run_dir = Path(run)
        start = time.perf_counter()
        result = plan(run_dir / "bundle", [float(b) for b in budgets.split(",")], requests=args.requests, cost_requests=args.cost_requests, progress=lambda line: print(f"{run_dir}: {line}", flush=True))
        plan_s = time.perf_counter() - start
        seen: dict[tuple, dict] = {}
        for p in result["plans"]:
            if p["quotas"] is None:
                rows.append({"run": str(run_dir), "budget_ms": p["budget_ms"], "quotas": None, "cheapest_p99_ms": p["p99_ms"], "plan_seconds": plan_s})
                continue
            key = tuple(p["quotas"].values())
            if key not in seen:
                with tempfile.TemporaryDirectory() as tmp:
                    seen[key] = check(run_dir, result, p["quotas"], Path(tmp) / "bundle", args.cost_requests)
            got = seen[key]
            row = {
                "run": str(run_dir), "budget_ms": p["budget_ms"], "quotas": p["quotas"], "plan_seconds": plan_s,
                "quality_requests": result["quality_requests"], "timed_requests": got["timed_requests"],
                "predicted_joint_recall": p["joint_recall"], "ci": p["ci"], "predicted_p99_ms": p["p99_ms"],
                "same_window_p99_ms": got["same_window_p99_ms"], "served_p99_ms": got["served_p99_ms"],
                "same_window_p50_ms": got["same_window_p50_ms"], "served_p50_ms": got["served_p50_ms"],
                "served_requests": got["requests"], "served_joint_recall": got["joint_recall"], "replay_server_ms": got["server_ms"],
                "same_every_stage": got["same_every_stage"],
            }
            row["p99_ratio"] = row["served_p99_ms"] / row["same_window_p99_ms"]
            row["p99_within_20pct"] = abs(row["p99_ratio"] - 1) <= TOLERANCE
            row["joint_recall_in_ci"] = p["ci"][0] <= got["joint_recall"] <= p["ci"][1]
            rows.append(row)
            print(f"{run_dir} budget {p['budget_ms']:g} ms: quotas {key} predicted p99 {p['p99_ms']:.2f} ms at plan time, {row['same_window_p99_ms']:.2f} ms in the served rounds; served {row['served_p99_ms']:.2f} ms (x{row['p99_ratio']:.2f}); "
                  f"joint recall predicted {p['joint_recall']:.4f} [{p['ci'][0]:.4f}, {p['ci'][1]:.4f}], served {got['joint_recall']:.4f}", flush=True)
    threads = torch.get_num_threads()
    peak = matmul_peak(1)  # last: it leaves torch on one thread
    torch.set_num_threads(threads)
    lines = [
        "# The latency-budget planner against the served cascade",
        "",
        "`cascade plan RUN_DIR/bundle --budget-ms B` chooses recall's and pre-rank's quotas (the rank quota, what is shown, stays) for the highest joint recall whose predicted p99 fits B. "
        "Cost: the bundle served by `cascade serve` at a few quota pairs (one child process each, requests sent to each in turn, one at a time), each stage's ms read from the server's `timings_ms`, interpolated between sizes. "
        "Quality: joint recall at every quota pair from the torch cascade on a sample of test requests (95% CI: bootstrap over them).",
        "",
        "Each choice is exported (`cascade export RUN_DIR --quotas R,P,K`) and served. Its p99 is timed in the same rounds as the plan's probes, measured again: this machine's speed drifts by up to 2x from one minute to the next (three servers of one bundle, interleaved, agree within 5%), "
        "so the ratio compares the served p99 with the plan's cost model on curves of the same minutes; the plan-time prediction is beside it. "
        "Then the whole test split is replayed through it over HTTP (exposures posted in time order where the stages read the item trend) for the joint recall it shows.",
        "",
        f"fp32 matmul peak in this run (1 thread): {peak:.0f} GFLOP/s.",
        "",
        "| run | budget ms | quotas R,P,K | predicted p99 ms (plan time) | predicted p99 ms (same rounds) | served p99 ms | served / predicted | within 20% | p50 ms predicted (same rounds) / served | predicted joint recall [95% CI] | served joint recall | in CI | same survivors as torch | requests (quality / timed / replayed) |",
        "|---|---:|---|---:|---:|---:|---:|---|---|---|---:|---|---:|---|",
    ]
    for r in rows:
        if r["quotas"] is None:
            lines.append(f"| {r['run']} | {r['budget_ms']:g} | nothing fits (the cheapest: p99 {r['cheapest_p99_ms']:.2f} ms) | | | | | | | | | | | |")
            continue
        q = r["quotas"]
        lines.append(
            f"| {r['run']} | {r['budget_ms']:g} | {q['recall']},{q['prerank']},{q['rank']} | {r['predicted_p99_ms']:.2f} | {r['same_window_p99_ms']:.2f} | {r['served_p99_ms']:.2f} | {r['p99_ratio']:.2f} | {'yes' if r['p99_within_20pct'] else '**no**'} | {r['same_window_p50_ms']:.2f} / {r['served_p50_ms']:.2f} | "
            f"{r['predicted_joint_recall']:.4f} [{r['ci'][0]:.4f}, {r['ci'][1]:.4f}] | {r['served_joint_recall']:.4f} | {'yes' if r['joint_recall_in_ci'] else '**no**'} | {r['same_every_stage']:.4f} | {r['quality_requests']:,} / {r['timed_requests']:,} / {r['served_requests']:,} |"
        )
    write_results("plan_check", lines, {"matmul_peak_gflops": peak, "rows": rows})


if __name__ == "__main__":
    main()
