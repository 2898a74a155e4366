"""The pre-ranking frontier: every pre-ranker distilled from one DIN, quality against cost.

    python benchmarks/prerank_frontier.py [--settings high] [--seeds 0 1 2] [--students dssm ... cold] [--epochs 4] [--name prerank_frontier]
    python benchmarks/prerank_frontier.py --settings ml1m --name prerank_frontier_ml1m

On a target-attention world (``target_attention_world``: low, middle or high headroom, 8,000
requests over 8,000 items), a DIN ranker is trained on the logged recall lists (200 items,
unexposed as negatives; each history item embedded by its id, category and style), and every
pre-ranker is distilled from it on the same lists (listwise KD). Each student is then the
pre-ranker of a cascade 200 -> 50 -> 10 whose ranker is the DIN. The setting ``ml1m`` runs the same
students on MovieLens-1M's list-scale stages instead: configs/ml1m.yaml's lists (the recall
tower's top-200 of the catalog, the items' trend on each candidate) and its DIN ranker (trained
here per seed; MovieLens items have no single-valued field for the history, and no truth, so no
oracle ratio):

- quality: teacher Recall@10@m (the DIN's top-10 of the 200 inside the student's top-m, m = 10,
  20, 50), Recall@10 of the real clicks after the DIN's cut (joint recall 200 -> 50 -> 10), and
  the oracle ratio (the true utility of the final 10 over the catalog's best);
- cost (first seed, measured right after it): matmul FLOPs per candidate (``evaluate.flops_per_candidate``) at 200 and
  1,000 candidates, and the ms one request takes through the exported pre-rank stage
  (onnxruntime, one thread, the item side cached where it can be) at 200 and 1,000 candidates,
  beside this run's fp32 matmul peak.

Every student has the same history fields, embedding width (16) and MLP ([64, 32]).
Writes benchmarks/results/NAME.{md,json} and NAME.png (oracle ratio against ms per request).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cascade.cascade import Catalog
from cascade.config import load_config
from cascade.data.lists import build_lists
from cascade.evaluate import flops_per_candidate
from cascade.models import MODELS, build_model, load_trained
from cascade.prepare import prepare_data, trend_spec
from cascade.tasks import train_experiment
from export.bundle import StageModel, write_prerank
from export.runtime import prerank_scorer
from provenance import mean_std, write_results
from serving import matmul_peak, timed
from teachers import TEACHERS

SETTINGS = {"low": 0.0, "middle": 0.5, "high": 1.0, "ml1m": None}  # a target-attention world's knob; None: MovieLens-1M
ROOT = Path(__file__).resolve().parents[1]
STUDENTS = {
    "dssm": "{name: dssm, params: {hidden: [64, 32], dropout: 0.0}}",
    "senet": "{name: senet, params: {hidden: [64, 32], dropout: 0.0}}",
    "dat": "{name: dat, params: {hidden: [64, 32], dropout: 0.0}}",
    "inttower": "{name: inttower, params: {hidden: [64, 32], heads: 4, head_dim: 16, dropout: 0.0}}",
    "hit": "{name: hit, params: {hidden: [64, 32], dropout: 0.0}}",
    "poly": "{name: poly, params: {hidden: [64, 32], codes: 8, dropout: 0.0}}",
    "mvke": "{name: mvke, params: {hidden: [64, 32], kernels: 4, dropout: 0.0}}",
    "tarq": "{name: tarq, params: {hidden: [64, 32], levels: 3, codes: 64, attention_hidden: [32, 16], dropout: 0.0}}",
    "tarq_small": "{name: tarq, params: {hidden: [64, 32], levels: 2, codes: 16, attention_hidden: [32, 16], dropout: 0.0}}",
    "cold": "{name: cold, params: {hidden: [64, 32], dropout: 0.0}}",
}
CONFIG = """
base:
  data: {data}
  model: {{embedding_dim: 16, history_fields: {fields}}}
  train: {{epochs: {epochs}, batch_size: 1024, lr: {lr}, patience: 2, seed: {seed}, monitor: teacher_recall@10@50}}
  out: {out}
  task: distill
  distill: {{teacher: din, exposure_bce: 0, listwise_kd: 1.0, prerank_quota: 50, rank_quota: 10, lists_per_batch: 32}}
