"""How long `cascade eval` takes on one cascade, at an earlier commit and now, in one run.

    python benchmarks/eval_speed.py [--run runs/ml1m/cascade_distilled] [--before COMMIT] [--name eval_speed] [--profile]

The earlier commit is checked out in a temporary git worktree; each version evaluates the same
cascade run in a fresh process (`cascade eval RUN --out TMP`, whose own code is that version's),
taking turns, each twice. Per version: the wall time of the whole command, each phase's seconds
as it prints them (the earlier versions print running totals, turned into durations here), and
the headline figures of its metrics.json, and how many of all its numbers differ between the
versions (timings and the untrained reference aside, which now samples about 1,000 requests). The matmul peak is measured in the same run.
Writes benchmarks/results/NAME.{md,json}; with ``--profile``, each version once under cProfile
instead, the functions that take the most time into NAME_profile.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from provenance import write_results
from serving import matmul_peak

ROOT = Path(__file__).resolve().parents[1]
BEFORE = "0bcb43e"  # the last commit before issue 35's evaluation work
PHASES = ("quality and baselines", "cost: FLOPs and latency", "the untrained cascade")
UNCOMPARED = {"untrained", "latency_ms", "latency_p95_ms", "seconds"}  # measured, or sampled differently by version
FIGURES = ("flow/joint_recall", "flow/positives_after_prerank", "stages/prerank/auc", "stages/rank/ndcg@10", "baselines/popularity_prerank/joint_recall")


def run_eval(tree: Path, run: Path, out: Path, profile: Path | None = None) -> dict:
    """One `cascade eval` with ``tree``'s code: wall seconds, phase durations, headline figures
    (under cProfile, its stats written to ``profile``, when given)."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    call = f"main(['eval', {str(run.resolve())!r}, '--out', {str(out)!r}])"
    code = f"from cascade.cli import main; raise SystemExit({call})" if profile is None else f"import cProfile; from cascade.cli import main; cProfile.run({call!r}, {str(profile)!r})"
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], cwd=tree, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"cascade eval at {tree} failed:\n{done.stderr[-3000:]}")
    phases, last = {}, 0
    for line in done.stdout.splitlines():
        name = next((p for p in PHASES if line.startswith("  " + p)), None)
        seconds = re.search(r"(\d+)s\)?$", line)
        if name and seconds:
            cumulative = line.endswith(")")  # "(12s)": seconds since the evaluation began
            phases[name] = int(seconds.group(1)) - (last if cumulative else 0)
            last = int(seconds.group(1)) if cumulative else 0
    entry = json.loads((out / "metrics.json").read_text())["entries"][0]["metrics"]
    figures = {}
    for path in FIGURES:
        node = entry
        for part in path.split("/"):
            node = node.get(part, {}) if isinstance(node, dict) else {}
        figures[path] = node if isinstance(node, (int, float)) else None
    return {"wall_s": wall, "phases_s": phases, "figures": figures, "requests": entry["requests"], "all_figures": leaves(entry)}


def leaves(node, path: str = "") -> dict[str, float]:
    """Every number of a metrics.json entry by its path (timings and the untrained reference,
    which the versions measure differently, left out)."""
    if isinstance(node, dict):
        return {k: v for key, child in node.items() if key not in UNCOMPARED for k, v in leaves(child, f"{path}/{key}" if path else key).items()}
    if isinstance(node, list):
        return {k: v for i, child in enumerate(node) for k, v in leaves(child, f"{path}/{i}").items()}
    return {path: float(node)} if isinstance(node, (int, float)) and not isinstance(node, bool) else {}


def agreement(a: dict[str, float], b: dict[str, float]) -> tuple[int, list[str], float]:
    """(figures both versions report, those that differ by more than 1e-9, the largest difference)."""
    shared = sorted(set(a) & set(b))
    diff = [abs(a[k] - b[k]) if not (a[k] != a[k] and b[k] != b[k]) else 0.0 for k in shared]  # NaN == NaN here
    return len(shared), [k for k, d in zip(shared, diff) if not d <= 1e-9], max(diff, default=0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / "ml1m" / "cascade_distilled")
    parser.add_argument("--before", default=BEFORE)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--name", default="eval_speed")
    parser.add_argument("--profile", action="store_true", help="instead: each version once under cProfile, the functions that take the most time into NAME_profile.md")
    args = parser.parse_args()
    peak = matmul_peak(2)
    with tempfile.TemporaryDirectory(prefix="eval_speed.") as tmp:
        tmp = Path(tmp)
        subprocess.run(["git", "worktree", "add", "--detach", str(tmp / "before"), args.before], cwd=ROOT, check=True, capture_output=True)
        try:
            trees = {f"before ({args.before})": tmp / "before", "now": ROOT}
            if args.profile:
                return profiles(args, trees, tmp)
            results: dict[str, list[dict]] = {name: [] for name in trees}
            for i in range(args.repeats):
                for name, tree in trees.items():  # taking turns: drift in the machine hits both
                    results[name].append(run_eval(tree, args.run, tmp / f"out_{i}_{len(results[name])}_{name[:3]}"))
                    print(f"  {name} #{i + 1}: {results[name][-1]['wall_s']:.0f}s {results[name][-1]['phases_s']}", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tmp / "before")], cwd=ROOT, capture_output=True)
    report(args, results, peak)


