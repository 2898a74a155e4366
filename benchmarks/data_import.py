"""`cascade data import` at size: seconds and peak memory per event, CSV and parquet.

    python benchmarks/data_import.py [--sizes 1000000 4000000] [--ml1m ../shared/data/ml-1m]

Issue 11 asks for memory that grows with the data, not with a Python object per row. Each import
runs in a fresh process (peak RSS: VmHWM); the same process importing nothing is the
baseline subtracted. Events: string user ids, sparse integer item ids, a rating with 1% missing,
times over 60 days; a users table with a numeric and a categorical field. MovieLens-1M's
ratings.dat, written as CSV, is imported the same way (label rating >= 4, a request per user and
UTC day) when the shared copy is present. Writes benchmarks/results/data_import.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from provenance import write_results

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, sys, time
from pathlib import Path
from cascade.data.importer import ImportSpec, import_to
spec = json.loads(sys.argv[1])
start = time.perf_counter()
if spec:
    ds, record = import_to(ImportSpec.from_dict(spec, "benchmark"), sys.argv[2])
    events = record["counts"]["events_used"]
else:
    events = 0
# VmHWM: this process's own peak (getrusage's ru_maxrss also counts the parent's size at fork)
hwm = next(int(line.split()[1]) * 1024 for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM"))
print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss": hwm, "events": events}))
"""


def run_child(spec: dict, out: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec), str(out)], capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        raise SystemExit(done.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])


def events_table(n: int, seed: int = 0) -> tuple[pa.Table, pa.Table]:
    rng = np.random.default_rng(seed)
    n_users = max(n // 50, 10)
    user = rng.integers(0, n_users, n)
    rating = rng.integers(1, 6, n).astype(np.float64)
    rating[rng.random(n) < 0.01] = np.nan
    events = pa.table(
        {
            "user": pa.array(np.char.add("user-", user.astype(str))),
            "item": rng.choice(10**9, max(n // 100, 10))[rng.zipf(1.3, n) % max(n // 100, 10)],
            "ts": 1_700_000_000 + rng.integers(0, 60 * 86_400, n),
            "rating": rating,
        }
    )
    users = pa.table({"user": pa.array(np.char.add("user-", np.arange(n_users).astype(str))), "age": rng.integers(15, 80, n_users), "country": rng.choice(["de", "fr", "us", "br"], n_users)})
    return events, users


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 4_000_000])
    parser.add_argument("--ml1m", type=Path, default=ROOT.parent / "shared" / "data" / "ml-1m")
    args = parser.parse_args()
    baseline = run_child({}, Path("unused"))
    print(f"baseline process (imports only): {baseline['peak_rss'] / 2**20:.0f} MiB")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for n in args.sizes:
            events, users = events_table(n)
            for fmt in ("csv", "parquet"):
                path = tmp / f"events_{n}.{fmt}"
                users_path = tmp / f"users_{n}.{fmt}"
                for table, p in ((events, path), (users, users_path)):
                    pacsv.write_csv(table, p) if fmt == "csv" else pq.write_table(table, p)
                spec = {"events": str(path), "users": str(users_path), "columns": {"user": "user", "item": "item", "time": "ts", "label": "rating >= 4"}, "user_fields": {"categorical": ["country"], "numeric": {"age": 8}}}
                got = run_child(spec, tmp / f"out_{n}_{fmt}")
                extra = got["peak_rss"] - baseline["peak_rss"]
                row = {"source": f"synthetic {fmt}", "events": n, "file_mb": path.stat().st_size / 2**20, "seconds": got["seconds"], "events_per_s": n / got["seconds"], "peak_rss_mb": got["peak_rss"] / 2**20, "above_baseline_mb": extra / 2**20, "bytes_per_event": extra / n}
                rows.append(row)
                print(row, flush=True)
        ratings = args.ml1m / "ratings.dat"
        if ratings.exists():
            text = ratings.read_bytes().decode("latin-1").replace("::", ",")
            csv = tmp / "ml1m_ratings.csv"
            csv.write_text("user,movie,rating,ts\n" + text)
            spec = {"events": str(csv), "columns": {"user": "user", "item": "movie", "time": "ts", "label": "rating >= 4"}}
            start = time.perf_counter()
            got = run_child(spec, tmp / "out_ml1m")
            n = got["events"]
            extra = got["peak_rss"] - baseline["peak_rss"]
            row = {"source": "MovieLens-1M ratings.dat as CSV", "events": n, "file_mb": csv.stat().st_size / 2**20, "seconds": got["seconds"], "events_per_s": n / got["seconds"], "peak_rss_mb": got["peak_rss"] / 2**20, "above_baseline_mb": extra / 2**20, "bytes_per_event": extra / n}
            rows.append(row)
            print(row, f"(wall with process start {time.perf_counter() - start:.1f} s)", flush=True)
    synthetic = [r for r in rows if r["source"].startswith("synthetic")]
    growth = {}
    for fmt in ("csv", "parquet"):
        by_n = sorted((r["events"], r["above_baseline_mb"]) for r in synthetic if r["source"].endswith(fmt))
        if len(by_n) >= 2:
            growth[fmt] = (by_n[-1][1] / by_n[0][1]) / (by_n[-1][0] / by_n[0][0])
    lines = [
        "# data_import",
        "",
        "`cascade data import` in a fresh process per row; memory is peak RSS above the same process importing nothing "
        f"({baseline['peak_rss'] / 2**20:.0f} MiB).",
        "",
        "| source | events | file MiB | seconds | events/s | peak RSS MiB | above baseline MiB | bytes / event |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {r['source']} | {r['events']:,} | {r['file_mb']:.0f} | {r['seconds']:.1f} | {r['events_per_s']:,.0f} | {r['peak_rss_mb']:.0f} | {r['above_baseline_mb']:.0f} | {r['bytes_per_event']:.0f} |" for r in rows]
    if growth:
        lines += ["", "Memory growth against events growth (1.0 = linear): " + ", ".join(f"{k} {v:.2f}" for k, v in growth.items())]
    write_results("data_import", lines, {"baseline_rss_mb": baseline["peak_rss"] / 2**20, "rows": rows, "memory_growth_over_linear": growth})
    print("\n".join(lines))


if __name__ == "__main__":
    main()
