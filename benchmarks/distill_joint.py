"""The whole cascade, trained jointly or not: one row per ``task: cascade`` experiment of a config
(recall tower over the catalog -> pre-rank top-m -> rank top-k), compared on joint recall.

    python benchmarks/distill_joint.py [--config benchmarks/configs/distill_synth.yaml] [--seeds 0] [--device cpu] [--only NAME[@SEEDS] ...]

A seed seeds the whole cascade but its recall tower: the warm-up pre-rank and rank stages (and a
distilled pre-ranker's teacher) are the config's experiments at that seed (the config's own run
folder at its own seed, else runs/bench_seeds/, shared with benchmarks/trend_ml1m.py), and the
joint training. Recall is the tower that made the lists the stages were trained on. Resumable: a finished run (its results.json) is read,
and a stopped one resumes phase by phase. The table is rewritten after every run.
Writes benchmarks/results/NAME_joint.{md,json}, NAME the config's file name.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from cascade.config import load_config
from cascade.tasks import train_experiment
from cascade.models import MODELS
from teachers import TEACHERS

from provenance import mean_std, provenance, seeded, write_results

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def run(exp, config: Path, seed: int, runs: Path, device: str) -> dict:
    exp = replace(exp, name=f"{exp.name}_s{seed}", out=str(runs), train=replace(exp.train, seed=seed, device=device))
    done = exp.run_dir / "results.json"
    if done.exists():
        return json.loads(done.read_text())
    result = train_experiment(exp, config, {**MODELS, **TEACHERS}, named=lambda e: seeded(e, seed))
    result["machine"] = provenance()["machine"]  # rows of one table may come from different machines
    done.write_text(json.dumps(result, indent=2, default=float) + "\n")
    return result


def write(rows: dict[str, list[dict]], name: str, config: str) -> None:
    cfg = next(iter(rows.values()))[0]["cascade"]
    n, m, k = cfg["recall_quota"], cfg["prerank_quota"], cfg["rank_quota"]
    lines = [
        f"# The whole cascade ({config}): recall top-{n} of the catalog -> pre-rank top-{m} -> rank top-{k}",
        "",
        f"| experiment | method | after | seeds | positives retrieved (top-{n}) | after pre-rank (top-{m}) | joint recall (final top-{k}) | Recall@{k}@{m}, pre-ranker vs this ranker | NDCG@{k} (listed positives) | oracle ratio | minutes | machine |",
        "|---|---|---|---:|---|---|---|---|---|---|---:|---|",
    ]
    first_starts = [r["rounds"][0]["test"] for r in next(iter(rows.values()))]  # per seed
    for exp_name, rs in rows.items():
        for i, after in enumerate(row["after"] for row in rs[0]["rounds"]):
            if i == 0 and rs[0]["method"] != "frozen" and [r["rounds"][0]["test"] for r in rs] == first_starts:
                continue  # it starts from the first row's warm-up cascade
            t = [r["rounds"][i]["test"] for r in rs]
            key = f"round{i}" if rs[0]["method"] == "rankflow" else "lcron"
            minutes = np.mean([r["seconds"].get(key, np.nan) for r in rs]) / 60 if i > 0 else np.nan
            oracle = mean_std([x["oracle_ratio"] for x in t]) if "oracle_ratio" in t[0] else "-"
            lines.append(
                f"| {exp_name} | {rs[0]['method']} ({rs[0]['stages']['prerank']}) | {after} | {len(rs)} | {mean_std([x['positives_retrieved'] for x in t])} | "
                f"{mean_std([x['positives_after_prerank'] for x in t])} | {mean_std([x['joint_recall'] for x in t])} | {mean_std([x[f'teacher_recall@{k}@{m}'] for x in t])} | "
                f"{mean_std([x[f'ndcg@{k}'] for x in t])} | {oracle} | {'-' if np.isnan(minutes) else f'{minutes:.1f}'} | {rs[0].get('machine', '-')} |"
            )
    lines += [
        "",
        "Test split. Positives retrieved / after pre-rank / joint recall: the share of each request's logged positives",
        "still alive after each stage (a positive recall never retrieved is lost), mean over requests with a positive.",
        "Recall@k@m: the pre-ranker's top-m against the top-k of this cascade's own ranker (RankFlow retrains the ranker).",
        "Oracle ratio (synthetic world): true click utility of the final top-k over the best top-k of the catalog.",
        "Minutes: wall time of the round's training (stage data regeneration, scoring and every phase), not the reports.",
        "A trained method's start row is shown only where it differs from the first row's (a warm-up retrained elsewhere).",
    ]
    write_results(name, lines, {"rows": rows})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="benchmarks/configs/distill_synth.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", nargs="+", help="only these experiments; NAME@0,1 runs NAME at its own seeds")
    args = parser.parse_args()
    config = ROOT / args.config
    name = f"{config.stem}_joint"
    only: dict[str, str] = {}
    for x in args.only or []:  # NAME@0 NAME@1 is NAME@0,1
        exp_name, _, seeds = x.partition("@")
        only[exp_name] = ",".join(s for s in (only.get(exp_name), seeds) if s)
    experiments = [e for e in load_config(config) if e.task == "cascade" and (not only or e.name in only)]
    runs = ROOT / "runs" / f"bench_{name}"
    rows: dict[str, list[dict]] = {}
    for exp in experiments:
        seeds = [int(s) for s in only[exp.name].split(",")] if only.get(exp.name) else args.seeds
        rows[exp.name] = [run(exp, config, seed, runs, args.device) for seed in seeds]
        write(rows, name, args.config)
    print((RESULTS / f"{name}.md").read_text())


if __name__ == "__main__":
    main()