experiments:
  din:
    model: {{name: din, params: {{attention_hidden: {attention_hidden}, hidden: {din_hidden}, dropout: 0.0}}}}
    train: {{monitor: recall@10}}
    distill: {{teacher: null, exposure_bce: 0, listwise_kd: 0, rankflow_bce: 1.0}}
{students}
"""
QUALITY = ("teacher_recall@10@10", "teacher_recall@10@20", "teacher_recall@10@50", "recall@10", "oracle_ratio")


def config_text(args, tmp: Path, setting: str, seed: int) -> str:
    students = "".join(f"  {name}: {{model: {STUDENTS[name]}}}\n" for name in args.students)
    common = dict(seed=seed, epochs=args.epochs, out=tmp / f"runs_{setting}_{seed}", students=students)
    if SETTINGS[setting] is None:  # configs/ml1m.yaml's data (its lists are made there once, by `cascade run`) and DIN
        data = next(iter(load_config(ROOT / "configs" / "ml1m.yaml"))).data
        spec = {"kind": data.kind, "dir": str(ROOT / data.dir), "recall": data.recall}
        return CONFIG.format(data=json.dumps(spec), fields="[]", lr=0.001, attention_hidden="[80, 40]", din_hidden="[200, 80]", **common)
    synth = {"target_attention": SETTINGS[setting], "users": args.users, "items": args.items, "requests": args.requests, "seed": seed}
    spec = {"kind": "synth", "dir": str(tmp / f"data_{setting}_{seed}"), "synth": synth}
    return CONFIG.format(data=json.dumps(spec), fields="[category, style]", lr=0.002, attention_hidden="[32, 16]", din_hidden="[64, 32]", **common)


def cost(exp, ds, tmp: Path, candidates: tuple[int, ...]) -> dict[str, float]:
    """FLOPs per candidate and ms per request of the exported pre-rank stage, per candidate count."""
    models = {**MODELS, **TEACHERS}
    model = load_trained(exp, ds, models, lambda e: None)
    catalog = Catalog.from_dataset(ds, trend_spec(exp))  # the stages' item trend (MovieLens), served as the bundle serves it
    test = catalog.add_trend(build_lists(ds, "test"))
    some = test.take(slice(0, 64))
    requests = some.take_columns(np.zeros((len(some), 0), int))
    root = tmp / f"bundle_{exp.name}"
    root.mkdir()
    stage = write_prerank(StageModel("prerank", exp.model.name, model, 50), catalog, catalog.attach(requests.take(slice(0, 3)), np.resize(catalog.item_ids, (3, 4))), root / "prerank", quantize=False)
    scorer = prerank_scorer(root, stage, threads=1)
    rng = np.random.default_rng(0)
    out = {}
    for n in candidates:
        out[f"flops_per_candidate@{n}"] = flops_per_candidate(model, test, "prerank", n)
        lists = [catalog.attach(requests.take(slice(i, i + 1)), rng.choice(catalog.item_ids, size=(1, n), replace=False)) for i in range(len(requests))]
        at = iter(range(10**9))
        out[f"ms_per_request@{n}"] = timed(lambda: scorer(lists[next(at) % len(lists)]), 200, budget_s=5.0)["p50_ms"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", nargs="+", choices=tuple(SETTINGS), default=["high"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--students", nargs="+", choices=tuple(STUDENTS), default=list(STUDENTS))
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--items", type=int, default=8000)
    parser.add_argument("--requests", type=int, default=8000)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--name", default="prerank_frontier")
    parser.add_argument("--extend", action="store_true", help="add --seeds to NAME.json's runs (same settings and students; its cost and FLOPs kept) and rewrite NAME.md/json")
    parser.add_argument("--recount-flops", action="store_true", help="count the FLOPs of NAME.json's students again (they depend on the architecture alone: untrained models) and rewrite NAME.md/json")
    args = parser.parse_args()
    if args.recount_flops:
        return recount_flops(args)
    torch.set_num_threads(2)
    tmp = Path(tempfile.mkdtemp(prefix="frontier."))
    rows, costs, teachers, peak = [], {}, [], 0.0
    if args.extend:  # the saved seeds kept, their provenance said
        saved = json.loads((Path(__file__).parent / "results" / f"{args.name}.json").read_text())
        rows, teachers, costs, peak = saved["runs"], saved["teacher_as_preranker"], saved["cost"], saved["matmul_peak_gflops"]
        old_seeds = sorted({r["seed"] for r in rows})
        args.seeds = sorted(set(old_seeds) | set(args.seeds))
        md = (Path(__file__).parent / "results" / f"{args.name}.md").read_text().splitlines()
        # the saved table's own provenance, its "command below" named
        kept = [line.replace("by the command below", f"by `{saved['command']}`") for line in md if " come from " in line]
        added = ", ".join(str(seed) for seed in args.seeds if seed not in old_seeds)
        args.extended = kept + [f"Seeds {', '.join(map(str, old_seeds))} are as `{saved['command']}` at {saved['git_commit']} saved them; seed(s) {added} were added by the command below, the cost kept."]
        todo = [seed for seed in args.seeds if seed not in old_seeds]
    else:
        todo = args.seeds
    try:
        for setting in args.settings:
            for seed in todo:
                path = tmp / f"{setting}_{seed}.yaml"
                path.write_text(config_text(args, tmp, setting, seed))
                exps = {e.name: e for e in load_config(path)}
                for name in args.students:
                    start = time.perf_counter()
                    result = train_experiment(exps[name], path, {**MODELS, **TEACHERS})
                    test = result["test"]
                    rows.append({"setting": setting, "seed": seed, "student": name, **{k: test[k] for k in QUALITY if k in test}, "seconds": time.perf_counter() - start, "seconds_per_epoch": result["seconds_per_epoch"]})
                    print(f"  {setting} seed {seed} {name}: " + " ".join(f"{k} {test[k]:.4f}" for k in QUALITY if k in test) + f" ({rows[-1]['seconds']:.0f}s)", flush=True)
                    if name == args.students[-1]:
                        ceiling = result["reference"]["teacher_as_preranker"]
                        teachers.append({"setting": setting, "seed": seed, **{k: ceiling[k] for k in QUALITY if k in ceiling}})
                report(args, rows, teachers, costs, peak)  # after every seed: a stopped run keeps what it finished
                if not costs:  # the first setting's first-seed runs
                    torch.set_num_threads(1)
                    peak = matmul_peak(1)
                    ds = prepare_data(exps["din"].data)
                    for name in args.students:
                        costs[name] = cost(exps[name], ds, tmp, (200, 1000))
                        print(f"  cost {name}: " + " ".join(f"{k} {v:,.1f}" for k, v in costs[name].items()), flush=True)
                    torch.set_num_threads(2)
                    report(args, rows, teachers, costs, peak)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def recount_flops(args) -> None:
    """NAME.json's FLOPs per candidate counted again with this commit's counter, on its first
    setting's data; its quality rows and measured milliseconds are kept."""
    saved = json.loads((Path(__file__).parent / "results" / f"{args.name}.json").read_text())
    runs = saved["runs"]
    args.settings = list(dict.fromkeys(r["setting"] for r in runs))
    args.students = list(dict.fromkeys(r["student"] for r in runs))
    tmp = Path(tempfile.mkdtemp(prefix="frontier."))
    try:
        path = tmp / "flops.yaml"
        path.write_text(config_text(args, tmp, args.settings[0], 0))
        exps = {e.name: e for e in load_config(path)}
        ds = prepare_data(exps["din"].data)
        catalog = Catalog.from_dataset(ds, trend_spec(exps["din"]))
        test = catalog.add_trend(build_lists(ds, "test").take(slice(0, 64)))
        for name in args.students:
            model = build_model(exps[name], ds, {**MODELS, **TEACHERS})
            for n in (200, 1000):
                saved["cost"][name][f"flops_per_candidate@{n}"] = flops_per_candidate(model, test, "prerank", n)
            print(f"  {name}: " + " ".join(f"{k} {v:,.1f}" for k, v in saved["cost"][name].items() if k.startswith("flops")), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    args.recounted = f"`{saved['command']}` at {saved['git_commit']}, {saved['date']}"
    report(args, runs, saved["teacher_as_preranker"], saved["cost"], saved["matmul_peak_gflops"])


def report(args, rows: list[dict], teachers: list[dict], costs: dict[str, dict], peak: float) -> None:
    seeds = sorted({r["seed"] for r in rows})  # those finished
    worlds = [s for s in args.settings if SETTINGS[s] is not None]
    data = []
    if worlds:
        data.append(f"`target_attention_world` ({', '.join(f'{s}: knob {SETTINGS[s]}' for s in worlds)}), {args.users:,} users, {args.items:,} items, {args.requests:,} requests, on the test requests' logged recall lists")
    if "ml1m" in args.settings:
        data.append("MovieLens-1M (ml1m: configs/ml1m.yaml's test lists, the recall tower's top-200 of the catalog with the items' trend; the oracle ratio needs a world's truth)")
    lines = [
        f"Every pre-ranker distilled (listwise KD) from one DIN ranker on {' and on '.join(data)}, {args.epochs} epochs; each the pre-ranker of the cascade 200 -> 50 -> 10 whose ranker is the DIN. "
        f"Seeds {', '.join(map(str, seeds))} (of {', '.join(map(str, args.seeds))} asked): mean ± std. Cost (first seed, first setting): matmul FLOPs per candidate, and "
        f"the p50 ms of one request through the exported pre-rank stage (onnxruntime, 1 thread; two-towers read the cached item side, or run the item tower live where it reads the trend), at 200 and 1,000 candidates. "
        f"fp32 matmul peak in this run: {peak:.1f} GFLOP/s (1 thread).",
        "",
    ]
    for setting in args.settings:
        lines += [f"### {setting}" + (f" (knob {SETTINGS[setting]})" if SETTINGS[setting] is not None else " (MovieLens-1M)"), "", "| pre-ranker | teacher R@10@10 | teacher R@10@20 | teacher R@10@50 | joint recall@10 | oracle ratio | FLOPs/cand @200 | FLOPs/cand @1000 | ms/request @200 | ms/request @1000 |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name in args.students:
            of = lambda key: mean_std([r[key] for r in rows if r["setting"] == setting and r["student"] == name and key in r])  # noqa: E731
            c = costs.get(name, {})
            cells = [f"{c[k]:,.0f}" if k.startswith("flops") else f"{c[k]:.2f}" for k in ("flops_per_candidate@200", "flops_per_candidate@1000", "ms_per_request@200", "ms_per_request@1000")] if c else ["-"] * 4
            lines.append(f"| {name} | " + " | ".join(of(k) for k in QUALITY) + " | " + " | ".join(cells) + " |")
        of = lambda key: mean_std([r[key] for r in teachers if r["setting"] == setting and key in r])  # noqa: E731
        lines += [f"| (the DIN as its own pre-ranker) | " + " | ".join(of(k) for k in QUALITY) + " | | | | |", ""]
    if getattr(args, "extended", None):
        for line in args.extended:
            lines += [line, ""]
    elif getattr(args, "recounted", None):
        lines += [f"The quality figures and milliseconds come from {args.recounted}; the FLOPs were counted again (untrained models: they depend on the architecture alone) by the command below.", ""]
    print("\n".join(lines), flush=True)
    plot(args, rows, costs)
    write_results(args.name, ["# The pre-ranking frontier", "", *lines, f"![teacher Recall@10@20 against ms per request]({args.name}.png)"], {"matmul_peak_gflops": peak, "runs": rows, "teacher_as_preranker": teachers, "cost": costs})


def plot(args, rows: list[dict], costs: dict[str, dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    setting = args.settings[0]
    for name, c in costs.items():
        ys = [r["teacher_recall@10@20"] for r in rows if r["setting"] == setting and r["student"] == name]
        x = c["ms_per_request@1000"]
        ax.errorbar(x, np.mean(ys), yerr=np.std(ys), fmt="o")
        ax.annotate(name, (x, np.mean(ys)), textcoords="offset points", xytext=(5, 4))
    ax.set_xscale("log")
    ax.margins(x=0.15)  # room for the labels of the cheapest and the dearest
    ax.set_xlabel("ms per request, 1,000 candidates (onnxruntime, 1 thread)")
    ax.set_ylabel("teacher Recall@10@20")
    ax.set_title(f"Pre-rankers distilled from one DIN ({'MovieLens-1M' if SETTINGS[setting] is None else setting + ' headroom'})")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(Path(__file__).parent / "results" / f"{args.name}.png", dpi=120)


if __name__ == "__main__":
    main()
