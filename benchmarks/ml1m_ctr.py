"""MovieLens-1M benchmark: every model of configs/ml1m_ctr.yaml over 3 seeds, and the recall
tower of configs/ml1m_recall.yaml, in one table beside the published figures.

    python benchmarks/ml1m_ctr.py [--seeds 0 1 2] [--models dssm inttower ...] [--runs runs/bench]

Resumable: a finished run (its results.json) is read, not rerun; an interrupted one resumes
from its last.pt. The table is rewritten after every finished run, so a session that ends
mid-way loses nothing. Writes benchmarks/results/ml1m_ctr.{md,json}.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from cascade.config import load_config
from cascade.models import MODELS
from cascade import metrics as M
from cascade.data.lists import build_lists
from cascade.evaluate import most_popular, popularity
from cascade.pipeline import prepare_data, train_pointwise, train_recall
from teachers import BOOSTED, TEACHERS

from provenance import provenance

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# Published ML-1M test AUCs: IntTower paper Table 2 and HIT paper Table 2. Their mean-rating
# features were computed on each split from that split's own labels (test labels included).
PUBLISHED = {"dssm": 0.8697, "dat": 0.8712, "inttower": 0.8974, "hit": 0.9048}
ORDER = ["dssm", "senet", "dat", "inttower", "hit", "din", "gbdt"]


def run(exp, seed: int, runs: Path, finished: dict[str, dict]) -> dict:
    key = f"{exp.name}_s{seed}"
    if key in finished:  # committed in benchmarks/results/ml1m_ctr.json by an earlier session
        return finished[key]
    exp = replace(exp, train=replace(exp.train, seed=seed), out=str(runs / exp.out.split("/")[-1]), name=key)
    done = exp.run_dir / "results.json"
    if done.exists() and "test" in json.loads(done.read_text()):
        return json.loads(done.read_text())
    if exp.task == "recall":
        return train_recall(exp)
    if exp.model.name in BOOSTED:
        return BOOSTED[exp.model.name](exp)  # train.seed is LightGBM's seed too
    return train_pointwise(exp, {**MODELS, **TEACHERS})


def most_popular_recall(exp) -> dict:
    """Most-popular recall (``evaluate.most_popular``) on the test requests of ``exp``'s data,
    scored as ``recall.evaluate_recall`` scores a tower."""
    ds = prepare_data(exp.data)
    lists = build_lists(ds, "test")
    positives = np.where(lists.mask & (lists.label > 0), lists.item["item_id"], 0)
    top = most_popular(lists, popularity(ds), ds.items["item_id"], 200)
    return {"test": {f"recall@{k}": M.retrieval_recall(top[:, :k], positives) for k in (50, 200)}}


def mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{np.mean(values):.4f} ± {np.std(values):.4f}" if len(values) > 1 else f"{values[0]:.4f}"


def write_tables(rows: dict[str, list[dict]], recall_rows: dict[str, list[dict]], finished: dict[str, dict], args) -> None:
    dssm = [r["test"]["auc"] for r in rows.get("dssm", [])]
    lines = [
        "# MovieLens-1M, `ctr` protocol (leak-free)",
        "",
        "| model | seeds | test AUC | test LogLoss | RelaImpr vs our DSSM | parameters | s / epoch | train samples / s | published AUC (leaky features) |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for name in [m for m in ORDER if m in rows] + [m for m in rows if m not in ORDER]:
        rs = rows[name]
        aucs = [r["test"]["auc"] for r in rs]
        rel = f"{(np.mean(aucs) - 0.5) / (np.mean(dssm) - 0.5) - 1:+.2%}" if dssm else "-"
        params = rs[0].get("parameters", rs[0].get("trees", "-"))
        params = f"{params:,}" if isinstance(params, int) else params
        sec = [r.get("seconds_per_epoch") or r.get("train_seconds") for r in rs]
        sps = [r.get("train_samples_per_s") for r in rs]
        lines.append(
            f"| {name} | {len(rs)} | {mean_std(aucs)} | {mean_std([r['test']['logloss'] for r in rs])} | {rel} | {params} | "
            f"{np.mean([s for s in sec if s]):.1f} | {f'{np.mean([s for s in sps if s]):,.0f}' if any(sps) else '-'} | {PUBLISHED.get(name, '-')} |"
        )
    lines += [
        "",
        "Test AUC and LogLoss: mean ± std over seeds (population std). Every model sees the same",
        "features: user id, gender, age, occupation, zip, the user's 50 latest training positives",
        "(target removed), movie id, genres, and user / item mean rating from training rows only,",
        "out-of-fold for the training rows. The published figures computed mean ratings on each",
        "split from its own labels, test labels included, so they are not comparable as they stand.",
        "For `gbdt` the parameters column holds the number of trees and s / epoch the whole fit.",
    ]
    if recall_rows:
        lines += ["", "# Recall tower, MovieLens-1M `cascade` protocol (temporal)", "", "| experiment | seeds | Recall@50 | Recall@200 |", "|---|---:|---|---|"]
        for name, rs in recall_rows.items():
            lines.append(f"| {name} | {len(rs)} | {mean_std([r['test']['recall@50'] for r in rs])} | {mean_std([r['test']['recall@200'] for r in rs])} |")
        lines += [
            "",
            "Retrieval from the whole catalog (3,883 movies) minus the request's history; positives = the",
            "request's ratings >= 4. Mean over test requests with a positive. most_popular: the built-in",
            "baseline of `cascade eval` (the items with the most training-split positives, the request's",
            "history excluded; no training, so no seeds), computed in this run on the same test requests.",
        ]
    meta = provenance()
    lines += ["", f"`{meta['command']}` at {meta['git_commit']}, {meta['date']}, {meta['machine']}"]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ml1m_ctr.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "ml1m_ctr.json").write_text(json.dumps({**meta, "runs": finished, "ctr": rows, "recall": recall_rows}, indent=2, default=float) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--models", nargs="+", default=ORDER + ["recall"])
    parser.add_argument("--runs", default="runs/bench")
    args = parser.parse_args()
    runs = ROOT / args.runs
    ctr = {e.name: e for e in load_config(ROOT / "configs" / "ml1m_ctr.yaml") if e.name in ORDER}
    recall = {e.name: e for e in load_config(ROOT / "configs" / "ml1m_recall.yaml")}
    saved = RESULTS / "ml1m_ctr.json"
    finished: dict[str, dict] = json.loads(saved.read_text()).get("runs", {}) if saved.exists() else {}
    rows: dict[str, list[dict]] = {}
    recall_rows: dict[str, list[dict]] = {}
    if "recall" in args.models:
        recall_rows["most_popular"] = [most_popular_recall(next(iter(recall.values())))]
    for seed in args.seeds:  # seed-major: one seed of every model first, then the next
        for table, experiments in ((rows, {m: ctr[m] for m in ORDER if m in args.models}), (recall_rows, recall if "recall" in args.models else {})):
            for name, exp in experiments.items():
                finished[f"{name}_s{seed}"] = result = run(exp, seed, runs, finished)
                table.setdefault(name, []).append(result)
                write_tables(rows, recall_rows, finished, args)
    print((RESULTS / "ml1m_ctr.md").read_text())


if __name__ == "__main__":
    main()
