"""Training from logs larger than memory: peak memory and samples/s, streamed against in memory,
on the default synthetic world and on one 10x its size.

    python benchmarks/data_stream.py [--task pointwise|distill|recall|cascade] [--scales 1 10] [--epochs 3] [--repeats 2]

``--task distill`` trains a DSSM pre-ranker on whole lists (listwise KD) against a DSSM teacher
trained first on the exposures (a DIN teacher would spend the run scoring; what is measured is the
lists' path), and writes data_stream_distill; its samples are lists. ``--task recall`` trains the
quickstart's recall tower (sampled softmax, popularity and 4 hard negatives a pair) and writes
data_stream_recall; streamed, it keeps only the positives and the training pairs. ``--task cascade``
runs one RankFlow round of a joint cascade that trains its pre-ranker (``CASCADE_CONFIG``) and
writes data_stream_cascade; its samples are lists.

Issue 13 asks that a run over a world 10x the default (40 million logged candidates) keep its
peak memory within 1.5x of the default world's when it streams, at samples/s within 20% of the
in-memory path. Each world (requests and users x scale; the 5,000-item catalog unchanged) is
made once under runs/data/stream_{scale}x; each run is `cascade train` of a DSSM (the
quickstart size) in a fresh process, `data.stream` never (in memory) or always (streamed),
reporting its peak RSS (VmHWM) and the training loop's samples/s (metrics.jsonl, mean over
epochs; a streamed epoch includes its reads); the two paths run in turn, ``repeats`` times, since
this machine's speed drifts between minutes. A process that imports what a run imports (torch,
the package) and trains nothing is the baseline. Writes benchmarks/results/data_stream{,_distill,_recall,_cascade}.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

from provenance import write_results

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "runs" / "bench_data_stream"

CONFIG = """
base:
  data: {{kind: synth, dir: {data}, synth: {{requests: {requests}, users: {users}, seed: 0}}}}
  model: {{embedding_dim: 16, name: dssm, params: {{hidden: [128, 64], dropout: 0.1, temperature: 0.1}}}}
  train: {{epochs: {epochs}, batch_size: 1024, lr: 0.002, seed: 0, patience: 5, monitor: auc}}
  out: {out}
  task: pointwise
experiments:
  memory: {{data: {{stream: never}}}}
  streamed: {{data: {{stream: always}}}}
"""

DISTILL_CONFIG = """
base:
  data: {{kind: synth, dir: {data}, synth: {{requests: {requests}, users: {users}, seed: 0}}}}
  model: {{embedding_dim: 16, name: dssm, params: {{hidden: [128, 64], dropout: 0.1, temperature: 0.1}}}}
  train: {{epochs: {epochs}, lr: 0.002, seed: 0, patience: 5, monitor: teacher_recall@10@50}}
  out: {out}
  task: distill
  distill: {{teacher: teacher, prerank_quota: 50, rank_quota: 10, lists_per_batch: 32, exposure_bce: 0, listwise_kd: 1.0}}
experiments:
  teacher: {{task: pointwise, data: {{stream: never}}, train: {{epochs: 1, batch_size: 1024, monitor: auc}}}}
  memory: {{data: {{stream: never}}}}
  streamed: {{data: {{stream: always}}}}
"""

RECALL_CONFIG = """
base:
  data: {{kind: synth, dir: {data}, synth: {{requests: {requests}, users: {users}, seed: 0}}}}
  model: {{embedding_dim: 16, name: dssm, params: {{hidden: [128, 64], dropout: 0.1, temperature: 0.05}}}}
  train: {{epochs: {epochs}, batch_size: 1024, lr: 0.002, seed: 0, patience: 5, monitor: recall@200}}
  out: {out}
  task: recall
  recall: {{temperature: 0.05, popularity_negatives: 256, hard_negatives: 4}}
experiments:
  memory: {{data: {{stream: never}}}}
  streamed: {{data: {{stream: always}}}}
"""

CASCADE_CONFIG = """
base:
  data: {{kind: synth, dir: {data}, synth: {{requests: {requests}, users: {users}, seed: 0}}}}
  model: {{embedding_dim: 16, name: dssm, params: {{hidden: [128, 64], dropout: 0.1, temperature: 0.1}}}}
  train: {{epochs: 1, batch_size: 1024, lr: 0.002, seed: 0, patience: 5, monitor: auc}}
  out: {out}
  task: pointwise
  cascade: {{recall: {{config: {config}, experiment: recall}}, method: rankflow, prerank: prerank, rank: rank, trained: [prerank], rounds: 1, self_epochs: {epochs}, tutor_epochs: {epochs}, recall_quota: 200, prerank_quota: 50, rank_quota: 10, lists_per_batch: 32}}
