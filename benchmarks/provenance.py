"""Where a benchmark's figures came from: the command as run, the date, the commit, the machine;
and where its runs at other seeds live."""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SEED_RUNS = ROOT / "runs" / "bench_seeds"  # every benchmark's runs at a seed other than the config's


def seeded(exp, seed: int):
    """The experiment at ``seed``: itself at the config's own seed, else ``NAME_sSEED`` in
    ``runs/bench_seeds/OUT`` (OUT: the config's run folder's name), so the benchmarks that train
    one experiment at one seed share the run."""
    if seed == exp.train.seed:
        return exp
    return replace(exp, name=f"{exp.name}_s{seed}", out=str(SEED_RUNS / Path(exp.out).name), train=replace(exp.train, seed=seed))


def mean_std(xs: list[float]) -> str:
    """A table cell: mean ± population std over seeds, the value alone for one, "-" for none."""
    if not xs:
        return "-"
    return f"{np.mean(xs):.4f} ± {np.std(xs):.4f}" if len(xs) > 1 else f"{xs[0]:.4f}"


def provenance(machine: str | None = None) -> dict[str, str]:
    # a copy of the tree run elsewhere (a GPU machine) may carry a stale .git: CASCADE_COMMIT says
    commit = os.environ.get("CASCADE_COMMIT") or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    return {
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_commit": commit,
        "machine": machine or f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
    }


def write_results(name: str, lines: list[str], payload: dict) -> None:
    """``benchmarks/results/NAME.md`` (``lines`` and a provenance footer) and ``NAME.json``
    (``payload`` with the provenance)."""
    meta = provenance()
    lines = [*lines, "", f"`{meta['command']}` at {meta['git_commit']}, {meta['date']}, {meta['machine']}"]
    results = ROOT / "benchmarks" / "results"
    results.mkdir(exist_ok=True)
    (results / f"{name}.md").write_text("\n".join(lines) + "\n")
    (results / f"{name}.json").write_text(json.dumps({**meta, **payload}, indent=2, default=float) + "\n")


def replace_section(path: Path, title: str, lines: list[str]) -> None:
    """Replace the section ``title`` (a ``## `` heading, up to the next one) of the markdown file
    at ``path`` with ``lines``, or add it at the end: how several benchmarks share serving.md."""
    text = path.read_text() if path.exists() else ""
    parts = text.split("\n## ")
    head, sections = parts[0], ["## " + p for p in parts[1:]]
    mine = "\n".join([title, "", *lines]).rstrip("\n") + "\n"
    kept = [s if s.splitlines()[0] != title else mine for s in sections]
    if mine not in kept:
        kept.append(mine)
    path.write_text("\n".join(x.rstrip("\n") + "\n" for x in [head, *kept]))
