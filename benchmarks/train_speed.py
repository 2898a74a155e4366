"""Training-step speed of DSSM and IntTower at the published ML-1M size, against the machine's
own matmul peak (the roofline), and the stock-op baseline measured in the same run.

    python benchmarks/train_speed.py [--steps 30] [--repeats 5]

One step = forward, BCE, backward, Adam, on a batch of 2048 ML-1M `ctr` training samples.
FLOPs per sample are counted by ``torch.utils.flop_counter`` over one whole step (matmuls,
forward and backward), the peak is a 2048-cubed matmul timed here, so ``ceiling = peak / FLOPs``
is the best any implementation could do on this machine in that precision. This VM's speed
drifts by +-30% from minute to minute, so variants are timed in alternation (``repeats`` rounds
of ``steps`` steps each) and the median round is reported.

Variants: ``stock`` = ``nn.Dropout``, MaxSim by ``einsum`` + ``amax`` over IntTower's concatenated
user heads (what the code had before); ``lean`` = the code as it is (``towers.base.Dropout``,
MaxSim by matmul + ``max``, a user layer at a time: ``IntTower.layer_score``);
``bf16`` = ``lean`` under ``torch.autocast("cpu", torch.bfloat16)`` with fp32 master weights.
Writes benchmarks/results/train_speed.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import types
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import cascade.towers.hit
import cascade.towers.inttower
from cascade.config import load_config
from cascade.models import build_model
from cascade.tasks.pointwise import exposures, pointwise_step
from cascade.tasks.recall import task_logs
from cascade.towers import base

from provenance import provenance

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TARGETS = {"dssm": 45_000, "inttower": 8_000}  # issue 13, fp32 on these 2 cores
MATMULS = ("aten::mm", "aten::addmm", "aten::bmm")  # the profiler's matmul kernels (self time)


def stock_maxsim(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.einsum("bad,bnkd->bnak", u, v).amax(dim=3).sum(dim=2)


def to_stock(model: nn.Module) -> nn.Module:
    """Swap our Dropout for nn.Dropout in place (same p)."""
    for name, child in model.named_children():
        if isinstance(child, base.Dropout):
            setattr(model, name, nn.Dropout(child.p))
        else:
            to_stock(child)
    return model


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    """GFLOP/s of an n x n x n matmul in ``dtype`` (best of ``reps``)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