experiments:
  recall: {{task: recall, data: {{stream: never}}, model: {{params: {{hidden: [128, 64], dropout: 0.1, temperature: 0.05}}}}, train: {{epochs: 3, monitor: recall@200}}, recall: {{temperature: 0.05, popularity_negatives: 256}}}}
  prerank: {{data: {{stream: never}}}}
  rank: {{data: {{stream: never}}, model: {{params: {{hidden: [256, 128], dropout: 0.1, temperature: 0.1}}}}}}
  memory: {{task: cascade, data: {{stream: never}}}}
  streamed: {{task: cascade, data: {{stream: always}}}}
"""

# per task: its config, the speed metrics.jsonl records, the results' name and its test figure
TASKS = {
    "pointwise": (CONFIG, "samples_per_s", "data_stream", "auc", "test AUC"),
    "distill": (DISTILL_CONFIG, "lists_per_s", "data_stream_distill", "teacher_recall@10@50", "test teacher Recall@10@50"),
    "recall": (RECALL_CONFIG, "samples_per_s", "data_stream_recall", "recall@200", "test Recall@200"),
    "cascade": (CASCADE_CONFIG, "lists_per_s", "data_stream_cascade", "joint_recall", "test joint recall"),
}
CASCADE_PHASES = ("prerank_self", "prerank_tutor")  # what trains in the cascade's one round

CHILD = """
import json, sys, time
from pathlib import Path
start = time.perf_counter()
from cascade.cli import main
import cascade.tasks.cascade, torch  # the baseline (no arguments) holds what a run imports
code = main(sys.argv[1:]) if len(sys.argv) > 1 else 0
hwm = next(int(line.split()[1]) * 1024 for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM"))
print(json.dumps({"code": code, "seconds": time.perf_counter() - start, "peak_rss": hwm}))
"""


def run_child(*args: str) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    out = json.loads(done.stdout.strip().splitlines()[-1])
    if out["code"]:
        raise SystemExit(done.stdout[-3000:] + done.stderr[-3000:])
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--task", choices=tuple(TASKS), default="pointwise")
    args = parser.parse_args()
    template, speed, _, test_key, _ = TASKS[args.task]
    RUNS.mkdir(parents=True, exist_ok=True)
    baseline = run_child()["peak_rss"]
    rows = []
    for scale in args.scales:
        data = ROOT / "runs" / "data" / f"stream_{scale}x"
        config = RUNS / f"world_{scale}x_{args.task}.yaml"
        out = RUNS / f"world_{scale}x" / args.task
        config.write_text(template.format(data=data, requests=20000 * scale, users=2000 * scale, epochs=args.epochs, out=out, config=config))
        if not data.exists():
            start = time.perf_counter()
            from cascade.config import load_config
            from cascade.prepare import make_data

            make_data(load_config(config, "memory")[0].data)
            print(f"world {scale}x written in {time.perf_counter() - start:.0f}s", flush=True)
        meta = pq.read_metadata(data / "candidates.parquet")
        first = {"distill": ("teacher",), "cascade": ("recall", "prerank", "rank")}.get(args.task, ())
        for name in first:  # trained before the runs measured
            if not (out / name / "results.json").exists():
                run_child("train", str(config), "--experiment", name)
        for rep, name in [(r, n) for r in range(args.repeats) for n in ("memory", "streamed")]:
            run = out / name
            if args.task == "cascade":
                shutil.rmtree(run, ignore_errors=True)  # train afresh: a finished run would only be read
            for f in ("results.json", "last.pt", "prev.pt", "metrics.jsonl"):
                (run / f).unlink(missing_ok=True)  # train afresh: a finished run would only be read
            child = run_child("train", str(config), "--experiment", name)
            result = json.loads((run / "results.json").read_text())
            if args.task == "cascade":  # its phases' epochs; every phase trains on the same train lists
                epochs = [json.loads(line) for phase in CASCADE_PHASES for line in (run / "round1" / phase / "metrics.jsonl").read_text().splitlines()]
                lists = int((run / "round1" / CASCADE_PHASES[0] / "log.txt").read_text().split(": ", 1)[1].split(" lists", 1)[0].replace(",", ""))
                result = {"test": result["test"], "lists_per_rank": [lists * len(epochs)]}
            else:
                epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            row = {
                "scale": scale,
                "candidates": meta.num_rows,
                "row_groups": meta.num_row_groups,
                "path": name,
                "repeat": rep,
                "train_samples": result[f"{speed.removesuffix('_per_s')}_per_rank"][0] // len(epochs),
                "peak_rss": child["peak_rss"],
                "above_baseline": child["peak_rss"] - baseline,
                "samples_per_s": sum(e[speed] for e in epochs) / len(epochs),
                # a stream validates each row group on its first read; later epochs only filter
                "later_samples_per_s": sum(e[speed] for e in epochs[1:]) / max(len(epochs) - 1, 1),
                "run_seconds": child["seconds"],
                "test": result["test"][test_key],
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
            write(rows, baseline, args)


def gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def by_world_and_path(rows: list[dict]) -> dict[tuple, list[dict]]:
    """The rows of each (scale, path), in the order first seen."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["scale"], r["path"]), []).append(r)
    return groups


def write(rows: list[dict], baseline: int, args) -> None:
    groups = by_world_and_path(rows)
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
    speeds = lambda rs, k: ", ".join(f"{r[k]:,.0f}" for r in rs)  # noqa: E731
    _, speed, name, _, test = TASKS[args.task]
    unit = speed.removesuffix("_per_s")
    model = {
        "pointwise": f"A pointwise DSSM (quickstart size), {args.epochs} epochs, batch 1,024,",
        "distill": f"A DSSM pre-ranker (quickstart size) distilled with listwise KD from a DSSM teacher (trained first,\non the exposures), {args.epochs} epochs, 32 lists of 200 a batch; the teacher scores each path's lists once, into\nits cache (in memory: one array; streamed: a file written a row group at a time and read memory-mapped a batch at a time), in the path's first run;",
        "cascade": f"A joint cascade (RankFlow, one round, the pre-ranker trained: {args.epochs} epoch(s) of self-learning on recall's\ntop-200 with every positive, {args.epochs} of tutor learning from the ranker, 32 lists a batch) over a DSSM recall tower, DSSM\npre-ranker and a larger DSSM ranker trained first; the run regenerates recall's output (faiss over the catalog) three\ntimes, in memory or, streamed, written a row group at a time to parquet and read back (``cascade.tasks.stage_data``);\nlists/s is over both phases' epochs\n('epochs 2+': the tutor phase alone);",
        "recall": f"The quickstart's recall tower (DSSM, sampled softmax with 256 popularity and 4 hard negatives a pair),\n{args.epochs} epochs, batch 1,024 pairs; streamed, the candidates are read a row group at a time once, keeping\nthe positives and the training pairs (so its epochs read nothing);",
    }[args.task]
    lines = [
        f"# {name}: {args.task} training streamed from parquet against in memory",
        "",
        "Synthetic worlds: the default (20,000 requests, 2,000 users, 5,000 items, 200 logged candidates a",
        "request) and the same x scale in requests and users. " + model,
        "one process on this machine's 2 cores; each run in a fresh process. Peak RSS is VmHWM;",
        f"a process that imports torch and the package and trains nothing peaks at {gib(baseline)} GiB (the baseline).",
        f"{unit}/s is the training loop's, a streamed epoch's parquet reads included: the mean over epochs, and over",
        "epochs 2 on (a stream converts and validates each row group whole on its first read, then lets Arrow filter it);",
        "run seconds include reading the data and evaluating. Each row: the runs of that world and path",
        f"(the paths took turns), peak RSS the highest, {unit}/s and seconds their mean.",
        "",
        f"| world | candidates | row groups | path | runs | train {unit} / epoch | peak RSS GiB | above baseline GiB | {unit}/s | {unit}/s, epochs 2+ | run s | {test} |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        *[f"| {s}x | {rs[0]['candidates']:,} | {rs[0]['row_groups']} | {p} | {len(rs)} | {rs[0]['train_samples']:,} | {gib(max(r['peak_rss'] for r in rs))} | {gib(max(r['above_baseline'] for r in rs))} | {speeds(rs, 'samples_per_s')} | {speeds(rs, 'later_samples_per_s')} | {mean(rs, 'run_seconds'):.0f} | {rs[0]['test']:.4f} |" for (s, p), rs in groups.items()],
        "",
    ]
    scales = sorted({r["scale"] for r in rows})
    if len(scales) > 1 and all((s, p) in groups for s in scales[:1] + scales[-1:] for p in ("memory", "streamed")):
        small, big = scales[0], scales[-1]
        peak = lambda s, p: max(r["peak_rss"] for r in groups[(s, p)])  # noqa: E731
        ratio = lambda s, k: mean(groups[(s, "streamed")], k) / mean(groups[(s, "memory")], k)  # noqa: E731
        lines += [
            f"| path | peak RSS {big}x / {small}x |",
            "|---|---:|",
            *[f"| {p} | {peak(big, p) / peak(small, p):.2f} |" for p in ("memory", "streamed")],
            "",
            f"| world | streamed / in-memory {unit}/s, all epochs | epochs 2+ |",
            "|---|---:|---:|",
            *[f"| {s}x | {ratio(s, 'samples_per_s'):.2f} | {ratio(s, 'later_samples_per_s'):.2f} |" for s in (small, big)],
        ]
    write_results(name, lines, {"baseline_peak_rss": baseline, "rows": rows})
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
