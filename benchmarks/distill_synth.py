"""Distillation on the synthetic world: one row per loss mix of benchmarks/configs/distill_synth.yaml
(``distill_ml1m.py`` runs the same on MovieLens-1M).

    python benchmarks/distill_synth.py [--config benchmarks/configs/distill_synth.yaml] [--seeds 0 1 2] [--runs runs/bench_NAME]
        [--mixes EXPERIMENT ...] [--name NAME]

(the enhanced towers alone and distilled, issue 12:
``--mixes exposure_bce listwise_kd exposure_bce_senet listwise_kd_senet exposure_bce_dat listwise_kd_dat
exposure_bce_hit listwise_kd_hit exposure_bce_inttower listwise_kd_inttower --name towers_synth``)

Screens every mix with seed 0, then trains with every seed each student's exposure-BCE baseline
and best mix, and the best two mixes overall (by validation Recall@10@50 against the teacher). All mixes share the frozen
recall output and the one frozen teacher. Resumable: a finished run (its results.json) is read,
not rerun, and the table is rewritten after every run.
Writes benchmarks/results/NAME.{md,json} (distill_synth by default).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from cascade.config import load_config
from cascade.tasks.distill import train_distill
from cascade.models import MODELS
from teachers import TEACHERS

from provenance import mean_std, write_results

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TERMS = ("exposure_bce", "rankflow_bce", "tutor", "arf", "listwise_kd", "logit_mse", "soft_bce")


def is_baseline(distill: dict) -> bool:
    """Exposure BCE alone: the independent baseline each student model is compared with."""
    return distill["exposure_bce"] > 0 and not any(distill[t] for t in TERMS[1:])


def run(exp, teacher_exp, seed: int, runs: Path) -> dict:
    exp = replace(exp, name=f"{exp.name}_s{seed}", out=str(runs), train=replace(exp.train, seed=seed))
    done = exp.run_dir / "results.json"
    if done.exists():
        return json.loads(done.read_text())
    return train_distill(exp, teacher_exp, {**MODELS, **TEACHERS})


def write(rows: dict[str, list[dict]], args, name: str) -> None:
    any_row = next(iter(rows.values()))[0]
    k, m = any_row["distill"]["rank_quota"], any_row["distill"]["prerank_quota"]
    key = f"teacher_recall@{k}@{m}"
    base = {rs[0]["model"]: [r["test"][key] for r in rs] for rs in rows.values() if is_baseline(rs[0]["distill"])}
    lines = [
        f"# Distillation ({args.config}): pre-rank top-{m} -> rank (the teacher) top-{k}",
        "",
        f"| loss mix | student | seeds | Recall@{k}@20 vs teacher | Recall@{k}@{m} vs teacher | teacher top-{k} misses at {m}, vs exposure BCE | Recall@{k} (real positives) | NDCG@{k} | oracle ratio | best epoch | s / epoch |",
        "|---|---|---:|---|---|---:|---|---|---|---:|---:|",
    ]
    oracle = lambda t: mean_std([x["oracle_ratio"] for x in t]) if all("oracle_ratio" in x for x in t) else "-"  # noqa: E731
    lines += [
    ]
    for mix, rs in rows.items():
        t = [r["test"] for r in rs]
        b = base.get(rs[0]["model"])
        cut = f"{(1 - np.mean([x[key] for x in t])) / (1 - np.mean(b)) - 1:+.1%}" if b else "-"
        lines.append(
            f"| {mix} | {rs[0]['model']} | {len(rs)} | {mean_std([x[f'teacher_recall@{k}@20'] for x in t])} | {mean_std([x[key] for x in t])} | {cut} | "
            f"{mean_std([x[f'recall@{k}'] for x in t])} | {mean_std([x[f'ndcg@{k}'] for x in t])} | {oracle(t)} | "
            f"{', '.join(str(r['best_epoch']) for r in rs)} | {np.mean([r['seconds_per_epoch'] for r in rs]):.1f} |"
        )
    ref = any_row["reference"]
    lines += ["", "Reference flows over the same lists (no training):", "", f"| pre-ranker | Recall@{k}@{m} vs teacher | Recall@{k} (real positives) | oracle ratio |", "|---|---|---|---|"]
    for label, r in (("the teacher itself", ref["teacher_as_preranker"]), ("the logged production pre-ranker", ref["logged_preranker"])):
        lines.append(f"| {label} | {r[key]:.4f} | {r[f'recall@{k}']:.4f} | {r['oracle_ratio']:.4f} |" if "oracle_ratio" in r else f"| {label} | {r[key]:.4f} | {r[f'recall@{k}']:.4f} | - |")
    lines += [
        "",
        f"Test split, mean ± population std over seeds. Misses = 1 - Recall@{k}@{m}; the column is their relative",
        "change against the same student's exposure-BCE baseline (the target is <= -25%). Recall@k / NDCG@k count the real",
        "(logged) clicks in the final top-k out of all clicks of the list; clicks exist only among the logged",
        "exposures, so this metric favours copying the logged cascade. The oracle ratio is the true click",
        "utility of the final top-k over the best top-k of the whole catalog (history excluded).",
    ]
    write_results(name, lines, {"rows": rows})


def main(name: str = "distill_synth", config: str = "benchmarks/configs/distill_synth.yaml") -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default=config)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--runs", default=None, help="where the runs go (default runs/bench_NAME)")
    parser.add_argument("--mixes", nargs="+", help="only these experiments of the config (default: every one the din teacher teaches)")
    parser.add_argument("--name", default=name, help="the results' name: benchmarks/results/NAME.{md,json}")
    args = parser.parse_args()
    name, args.runs = args.name, args.runs or f"runs/bench_{args.name}"
    experiments = {e.name: e for e in load_config(ROOT / args.config)}
    # every mix taught by the one DIN teacher (other teachers' students are run on their own)
    mixes = {n: e for n, e in experiments.items() if e.task == "distill" and e.distill.teacher == "din" and (not args.mixes or n in args.mixes)}
    unknown = sorted(set(args.mixes or ()) - set(mixes))
    if unknown:
        parser.error(f"--mixes: {', '.join(unknown)} not among {args.config}'s experiments taught by din")
    teacher = experiments["din"]
    runs = ROOT / args.runs
    rows: dict[str, list[dict]] = {}
    for mix, exp in mixes.items():  # the screen: seed 0 of every mix
        rows[mix] = [run(exp, teacher, args.seeds[0], runs)]
        write(rows, args, name)
    key = lambda mix: rows[mix][0]["valid"][f"teacher_recall@{exp.distill.rank_quota}@{exp.distill.prerank_quota}"]  # noqa: E731
    baselines = [m for m in mixes if is_baseline(rows[m][0]["distill"])]
    ranked = sorted((m for m in mixes if m not in baselines), key=key, reverse=True)
    # the best two overall, and the best of each student model
    best = dict.fromkeys(ranked[:2] + [next(m for m in ranked if mixes[m].model.name == mixes[b].model.name) for b in baselines])
    for seed in args.seeds[1:]:
        for mix in [*baselines, *best]:
            rows[mix].append(run(mixes[mix], teacher, seed, runs))
            write(rows, args, name)
    print((RESULTS / f"{name}.md").read_text())


if __name__ == "__main__":
    main()