class Variant:
    def __init__(self, name: str, model_name: str, exp, ds, train_batches: list, stock: bool, bf16: bool):
        torch.manual_seed(0)
        self.name, self.model_name, self.stock, self.bf16 = name, model_name, stock, bf16
        self.model = build_model(exp, ds)
        if stock:
            to_stock(self.model)
            if isinstance(self.model, cascade.towers.inttower.IntTower):  # the heads concatenated, then one MaxSim
                self.model.forward = types.MethodType(base.TwoTower.forward, self.model)
        self.model.train()
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.step_loss = pointwise_step
        self.batches = train_batches
        self.rounds: list[float] = []

    def step(self, batch) -> None:
        maxsim = stock_maxsim if self.stock else base.maxsim_score
        cascade.towers.inttower.maxsim_score = cascade.towers.hit.maxsim_score = maxsim
        with torch.autocast("cpu", dtype=torch.bfloat16) if self.bf16 else nullcontext():
            loss = self.step_loss(self.model, batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def flops_per_sample(self) -> float:
        counter = FlopCounterMode(display=False)
        with counter:
            self.step(self.batches[0])
        return counter.get_total_flops() / len(self.batches[0])

    def time_round(self, steps: int) -> None:
        start = time.perf_counter()
        for i in range(steps):
            self.step(self.batches[i % len(self.batches)])
        self.rounds.append((time.perf_counter() - start) / steps)


def profile(steps: int) -> None:
    """Where a lean fp32 step's time goes: torch.profiler over ``steps`` steps of each model, the
    operators by self CPU time -> benchmarks/results/train_speed_profile.md."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    experiments = {e.name: e for e in load_config(ROOT / "configs" / "ml1m_ctr.yaml")}
    lines = ["# Where a training step's time goes (lean variant, fp32, batch 2048, ML-1M `ctr`)", ""]
    for model_name in ("dssm", "inttower"):
        exp = experiments[model_name]
        ds = task_logs(exp.data, whole=True)[0]
        _, train = exposures(ds, "train", build_model(exp, ds))
        batches = list(train.batches(2048, torch.Generator().manual_seed(0)))[:steps]
        v = Variant("lean", model_name, exp, ds, batches, stock=False, bf16=False)
        for b in batches[:3]:
            v.step(b)
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            for b in batches:
                v.step(b)
            seconds = time.perf_counter() - start
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in events)
        # the matmuls at this step's own shapes: what no fusion of the other work can remove
        matmul_ms = sum(e.self_cpu_time_total for e in events if e.key in MATMULS) / 1e3 / len(batches)
        lines += [
            f"## {model_name}: {seconds / len(batches) * 1e3:.1f} ms a step under the profiler ({len(batches)} steps)",
            "",
            f"Its matmuls alone ({', '.join(f'`{m}`' for m in MATMULS)}) take {matmul_ms:.1f} ms a step: a step of nothing else "
            f"would reach {2048 / matmul_ms * 1e3:,.0f} samples/s (target {TARGETS[model_name]:,}).",
            "",
            "| operator | calls / step | self CPU ms / step | share |",
            "|---|---:|---:|---:|",
            *[f"| `{e.key}` | {e.count / len(batches):.0f} | {e.self_cpu_time_total / 1e3 / len(batches):.2f} | {e.self_cpu_time_total / total:.1%} |" for e in events[:15]],
            "",
        ]
    meta = provenance(f"{platform.machine()}, {__import__('os').cpu_count()} cores, torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}")
    lines.append(f"`{meta['command']}` at {meta['git_commit']}, {meta['date']}, {meta['machine']}")
    (RESULTS / "train_speed_profile.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--profile", type=int, default=0, help="profile this many lean steps of each model instead of timing (train_speed_profile.md)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--bf16-steps", type=int, default=3, help="bf16 is timed on fewer steps (it can be very slow where the CPU lacks bf16 units)")
    args = parser.parse_args()
    if args.profile:
        return profile(args.profile)
    peak = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16, reps=2)}
    print(f"matmul 2048^3: fp32 {peak['fp32']:.1f} GFLOP/s, bf16 {peak['bf16']:.1f} GFLOP/s")
    experiments = {e.name: e for e in load_config(ROOT / "configs" / "ml1m_ctr.yaml")}
    rows = []
    for model_name in ("dssm", "inttower"):
        exp = experiments[model_name]
        ds = task_logs(exp.data, whole=True)[0]
        probe = build_model(exp, ds)
        _, train = exposures(ds, "train", probe)
        batches = list(train.batches(2048, torch.Generator().manual_seed(0)))[: args.steps]
        variants = [Variant(v, model_name, exp, ds, batches, stock=v == "stock", bf16=v == "bf16") for v in ("stock", "lean", "bf16")]
        for v in variants:  # warm-up
            for b in batches[:3]:
                v.step(b)
        for _ in range(args.repeats):
            for v in variants:
                v.time_round(args.bf16_steps if v.bf16 else args.steps)
        flops = variants[1].flops_per_sample()
        stock_sps = 2048 / statistics.median(variants[0].rounds)
        for v in variants:
            seconds = statistics.median(v.rounds)
            sps = 2048 / seconds
            precision = "bf16" if v.bf16 else "fp32"
            rows.append({
                "model": model_name, "variant": v.name, "precision": precision, "batch": 2048,
                "step_ms": seconds * 1e3, "step_ms_rounds": [r * 1e3 for r in v.rounds], "samples_per_s": sps,
                "vs_stock": sps / stock_sps, "mflop_per_sample": flops / 1e6, "achieved_gflops": flops * sps / 1e9,
                "ceiling_samples_per_s": peak[precision] * 1e9 / flops, "target_samples_per_s": TARGETS[model_name],
            })
            print(f"{model_name:9s} {v.name:6s} {seconds * 1e3:8.1f} ms/step {sps:9,.0f} samples/s  x{sps / stock_sps:.2f} vs stock  {flops * sps / 1e9:6.1f} GFLOP/s")
    write(rows, peak, args)


def write(rows: list[dict], peak: dict, args) -> None:
    meta = provenance(f"{platform.machine()}, {__import__('os').cpu_count()} cores, torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}")
    lines = [
        "# Training-step speed, ML-1M `ctr`, batch 2048 (forward + BCE + backward + Adam)",
        "",
        f"Matmul peak measured in the same run (2048^3): fp32 {peak['fp32']:.1f} GFLOP/s, bf16 {peak['bf16']:.1f} GFLOP/s.",
        "",
        "| model | variant | precision | ms / step | samples / s | vs stock | MFLOP / sample | achieved GFLOP/s | ceiling samples / s | target |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['variant']} | {r['precision']} | {r['step_ms']:.1f} | {r['samples_per_s']:,.0f} | x{r['vs_stock']:.2f} | "
            f"{r['mflop_per_sample']:.2f} | {r['achieved_gflops']:.1f} | {r['ceiling_samples_per_s']:,.0f} | {r['target_samples_per_s']:,} |"
        )
    lines += [
        "",
        "Median over alternating rounds. FLOPs: matmuls only, forward + backward, counted by",
        "`torch.utils.flop_counter` on one step. Ceiling: the measured matmul peak divided by the FLOPs",
        "per sample, i.e. what a step made of nothing but peak-speed matmuls would reach.",
        "",
        f"`{meta['command']}` at {meta['git_commit']}, {meta['date']}, {meta['machine']}",
    ]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "train_speed.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "train_speed.json").write_text(json.dumps({**meta, "matmul_peak_gflops": peak, "rows": rows}, indent=2) + "\n")
    print((RESULTS / "train_speed.md").read_text())


if __name__ == "__main__":
    main()
