"""MovieLens-1M benchmark: every model of benchmarks/configs/ml1m_ctr.yaml over 3 seeds, in one table beside
the published figures. (The recall tower's table is benchmarks/recall_ml1m.py's.)

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
from cascade.tasks.pointwise import train_pointwise
from teachers import BOOSTED, TEACHERS

from provenance import mean_std, provenance

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
    if exp.model.name in BOOSTED:
        return BOOSTED[exp.model.name](exp)  # train.seed is LightGBM's seed too
    return train_pointwise(exp, {**MODELS, **TEACHERS})


def write_tables(rows: dict[str, list[dict]], finished: dict[str, dict], args) -> None:
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
    meta = provenance()
    lines += ["", f"`{meta['command']}` at {meta['git_commit']}, {meta['date']}, {meta['machine']}"]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ml1m_ctr.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "ml1m_ctr.json").write_text(json.dumps({**meta, "runs": finished, "ctr": rows}, indent=2, default=float) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--models", nargs="+", default=ORDER)
    parser.add_argument("--runs", default="runs/bench")
    args = parser.parse_args()
    runs = ROOT / args.runs
    ctr = {e.name: e for e in load_config(ROOT / "configs" / "ml1m_ctr.yaml") if e.name in ORDER}
    saved = RESULTS / "ml1m_ctr.json"
    finished: dict[str, dict] = json.loads(saved.read_text()).get("runs", {}) if saved.exists() else {}
    rows: dict[str, list[dict]] = {}
    for seed in args.seeds:  # seed-major: one seed of every model first, then the next
        for name in [m for m in ORDER if m in args.models]:
            finished[f"{name}_s{seed}"] = result = run(ctr[name], seed, runs, finished)
            rows.setdefault(name, []).append(result)
            write_tables(rows, finished, args)
    print((RESULTS / "ml1m_ctr.md").read_text())


if __name__ == "__main__":
    main()
