"""Whether two runs of the same job computed the same figures: every results.json and the report's
metrics.json under two output folders, compared key by key with the timings left out.

    python benchmarks/compare_runs.py BEFORE/runs/quickstart AFTER/runs/quickstart

What a refactor must leave unchanged. Timings (seconds, latency, rates) differ between any two runs
and are skipped: a key named ``seconds``, ``*_seconds``, ``seconds_*``, ``*_per_s``, ``latency_ms``,
or a ``path``. Prints each file with its number of compared values and every difference; exits 1
on any difference or a file present on one side only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TIMING = ("seconds", "latency_ms", "path")


def is_timing(key: str) -> bool:
    return key in TIMING or key.endswith(("_seconds", "_per_s")) or key.startswith("seconds_")


def differences(a, b, where: str = "") -> tuple[int, list[str]]:
    """(values compared, the differences) between two parsed JSON values, timings skipped."""
    if isinstance(a, dict) and isinstance(b, dict):
        n, out = 0, []
        for key in sorted(set(a) | set(b)):
            if is_timing(key):
                continue
            if key not in a or key not in b:
                out.append(f"{where}/{key}: only in {'after' if key not in a else 'before'}")
                continue
            m, d = differences(a[key], b[key], f"{where}/{key}")
            n, out = n + m, out + d
        return n, out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return 1, [f"{where}: {len(a)} items before, {len(b)} after"]
        n, out = 0, []
        for i, (x, y) in enumerate(zip(a, b)):
            m, d = differences(x, y, f"{where}[{i}]")
            n, out = n + m, out + d
        return n, out
    return 1, ([] if a == b else [f"{where}: {a!r} before, {b!r} after"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    args = parser.parse_args()
    names = lambda root: {p.relative_to(root) for p in root.rglob("*.json") if p.name in ("results.json", "metrics.json")}  # noqa: E731
    before, after = names(args.before), names(args.after)
    bad = 0
    for rel in sorted(before | after):
        if rel not in before or rel not in after:
            print(f"{rel}: only {'after' if rel not in before else 'before'}")
            bad += 1
            continue
        n, diff = differences(json.loads((args.before / rel).read_text()), json.loads((args.after / rel).read_text()))
        print(f"{rel}: {n:,} values compared, {len(diff)} different")
        for line in diff[:20]:
            print(f"  {line}")
        bad += bool(diff)
    print("identical" if not bad else f"{bad} file(s) differ")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
