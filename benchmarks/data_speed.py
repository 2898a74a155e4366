"""Speed of the foundation: world generation, validation, MovieLens-1M conversion, metrics.

    python benchmarks/data_speed.py [--ml1m ../shared/data/ml-1m]

Targets (issue 2): the default synthetic world generates in under 30 s; metrics run on a
million rows without per-row Python. Writes benchmarks/results/data_speed.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from cascade import metrics as M
from cascade.data.lists import build_lists, pointwise_lists
from cascade.data.movielens import convert
from cascade.data.store import read_dataset, write_dataset
from cascade.data.synth import WORLD_FILE, WorldConfig, generate

from provenance import provenance

RESULTS = Path(__file__).parent / "results"


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ml1m", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-1m")
    args = parser.parse_args()
    rows: list[tuple[str, str, float, str]] = []  # (step, size, seconds, target)

    with tempfile.TemporaryDirectory() as tmp:
        (ds, world), s = timed(lambda: generate(WorldConfig()))
        n_cand = len(ds.candidates["item_id"])
        rows.append(("synthetic world: generate (default config)", f"{n_cand:,} candidates", s, "< 30 s"))
        _, s = timed(lambda: write_dataset(ds, Path(tmp) / "world", {WORLD_FILE: world.to_bytes()}))
        rows.append(("synthetic world: validate + write parquet", f"{n_cand:,} candidates", s, ""))
        ds, s = timed(lambda: read_dataset(Path(tmp) / "world"))
        rows.append(("synthetic world: read + validate", f"{n_cand:,} candidates", s, ""))
        lists, s = timed(lambda: build_lists(ds, "train"))
        rows.append(("synthetic world: train lists", f"{lists.mask.shape[0]:,} x {lists.mask.shape[1]}", s, ""))

    if (args.ml1m / "ratings.dat").exists():
        converted = {}
        for protocol in ("ctr", "cascade"):
            (converted[protocol], _), s = timed(lambda: convert(args.ml1m, protocol))
            rows.append((f"MovieLens-1M: convert, protocol {protocol}", f"{len(converted[protocol].candidates['item_id']):,} candidates", s, ""))
        flat, s = timed(lambda: pointwise_lists(converted["ctr"], "train"))
        rows.append(("MovieLens-1M ctr: pointwise train batch", f"{len(flat):,} samples", s, ""))
    else:
        print(f"MovieLens-1M not found at {args.ml1m}: its rows are left out", file=sys.stderr)

    rng = np.random.default_rng(0)
    n = 1_000_000
    y, sc, g = rng.integers(0, 2, n), rng.normal(size=n).round(2), rng.integers(0, 6000, n)
    _, s = timed(lambda: M.auc(y, sc))
    rows.append(("metrics: auc (ties at half credit)", "1,000,000 rows", s, "no per-row Python"))
    _, s = timed(lambda: M.gauc(y, sc, g))
    rows.append(("metrics: gauc", "1,000,000 rows, 6,000 groups", s, ""))
    S, T = rng.normal(size=(10_000, 100)).round(1), rng.normal(size=(10_000, 100))
    Y, mask = rng.integers(0, 2, (10_000, 100)), rng.random((10_000, 100)) < 0.9
    for name, fn in (
        ("recall@10", lambda: M.recall_at_k(S, Y, 10, mask)),
        ("hitrate@10", lambda: M.hit_rate_at_k(S, Y, 10, mask)),
        ("ndcg@10", lambda: M.ndcg_at_k(S, Y, 10, mask)),
        ("teacher recall@10@50", lambda: M.teacher_recall_at_k_at_m(S, T, 10, 50, mask)),
        ("kendall tau-b", lambda: M.kendall_tau(S, T, mask)),
        ("joint recall 50 -> 10", lambda: M.joint_recall([T, S], [50, 10], Y, mask)),
    ):
        _, s = timed(fn)
        rows.append((f"metrics: {name}", "10,000 x 100 lists", s, ""))

    meta = provenance()
    table = ["| step | size | seconds | target |", "|---|---|---:|---|"]
    table += [f"| {a} | {b} | {c:.2f} | {d} |" for a, b, c, d in rows]
    md = "# data_speed\n\n" + "\n".join(table) + f"\n\n`{meta['command']}` at {meta['git_commit']}, {meta['date']}, {meta['machine']}\n"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "data_speed.md").write_text(md)
    (RESULTS / "data_speed.json").write_text(json.dumps({**meta, "rows": [dict(step=a, size=b, seconds=round(c, 3), target=d) for a, b, c, d in rows]}, indent=2) + "\n")
    print(md)


if __name__ == "__main__":
    main()
