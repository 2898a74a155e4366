"""`cascade eval` of logs larger than memory: peak memory and seconds, streamed against in memory,
on the default synthetic world and on one 10x its size.

    python benchmarks/eval_stream.py [--scales 1 10] [--repeats 1]

Evaluates the joint cascade that ``benchmarks/data_stream.py --task cascade`` trained on each world
(its ``streamed`` run: run that benchmark first), with ``cascade eval RUN --out REPORT`` in a fresh
process. Each path is a folder holding a copy of the run's ``stages.json`` with the cascade's
``data.stream`` set to never (in memory) or always (streamed) and a link to its weights. What
runs is the whole of ``cascade eval``: the quality figures and baselines over every test request,
FLOPs and latency, the untrained cascade's flow and the report. Peak RSS is VmHWM, against a
process that imports what ``cascade`` imports and evaluates nothing (the baseline); the two paths
take turns. Issue 13 asks that evaluation stream too: the streamed peak should stay flat from
one world to the other. Writes benchmarks/results/eval_stream.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import shutil

import pyarrow.parquet as pq

from data_stream import ROOT, RUNS, by_world_and_path, gib, run_child
from provenance import write_results

PATHS = {"memory": "never", "streamed": "always"}


def evaluation_folder(source, scale: int, path: str):
    """A run folder whose stages.json is ``source``'s with ``data.stream`` set for ``path``."""
    run = RUNS / f"world_{scale}x" / "eval" / path
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    stages = json.loads((source / "stages.json").read_text())
    (run / "stages.json").write_text(json.dumps(stages | {"data_stream": PATHS[path]}, indent=2))
    (run / "stages").symlink_to(source / "stages")
    return run


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    baseline = run_child()["peak_rss"]
    rows = []
    for scale in args.scales:
        source = RUNS / f"world_{scale}x" / "cascade" / "streamed"
        if not (source / "stages.json").exists():
            raise SystemExit(f"{source / 'stages.json'}: missing; run `python benchmarks/data_stream.py --task cascade --scales {scale}` first")
        meta = pq.read_metadata(ROOT / "runs" / "data" / f"stream_{scale}x" / "candidates.parquet")
        for rep, path in [(r, p) for r in range(args.repeats) for p in PATHS]:
            run = evaluation_folder(source, scale, path)
            child = run_child("eval", str(run), "--out", str(run / "report"))
            entry = json.loads((run / "report" / "metrics.json").read_text())["entries"][0]
            m = entry["metrics"]
            row = {
                "scale": scale,
                "candidates": meta.num_rows,
                "row_groups": meta.num_row_groups,
                "path": path,
                "repeat": rep,
                "test_requests": m["requests"],
                "peak_rss": child["peak_rss"],
                "above_baseline": child["peak_rss"] - baseline,
                "seconds": child["seconds"],
                "joint_recall": m["flow"]["joint_recall"],
                "rank_auc": m["stages"]["rank"].get("auc", float("nan")),
                "popularity_prerank_joint_recall": m["baselines"]["popularity_prerank"]["joint_recall"],
                "untrained_joint_recall": entry["untrained"]["joint_recall"],
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
            write(rows, baseline, args)


def write(rows: list[dict], baseline: int, args) -> None:
    groups = by_world_and_path(rows)
    lines = [
        "# eval_stream: `cascade eval` of a joint cascade, its logs streamed from parquet against read whole",
        "",
        "Synthetic worlds: the default (20,000 requests, 2,000 users, 5,000 items, 200 logged candidates a request)",
        "and the same x scale in requests and users; the cascade is the one `benchmarks/data_stream.py --task cascade`",
        "trained on each (DSSM recall, pre-ranker and ranker; quotas 200 / 50 / 10). `cascade eval` in a fresh process,",
        "the whole of it: every figure and baseline over the test requests, FLOPs, latency over 200 requests, the untrained",
        "cascade's flow, the report. Peak RSS is VmHWM; a process that imports what `cascade` imports and evaluates",
        f"nothing peaks at {gib(baseline)} GiB (the baseline). Each row: that world and path's runs (the paths took turns),",
        "peak RSS the highest, seconds the mean.",
        "",
        "| world | candidates | row groups | path | runs | test requests | peak RSS GiB | above baseline GiB | seconds | joint recall | rank AUC | popularity pre-ranker joint recall | untrained joint recall |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *[
            f"| {s}x | {rs[0]['candidates']:,} | {rs[0]['row_groups']} | {p} | {len(rs)} | {rs[0]['test_requests']:,} | {gib(max(r['peak_rss'] for r in rs))} | "
            f"{gib(max(r['above_baseline'] for r in rs))} | {sum(r['seconds'] for r in rs) / len(rs):.0f} | {rs[0]['joint_recall']:.4f} | {rs[0]['rank_auc']:.4f} | "
            f"{rs[0]['popularity_prerank_joint_recall']:.4f} | {rs[0]['untrained_joint_recall']:.4f} |"
            for (s, p), rs in groups.items()
        ],
        "",
    ]
    scales = sorted({r["scale"] for r in rows})
    if len(scales) > 1 and all((s, p) in groups for s in (scales[0], scales[-1]) for p in PATHS):
        small, big = scales[0], scales[-1]
        peak = lambda s, p: max(r["peak_rss"] for r in groups[(s, p)])  # noqa: E731
        secs = lambda s, p: sum(r["seconds"] for r in groups[(s, p)]) / len(groups[(s, p)])  # noqa: E731
        lines += [
            f"| path | peak RSS {big}x / {small}x |",
            "|---|---:|",
            *[f"| {p} | {peak(big, p) / peak(small, p):.2f} |" for p in PATHS],
            "",
            "| world | streamed / in-memory seconds |",
            "|---|---:|",
            *[f"| {s}x | {secs(s, 'streamed') / secs(s, 'memory'):.2f} |" for s in (small, big)],
        ]
    write_results("eval_stream", lines, {"baseline_peak_rss": baseline, "rows": rows})
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