def profiles(args, trees: dict[str, Path], tmp: Path, top: int = 15) -> None:
    """Each version's `cascade eval` once under cProfile: its wall time and the ``top`` functions
    by their own time (and by time inside them), paths relative to the tree."""
    import pstats

    lines = [f"# {args.name}_profile: where `cascade eval {args.run.name}` spends its time, before and now", "", "cProfile (its overhead included in the seconds); own: time in the function itself; inside: with what it calls."]
    payload = {}
    for name, tree in trees.items():
        prof = tmp / f"{name[:3]}.prof"
        got = run_eval(tree, args.run, tmp / f"profile_{name[:3]}", prof)
        stats = pstats.Stats(str(prof)).stats  # (file, line, function) -> (calls, prim, own, inside, callers)
        rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]
        where = lambda key: f"{key[0].replace(str(tree) + '/', '').split('site-packages/')[-1]}:{key[1]}({key[2]})"  # noqa: E731
        lines += ["", f"## {name}: {got['wall_s']:.0f} s, phases {got['phases_s']}", "", "| function | calls | own s | inside s |", "|---|---:|---:|---:|"]
        lines += [f"| `{where(k)}` | {v[0]:,} | {v[2]:.1f} | {v[3]:.1f} |" for k, v in rows]
        payload[name] = {"wall_s": got["wall_s"], "phases_s": got["phases_s"], "top": [{"function": where(k), "calls": v[0], "own_s": v[2], "inside_s": v[3]} for k, v in rows]}
        print(f"  {name}: {got['wall_s']:.0f}s profiled", flush=True)
    print("\n".join(lines))
    write_results(f"{args.name}_profile", lines, payload)


def report(args, results: dict[str, list[dict]], peak: float) -> None:
    names = list(results)
    mean = lambda rs, f: sum(f(r) for r in rs) / len(rs)  # noqa: E731
    phases = list(PHASES)
    lines = [
        f"`cascade eval {args.run.relative_to(ROOT) if args.run.is_relative_to(ROOT) else args.run}` in a fresh process, {results[names[0]][0]['requests']:,} test requests; "
        f"each version {args.repeats} times, taking turns (mean seconds). fp32 matmul peak in this run: {peak:.1f} GFLOP/s (2 threads).",
        "",
        "| version | whole command s | " + " | ".join(f"{p} s" for p in phases) + " |",
        "|---|---:|" + "---:|" * len(phases),
    ]
    for name in names:
        rs = results[name]
        lines.append(f"| {name} | {mean(rs, lambda r: r['wall_s']):.0f} | " + " | ".join(f"{mean(rs, lambda r: r['phases_s'].get(p, 0)):.0f}" for p in phases) + " |")
    speedup = mean(results[names[0]], lambda r: r["wall_s"]) / mean(results[names[1]], lambda r: r["wall_s"])
    lines += ["", f"Speed-up of the whole command: x{speedup:.2f}.", "", "| figure | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for path in FIGURES:
        lines.append(f"| {path} | " + " | ".join("-" if results[n][0]["figures"][path] is None else f"{results[n][0]['figures'][path]:.6f}" for n in names) + " |")
    shared, differ, largest = agreement(results[names[0]][0]["all_figures"], results[names[1]][0]["all_figures"])
    for rs in results.values():  # tens of thousands of numbers: the json keeps their agreement
        for r in rs:
            r.pop("all_figures")
    lines += ["", f"Every number of the two metrics.json (timings and the untrained reference aside): {shared:,} reported by both, {len(differ)} differ by more than 1e-9 (largest difference {largest:.2e}){': ' + ', '.join(differ[:8]) if differ else ''}."]
    print("\n".join(lines))
    write_results(args.name, [f"# {args.name}: how long `cascade eval` takes, before and now", "", *lines], {"matmul_peak_gflops": peak, "results": results, "speedup": speedup, "agreement": {"compared": shared, "differ": differ, "largest_difference": largest}})


if __name__ == "__main__":
    main()
