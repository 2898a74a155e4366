"""Distil from the blended rank stage, or from the DIN alone? configs/ml1m.yaml's two distilled
pre-rankers (``listwise_kd``: teacher the DIN; ``listwise_kd_blend``: teacher ``din_trend``, the
DIN z-blended with the item trend, i.e. the rank stage itself), each at several seeds against
the same frozen teachers (the config's own runs), each in the same cascade: recall top-200 ->
the student's top-50 -> the blended rank stage's top-10.

    python benchmarks/teacher_stage_ml1m.py [--config configs/ml1m.yaml] [--seeds 0 1 2]

Seed 0 is the config's own runs (`cascade run configs/ml1m.yaml`); another seed trains the
student and its cascade as NAME_sSEED under runs/bench_seeds/ml1m (``provenance.seeded``).
Reported on test: joint recall (the real positives that survive every quota) and teacher
Recall@10@50 against the blended rank stage, mean ± std over seeds.
Writes benchmarks/results/teacher_stage_ml1m.{md,json}.
"""

from __future__ import annotations

import argparse
import json

from cascade.config import load_config
from cascade.tasks import train_experiment
from cascade.models import MODELS
from teachers import TEACHERS

from provenance import ROOT, mean_std, seeded, write_results

PAIRS = {"listwise_kd": "cascade_distilled", "listwise_kd_blend": "cascade_blend"}  # student -> its cascade
FIGURES = ("joint_recall", "teacher_recall@10@50", "positives_after_prerank")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/ml1m.yaml")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    args = parser.parse_args()
    config = ROOT / args.config
    exps = {e.name: e for e in load_config(config)}
    models = {**MODELS, **TEACHERS}
    rows: dict[str, list[dict]] = {}
    for seed in args.seeds:
        students = {name: seeded(exps[name], seed) for name in PAIRS}
        # a cascade's pre-rank stage is the student at this seed; the rank stage (and every
        # teacher) stays the config's own run
        named = lambda e: students.get(e.name, e)  # noqa: E731
        for name, cascade_name in PAIRS.items():
            if not (students[name].run_dir / "results.json").exists():
                train_experiment(students[name], config, models)
            cascade = seeded(exps[cascade_name], seed)
            done = cascade.run_dir / "results.json"
            result = json.loads(done.read_text()) if done.exists() else train_experiment(cascade, config, models, named=named)
            test = result["rounds"][0]["test"]
            rows.setdefault(name, []).append({"seed": seed} | {k: test[k] for k in FIGURES})
            print(f"seed {seed} {name}: " + " ".join(f"{k} {test[k]:.4f}" for k in FIGURES), flush=True)
    teachers = {name: exps[name].distill.teacher for name in PAIRS}
    lines = [
        "# Distilling from the rank stage (a blend) or from the DIN alone, MovieLens-1M",
        "",
        f"`{args.config}`: recall top-200 -> the student's top-50 -> the blended rank stage (`din_trend`) top-10, test split (9,350 requests). Students at seeds {', '.join(map(str, args.seeds))} against the same frozen teachers (the config's seed-0 runs); mean ± std over seeds.",
        "",
        "| student | teacher | joint recall | teacher Recall@10@50 (vs the rank stage) | positives after pre-rank | seeds |",
        "|---|---|---:|---:|---:|---:|",
        *[f"| {name} | {teachers[name]} | {mean_std([r['joint_recall'] for r in rs])} | {mean_std([r['teacher_recall@10@50'] for r in rs])} | {mean_std([r['positives_after_prerank'] for r in rs])} | {len(rs)} |" for name, rs in rows.items()],
    ]
    write_results("teacher_stage_ml1m", lines, {"config": args.config, "teachers": teachers, "rows": rows})


if __name__ == "__main__":
    main()
