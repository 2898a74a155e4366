"""Worlds where target attention matters: the headroom each setting of the knob leaves, and
whether a DIN teacher uses it.

    python benchmarks/ta_worlds.py [--requests 8000] [--items 8000] [--seeds 0] [--epochs 4] [--settings low middle high] [--name ta_worlds]

1. The truth alone (``cascade.data.synth.target_attention_world``, knob 0, 0.25, 0.5, 0.75, 1):
   on the test requests, the share of the catalog's best top-10 utility kept by ranking without
   the target-attention term and with its best one-vector fit (``World.oracle_ratios``); the
   headroom is 1 minus that. No model is trained.
2. The teacher (knob 0, 0.5 and 1: low, middle, high headroom): the DIN trained on the logged
   recall lists (200 items, unexposed as negatives: the quickstart's ranker) beside the same
   DIN whose attention is a plain mean of the history (``pooling: mean``), each ranking the test
   lists: oracle ratio (its top-10's true utility over the catalog's best), Recall@10 and
   NDCG@10 of the logged clicks. Where the two tie, no pre-ranker can show that it learned the
   interaction from this teacher. Both embed each history item by its id, category and style
   (``model.history_fields``); a third DIN sees the history's ids alone.

Writes benchmarks/results/ta_worlds.{md,json}.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from cascade.config import load_config
from cascade.data.synth import TA_HIGH, TA_LOW, generate, target_attention_world
from cascade.models import MODELS
from cascade.tasks import train_experiment
from provenance import mean_std, write_results
from teachers import TEACHERS

KNOBS = (0.0, 0.25, 0.5, 0.75, 1.0)
TEACHER_KNOBS = {"low": 0.0, "middle": 0.5, "high": 1.0}

CONFIG = """
base:
  data: {{kind: synth, dir: {data}, synth: {{target_attention: {knob}, users: {users}, items: {items}, requests: {requests}, seed: {seed}}}}}
  model: {{embedding_dim: 16}}
  train: {{epochs: {epochs}, batch_size: 1024, lr: 0.002, patience: 2, seed: {seed}, monitor: recall@10}}
  out: {out}
  task: distill
  distill: {{teacher: null, exposure_bce: 0, rankflow_bce: 1.0, prerank_quota: 50, rank_quota: 10, lists_per_batch: 32}}
experiments:
  din: {{model: {{name: din, history_fields: [category, style], params: {{attention_hidden: [32, 16], hidden: [64, 32], dropout: 0.0}}}}}}
  din_mean: {{model: {{name: din, history_fields: [category, style], params: {{attention_hidden: [32, 16], hidden: [64, 32], dropout: 0.0, pooling: mean}}}}}}
  din_ids: {{model: {{name: din, params: {{attention_hidden: [32, 16], hidden: [64, 32], dropout: 0.0}}}}}}
