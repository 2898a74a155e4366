"""Replay parity of served cascades on MovieLens-1M: each bundle served over HTTP (127.0.0.1), the
test split's exposures posted in time order and interleaved with the test requests at their ts,
every stage's survivors compared with the torch cascade `cascade eval` runs.

    python benchmarks/replay_ml1m.py runs/ml1m/cascade_blend [RUN_DIR ...] [--requests N]

Each RUN_DIR is a `task: cascade` run whose bundle (RUN_DIR/bundle, made by `cascade run` or
`cascade export RUN_DIR --out RUN_DIR/bundle`) reads the item trend. Ties: see export/replay.py.
Writes benchmarks/results/replay_ml1m.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from cascade.saved import STAGE_NAMES as STAGES
from export.replay import replay_served
from export.stages import from_run, torch_cascade

from provenance import write_results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="task: cascade runs, each with its bundle")
    parser.add_argument("--requests", type=int, default=None, help="the first N test requests (default: all)")
    args = parser.parse_args()
    rows = []
    for run in args.runs:
        data, stages, trend = from_run(run)
        manifest = json.loads((run / "bundle" / "manifest.json").read_text())
        start = time.perf_counter()
        report = replay_served(run / "bundle", data, torch_cascade(data, stages, trend), args.requests)
        took = time.perf_counter() - start
        rows.append({"run": str(run), "stages": {s["name"]: f"{s['model']} top-{s['quota']}" for s in manifest["stages"]}, "online": manifest["online"], "seconds": took} | {("seconds_http" if k == "seconds" else k): v for k, v in report.items() if k not in ("example", "per_request")})
        print(f"{run}: " + json.dumps({k: v for k, v in rows[-1].items() if k.startswith("same") or k in ("requests", "events")}), flush=True)
    lines = [
        "# Replay parity on MovieLens-1M",
        "",
        "Each bundle served over HTTP on 127.0.0.1 (a fresh server: the bundle's snapshot of the exposures before the test split, nothing else); the test split's exposures posted to `/events` in time order, interleaved with the test requests at their `ts` (every exposure logged before a request is posted before it, none at or after it); each request asks for `trace` and its stages' survivors are compared with the torch cascade of `cascade eval` (the item trend counted from every logged exposure). A near-tie at a quota's edge that onnxruntime and torch round apart counts as a difference (export/replay.py).",
        "",
        "| run | stages | trend | requests | events | " + " | ".join(f"same {s}" for s in STAGES) + " | every stage | final order | ms a request (client) | s |",
        "|---|---|---|---:|---:|" + "---:|" * (len(STAGES) + 4),
    ]
    for r in rows:
        trend = f"{r['online']['trend']['days']} days, {r['online']['trend']['scale']}"
        lines.append(f"| {r['run']} | {', '.join(f'{k}: {v}' for k, v in r['stages'].items())} | {trend} | {r['requests']:,} | {r['events']:,} | " + " | ".join(f"{r[f'same_{s}_survivors']:.4f}" for s in STAGES) + f" | {r['same_every_stage']:.4f} | {r['same_final_order']:.4f} | {1000 * r['seconds_http']['requests'] / r['requests']:.2f} | {r['seconds']:.0f} |")
    write_results("replay_ml1m", lines, {"runs": rows})


if __name__ == "__main__":
    main()
