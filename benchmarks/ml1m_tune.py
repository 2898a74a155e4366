"""Equal-budget tuning on MovieLens-1M `ctr`: every model gets the same grid, chosen on valid AUC.

    python benchmarks/ml1m_tune.py [--models dssm inttower din] [--device cuda] [--jobs 4] [--seeds 0 1 2] [--ablation] [--bf16]

Grid (the same six points for every model): lr in {1e-3, 3e-3} x dropout in {0, 0.1, 0.3},
everything else as in benchmarks/configs/ml1m_ctr.yaml. Seed 0 screens the grid; the point with the best
validation AUC is then trained with every seed in ``--seeds`` and scored on test. Test labels
never choose anything. Runs are independent processes (``--jobs`` at a time; on a GPU several
share it). Resumable: a finished run (its results.json) is read, not rerun.
Writes benchmarks/results/ml1m_tune.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from itertools import product
from pathlib import Path

import numpy as np

from provenance import provenance

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
GRID = {"lr": (1e-3, 3e-3), "dropout": (0.0, 0.1, 0.3)}


# IntTower's own knobs, at its tuned lr / dropout, every seed: head initialisation and CIR both ways
ABLATION = [{"head_std": std, "cir_weight": cir} for std in (1e-3, 1e-2, 3e-2) for cir in (0.0, 0.1)]


def point_name(model: str, lr: float, dropout: float, seed: int, extra: dict | None = None) -> str:
    tail = "".join(f"_{k}{v:g}" for k, v in sorted((extra or {}).items()))
    return f"{model}_lr{lr:g}_do{dropout:g}{tail}_s{seed}"


def train_one(model: str, lr: float, dropout: float, seed: int, device: str, runs: str, threads: int, extra: dict | None = None, precision: str = "fp32") -> dict:
    """One run in its own process (torch state never leaks between runs)."""
    import torch

    from cascade.config import load_config
    from cascade.models import MODELS
    from cascade.tasks.pointwise import train_pointwise
    from teachers import TEACHERS

    torch.set_num_threads(threads)
    (exp,) = load_config(ROOT / "configs" / "ml1m_ctr.yaml", model)
    name = point_name(model, lr, dropout, seed, extra) + ("_bf16" if precision == "bf16" else "")
    exp = replace(exp, name=name, out=runs, train=replace(exp.train, lr=lr, seed=seed, device=device, precision=precision), model=replace(exp.model, params={**exp.model.params, "dropout": dropout, **(extra or {})}))
    done = exp.run_dir / "results.json"
    if done.exists() and "test" in json.loads(done.read_text()):
        result = json.loads(done.read_text())
    else:
        result = train_pointwise(exp, {**MODELS, **TEACHERS})
    where = torch.cuda.get_device_name() if device.startswith("cuda") else f"{platform.machine()} CPU"
    return {"model": model, "lr": lr, "dropout": dropout, "seed": seed, "extra": extra or {}, "precision": precision, "device": where, **result}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["dssm", "inttower", "din"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--runs", default="runs/tune")
    parser.add_argument("--ablation", action="store_true", help="also IntTower's head init x CIR at its chosen point")
    parser.add_argument("--bf16", action="store_true", help="also the chosen points of dssm and inttower under bf16 autocast")
    args = parser.parse_args()
    runs = str(ROOT / args.runs)
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    points = list(product(args.models, GRID["lr"], GRID["dropout"]))
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        screen = list(pool.map(train_one, *zip(*[(m, lr, do, args.seeds[0], args.device, runs, threads) for m, lr, do in points])))
        best = {m: max((r for r in screen if r["model"] == m), key=lambda r: r["valid"]["auc"]) for m in args.models}
        final_jobs = [(m, best[m]["lr"], best[m]["dropout"], s, args.device, runs, threads) for m in args.models for s in args.seeds[1:]]
        finals = list(pool.map(train_one, *zip(*final_jobs))) if final_jobs else []
        ablation = []
        if args.ablation and "inttower" in best:
            b = best["inttower"]
            jobs = [("inttower", b["lr"], b["dropout"], s, args.device, runs, threads, extra) for extra in ABLATION for s in args.seeds]
            ablation = list(pool.map(train_one, *zip(*jobs)))
        bf16 = []
        if args.bf16:
            jobs = [(m, best[m]["lr"], best[m]["dropout"], s, args.device, runs, threads, None, "bf16") for m in ("dssm", "inttower") if m in best for s in args.seeds]
            bf16 = list(pool.map(train_one, *zip(*jobs)))
    chosen = {m: [best[m]] + [r for r in finals if r["model"] == m] for m in args.models}
    write(screen, chosen, ablation, bf16, args)


def write(screen: list[dict], chosen: dict[str, list[dict]], ablation: list[dict], bf16: list[dict], args) -> None:
    import torch

    dssm = [r["test"]["auc"] for r in chosen.get("dssm", [])]
    ms = lambda xs: f"{np.mean(xs):.4f} ± {np.std(xs):.4f}"  # noqa: E731
    lines = ["# Equal-budget tuning, MovieLens-1M `ctr` (leak-free)", "", "## Screen (seed 0; chosen on validation AUC)", "", "| model | lr | dropout | best epoch | valid AUC | s / epoch |", "|---|---:|---:|---:|---:|---:|"]
    for r in screen:
        mark = " **chosen**" if r is chosen[r["model"]][0] else ""
        lines.append(f"| {r['model']} | {r['lr']:g} | {r['dropout']:g} | {r['best_epoch']} | {r['valid']['auc']:.4f}{mark} | {r['seconds_per_epoch']:.1f} |")
    lines += ["", "## Chosen point, every seed (test)", "", "| model | lr | dropout | seeds | valid AUC | test AUC | test LogLoss | RelaImpr vs tuned DSSM |", "|---|---:|---:|---:|---|---|---|---:|"]
    for m, rs in chosen.items():
        aucs = [r["test"]["auc"] for r in rs]
        rel = f"{(np.mean(aucs) - 0.5) / (np.mean(dssm) - 0.5) - 1:+.2%}" if dssm else "-"
        lines.append(f"| {m} | {rs[0]['lr']:g} | {rs[0]['dropout']:g} | {len(rs)} | {ms([r['valid']['auc'] for r in rs])} | {ms(aucs)} | {ms([r['test']['logloss'] for r in rs])} | {rel} |")
    if ablation:
        lines += ["", "## IntTower: head initialisation x CIR, at its chosen lr / dropout, every seed (test)", "", "| head_std | cir_weight | seeds | best epochs | valid AUC | test AUC | RelaImpr vs tuned DSSM |", "|---:|---:|---:|---|---|---|---:|"]
        for extra in ABLATION:
            rs = [r for r in ablation if r["extra"] == extra]
            aucs = [r["test"]["auc"] for r in rs]
            rel = f"{(np.mean(aucs) - 0.5) / (np.mean(dssm) - 0.5) - 1:+.2%}" if dssm else "-"
            lines.append(f"| {extra['head_std']:g} | {extra['cir_weight']:g} | {len(rs)} | {', '.join(str(r['best_epoch']) for r in rs)} | {ms([r['valid']['auc'] for r in rs])} | {ms(aucs)} | {rel} |")
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{platform.machine()} CPU"
    meta = provenance(f"{device}, torch {torch.__version__}, {os.cpu_count()} cores, Python {platform.python_version()}")
    lines += ["", "Mean ± population std over seeds. s / epoch is on the machine below with several runs sharing it: not a speed figure.", "", f"`{meta['command']}` at {meta['git_commit']}, {meta['date']}, {meta['machine']}"]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ml1m_tune.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "ml1m_tune.json").write_text(json.dumps({**meta, "grid": GRID, "screen": screen, "chosen": chosen, "ablation": ablation, "bf16": bf16}, indent=2) + "\n")
    print((RESULTS / "ml1m_tune.md").read_text())


if __name__ == "__main__":
    main()
