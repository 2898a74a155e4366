"""The recall stage on MovieLens-1M (`cascade` protocol, temporal): every experiment of
configs/ml1m_recall.yaml over seeds, beside the built-in baselines computed in the same run on the
same test requests: most-popular (training positives) and trending (the most exposed items in the
days before each request, the window chosen on validation).

    python benchmarks/recall_ml1m.py [--seeds 0 1 2] [--experiments dssm_inbatch ...] [--runs runs/bench]

Resumable: a finished run (its results.json) is read, not rerun. The table is rewritten after
every run. Writes benchmarks/results/recall_ml1m.{md,json}.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from cascade import metrics as M
from cascade.config import load_config
from cascade.data.lists import build_lists
from cascade.data.trend import ItemTrend
from cascade.eval_data import popularity
from cascade.evaluate import most_popular, trending, trending_days
from cascade.tasks.recall import task_logs, train_recall

from provenance import mean_std, provenance

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
KS = (50, 200)


def baselines(exp) -> dict[str, dict]:
    """Most-popular and trending recall on ``exp``'s data, valid and test, scored as
    ``recall.evaluate_recall`` scores a tower (history excluded, mean over requests)."""
    ds = task_logs(exp.data, whole=True)[0]
    trend, catalog = ItemTrend.from_dataset(ds), ds.items["item_id"]
    split = {s: build_lists(ds, s) for s in ("valid", "test")}
    truth = {s: lists.positive_ids for s, lists in split.items()}

    def score(top: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
        return {s: {f"recall@{k}": M.retrieval_recall(top[s][:, :k], truth[s]) for k in KS} for s in split}

    popular = score({s: most_popular(lists, popularity(ds), catalog, max(KS)) for s, lists in split.items()})
    days = trending_days([split["valid"]], trend, catalog, max(KS))
    return {"most_popular": popular, f"trending ({days} days, chosen on valid)": score({s: trending(lists, trend, catalog, max(KS), days) for s, lists in split.items()})}


def run(exp, seed: int, runs: Path) -> dict:
    exp = replace(exp, name=f"{exp.name}_s{seed}", out=str(runs), train=replace(exp.train, seed=seed), recall=replace(exp.recall, seed=seed))
    done = exp.run_dir / "results.json"
    return json.loads(done.read_text()) if done.exists() else train_recall(exp)


def write(rows: dict[str, list[dict]], experiments: dict) -> None:
    lines = [
        "# The recall stage, MovieLens-1M `cascade` protocol (temporal)",
        "",
        "| recall | seeds | best epoch | valid Recall@200 | test Recall@50 | test Recall@200 |",
        "|---|---:|---|---|---|---|",
    ]
    for name, rs in rows.items():
        trained = "best_epoch" in rs[0]  # a tower, not a baseline
        epochs = ", ".join(str(r["best_epoch"]) for r in rs) if trained else "-"
        cells = [mean_std([r[s][f"recall@{k}"] for r in rs]) for s, k in (("valid", 200), ("test", 50), ("test", 200))]
        lines.append(f"| {name} | {len(rs) if trained else '-'} | {epochs} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Retrieval from the whole catalog (3,883 movies) minus the request's history; positives = the",
        "request's ratings >= 4; Recall@k is the mean over requests with a positive. Towers: mean ± std",
        "over seeds, each stopped on valid Recall@200. most_popular: the items with the most",
        "training-split positives; trending: the items most exposed in the window before the request.",
        "Both are `cascade eval`'s built-in baselines, computed in this run on the same requests.",
        "",
        "Experiments (configs/ml1m_recall.yaml):",
        "",
    ]
    lines += [f"- `{name}`: recall {json.dumps(vars(e.recall), default=str)}, drop_fields {list(e.model.drop_fields)}" for name, e in experiments.items()]
    meta = provenance()
    lines += ["", f"`{meta['command']}` at {meta['git_commit']}, {meta['date']}, {meta['machine']}"]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "recall_ml1m.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "recall_ml1m.json").write_text(json.dumps({**meta, "rows": rows}, indent=2, default=float) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--experiments", nargs="+", help="default: every experiment of configs/ml1m_recall.yaml")
    parser.add_argument("--runs", default="runs/bench")
    args = parser.parse_args()
    experiments = {e.name: e for e in load_config(ROOT / "configs" / "ml1m_recall.yaml") if not args.experiments or e.name in args.experiments}
    rows: dict[str, list[dict]] = {name: [row] for name, row in baselines(next(iter(experiments.values()))).items()}
    for seed in args.seeds:  # seed-major: one seed of every experiment first
        for name, exp in experiments.items():
            rows.setdefault(name, []).append(run(exp, seed, ROOT / args.runs / "ml1m_recall"))
            write(rows, experiments)
    print((RESULTS / "recall_ml1m.md").read_text())


if __name__ == "__main__":
    main()