"""


def truth(args) -> list[dict]:
    rows = []
    for knob in KNOBS:
        start = time.perf_counter()
        ds, world = generate(target_attention_world(knob, users=args.users, items=args.items, requests=args.requests, seed=0))
        test = ds.requests["split"] == "test"
        ids, history = ds.requests["request_id"][test], ds.requests["history"][test]
        ratios = world.oracle_ratios(ids, 10, exclude=history)
        # the logged recall lists (200 a request, candidates sorted by request): what a ranker of them can keep
        logged = ds.candidates["item_id"][np.isin(ds.candidates["request_id"], ids)].reshape(len(ids), -1)
        in_lists = world.oracle_ratios(ids, 10, exclude=history, candidates=logged)
        exposed = ds.candidates["stage"] == 3
        rows.append({"knob": knob, "test_requests": int(test.sum()), "exposed_click_rate": float(ds.candidates["label"][exposed].mean()), **ratios, "in_lists": in_lists})
        print(f"  knob {knob}: catalog without target attention {ratios['no_target_attention']:.3f}, one user vector {ratios['one_user_vector']:.3f}; logged lists truth {in_lists['truth']:.3f}, one user vector {in_lists['one_user_vector']:.3f} ({time.perf_counter() - start:.0f}s)", flush=True)
    return rows


def teachers(args, tmp: Path) -> list[dict]:
    rows = []
    models = {**MODELS, **TEACHERS}
    for setting, knob in ((s, TEACHER_KNOBS[s]) for s in args.settings):
        for seed in args.seeds:
            path = tmp / f"{setting}_{seed}.yaml"
            path.write_text(CONFIG.format(data=tmp / f"data_{setting}_{seed}", knob=knob, users=args.users, items=args.items, requests=args.requests, seed=seed, epochs=args.epochs, out=tmp / f"runs_{setting}_{seed}"))
            for exp in load_config(path):
                start = time.perf_counter()
                result = train_experiment(exp, path, models)
                test = result["test"]
                rows.append({"setting": setting, "knob": knob, "seed": seed, "model": exp.name, "oracle_ratio": test["oracle_ratio"], "recall@10": test["recall@10"], "ndcg@10": test["ndcg@10"], "seconds": time.perf_counter() - start})
                print(f"  {setting} seed {seed} {exp.name}: oracle ratio {test['oracle_ratio']:.4f} recall@10 {test['recall@10']:.4f} ({rows[-1]['seconds']:.0f}s)", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--items", type=int, default=8000)
    parser.add_argument("--requests", type=int, default=8000)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--settings", nargs="+", choices=tuple(TEACHER_KNOBS), default=list(TEACHER_KNOBS), help="the teacher comparison's settings")
    parser.add_argument("--name", default="ta_worlds", help="benchmarks/results/NAME.{md,json}")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ta-worlds."))
    try:
        print("[1/2] the truth alone", flush=True)
        headroom = truth(args)
        print("[2/2] the DIN teacher, attention against mean pooling", flush=True)
        din = teachers(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report(args, headroom, din)


def report(args, headroom: list[dict], din: list[dict]) -> None:
    knob_names = ", ".join(f"{k} {TA_LOW[k]} -> {TA_HIGH[k]}" for k in TA_LOW)
    lines = [
        f"Worlds of {args.users:,} users, {args.items:,} items and {args.requests:,} requests from `target_attention_world(knob)` ({knob_names}). "
        "The truth alone, on the test requests over the whole catalog (history excluded): the share of the best top-10 utility "
        "kept by ranking without the target-attention term, and with the term fitted on one vector per request (the normalised "
        "mean style of its window; the best a single user vector can carry). Headroom = 1 - that share.",
        "",
        "| knob | test requests | exposed click rate | kept without target attention | kept with one user vector | headroom (one vector) | logged lists: truth | logged lists: without the term | logged lists: one user vector |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *(f"| {r['knob']} | {r['test_requests']:,} | {r['exposed_click_rate']:.3f} | {r['no_target_attention']:.3f} | {r['one_user_vector']:.3f} | {1 - r['one_user_vector']:.3f} | {r['in_lists']['truth']:.3f} | {r['in_lists']['no_target_attention']:.3f} | {r['in_lists']['one_user_vector']:.3f} |" for r in headroom),
        "",
        "The last three columns rank only each test request's logged recall list (200 items), still against the catalog's best: "
        "what a ranker of those lists can keep with the truth, without the term, and with one user vector.",
        "",
        f"The DIN teacher at three settings (low: knob 0, middle: 0.5, high: 1), trained {args.epochs} epochs on the logged recall lists "
        f"(200 items, unexposed as negatives), each history item embedded by its id, category and style (`model.history_fields`), beside "
        f"the same DIN with the attention replaced by the mean of the history, and a DIN that sees the history's ids alone; each ranks the "
        f"test lists. Seeds {', '.join(map(str, args.seeds))}; mean ± std over seeds where there are several.",
        "",
        "| setting | knob | DIN oracle ratio | mean-pooled oracle ratio | ids-only DIN oracle ratio | DIN Recall@10 | mean-pooled Recall@10 | ids-only DIN Recall@10 | DIN NDCG@10 | mean-pooled NDCG@10 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for setting, knob in ((s, TEACHER_KNOBS[s]) for s in args.settings):
        of = lambda model, key: mean_std([r[key] for r in din if r["setting"] == setting and r["model"] == model])  # noqa: E731
        lines.append(f"| {setting} | {knob} | {of('din', 'oracle_ratio')} | {of('din_mean', 'oracle_ratio')} | {of('din_ids', 'oracle_ratio')} | {of('din', 'recall@10')} | {of('din_mean', 'recall@10')} | {of('din_ids', 'recall@10')} | {of('din', 'ndcg@10')} | {of('din_mean', 'ndcg@10')} |")
    print("\n".join(lines))
    write_results(args.name, ["# Worlds where target attention matters", "", *lines], {"headroom": headroom, "teachers": din, "ta_low": TA_LOW, "ta_high": TA_HIGH})


if __name__ == "__main__":
    main()
