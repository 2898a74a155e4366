"""The files a run saves, each written and read here and nowhere else.

- ``results.json``: a run's figures, written last by every task as the mark of a complete run
  (``write_results``, ``read_results``, ``finished``).
- ``stages.json``: the cascade a ``task: cascade`` run trained (``write_stages``,
  ``read_stages``): each stage's config file, experiment, quota and weights file, and the
  cascade's ``data.stream``, which `cascade eval` and `cascade export` follow too.

``STAGE_NAMES`` are the cascade's stages in order, the one spelling of them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cascade.data.store import write_text_atomic

STAGE_NAMES = ("recall", "prerank", "rank")
RESULTS_FILE = "results.json"
STAGES_FILE = "stages.json"
STREAM_KEY = "data_stream"  # stages.json: the cascade's data.stream


class SavedError(ValueError):
    """A saved file that is missing or not what it should be; the message names the file."""


def write_results(run_dir: str | Path, result: dict[str, Any]) -> None:
    """``run_dir/results.json``, atomically: the last file a task writes, so its presence means
    the run finished (numpy scalars are written as floats)."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    write_text_atomic(Path(run_dir) / RESULTS_FILE, json.dumps(result, indent=2, default=float) + "\n")


def finished(run_dir: str | Path) -> bool:
    """Whether the run in ``run_dir`` wrote its results (it ended)."""
    return (Path(run_dir) / RESULTS_FILE).exists()


def read_results(run_dir: str | Path) -> dict[str, Any]:
    """The figures a finished run wrote; ``SavedError`` naming the file when there are none."""
    path = Path(run_dir) / RESULTS_FILE
    if not path.exists():
        raise SavedError(f"{path}: missing; not a finished run")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SavedError(f"{path}: not JSON ({e})") from None


@dataclass(frozen=True)
class SavedStage:
    """One stage of a saved cascade: the experiment ``experiment`` of config file ``config``
    (absolute), cut at ``quota``, its weights at ``weights`` (relative to the run folder); a
    blend also carries its weights as chosen (``blend``), for a reader's eyes."""

    config: str
    experiment: str
    quota: int
    weights: str
    blend: dict | None = None


@dataclass(frozen=True)
class SavedStages:
    """``stages.json``: a stage per name of ``STAGE_NAMES``, and the cascade's ``data.stream``."""

    stages: dict[str, SavedStage]
    data_stream: str = "auto"
    run_dir: Path = field(default=Path("."), compare=False)

    def __getitem__(self, name: str) -> SavedStage:
        return self.stages[name]

    def weights(self, name: str) -> Path:
        return self.run_dir / self.stages[name].weights


def write_stages(run_dir: str | Path, saved: SavedStages) -> None:
    """``run_dir/stages.json`` from ``saved`` (the weights files are the caller's to write first)."""
    manifest: dict[str, Any] = {STREAM_KEY: saved.data_stream}
    for name in STAGE_NAMES:
        s = saved.stages[name]
        manifest[name] = {"config": s.config, "experiment": s.experiment, "quota": s.quota, "weights": s.weights}
        if s.blend is not None:
            manifest[name]["blend"] = s.blend
    write_text_atomic(Path(run_dir) / STAGES_FILE, json.dumps(manifest, indent=2) + "\n")


def read_stages(run_dir: str | Path) -> SavedStages:
    """The cascade a ``task: cascade`` run saved; ``SavedError`` naming the file and the key when
    it is missing or incomplete."""
    path = Path(run_dir) / STAGES_FILE
    if not path.exists():
        raise SavedError(f"{path}: missing; not a finished 'task: cascade' run")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SavedError(f"{path}: not JSON ({e})") from None
    stages = {}
    for name in STAGE_NAMES:
        entry = raw.get(name)
        if not isinstance(entry, dict):
            raise SavedError(f"{path}: no '{name}' stage")
        missing = sorted({"config", "experiment", "quota", "weights"} - set(entry))
        if missing:
            raise SavedError(f"{path}: {name}: '{missing[0]}' is missing")
        stages[name] = SavedStage(entry["config"], entry["experiment"], int(entry["quota"]), entry["weights"], entry.get("blend"))
    return SavedStages(stages, raw.get(STREAM_KEY, "auto"), Path(run_dir))
