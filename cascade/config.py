"""Typed experiment configs from YAML.

A config file holds a ``base`` block and named ``experiments``; each experiment is ``base`` with
its own keys merged over it (FuxiCTR style). Unknown keys are errors that name the key. Models
are found through the explicit ``MODELS`` registry in ``cascade.pipeline``, never by name lookup
in modules.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import yaml

from cascade.flow import DistillConfig
from cascade.joint import CascadeConfig
from cascade.recall import RecallConfig
from cascade.train import TrainConfig


class ConfigError(ValueError):
    """A config problem, naming the file and the key."""


@dataclass(frozen=True)
class DataConfig:
    kind: str = "synth"  # synth | movielens | recall_output | logs
    dir: str = "runs/data/synthetic"  # the log directory; made from the source when missing
    src: str | None = None  # movielens: the folder with users.dat, movies.dat, ratings.dat
    protocol: str = "ctr"  # movielens: ctr | cascade
    synth: dict[str, Any] = field(default_factory=dict)  # WorldConfig overrides
    # recall_output: {config, experiment, n}: a recall experiment (trained first if needed) whose
    # top-n per request, labelled from its data's logs, becomes this directory's candidates
    recall: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelConfig:
    name: str = "dssm"
    embedding_dim: int = 32
    drop_fields: tuple[str, ...] = ()  # fields the model leaves out ("history" for the history)
    params: dict[str, Any] = field(default_factory=dict)  # the model constructor's own keywords


@dataclass(frozen=True)
class ExperimentConfig:
    name: str
    data: DataConfig
    model: ModelConfig
    train: TrainConfig
    out: str = "runs"
    # pointwise: BCE on exposures | recall: retrieval over the catalog | distill: a pre-ranker on
    # the flow's lists | cascade: recall -> pre-rank -> rank reported and trained as one
    task: str = "pointwise"
    recall: RecallConfig = field(default_factory=RecallConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    cascade: CascadeConfig = field(default_factory=CascadeConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.out) / self.name

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _build(cls, raw: Any, where: str):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {raw!r}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key '{unknown[0]}' (known: {', '.join(sorted(known))})")
    try:
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in raw.items()})
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None


TASKS = ("pointwise", "recall", "distill", "cascade")


def _train(raw: Any, where: str) -> TrainConfig:
    cfg = _build(TrainConfig, raw, where)
    try:
        device = torch.device(cfg.device)
    except RuntimeError as e:
        raise ConfigError(f"{where}.device: '{cfg.device}' is not a torch device ({e})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{where}.device: '{cfg.device}' asked for, but this torch ({torch.__version__}) sees no CUDA device")
    return cfg


def _task(value: str, where: str) -> str:
    if value not in TASKS:
        raise ConfigError(f"{where}.task: '{value}' is not one of {', '.join(TASKS)}")
    return value


def load_config(path: str | Path, experiment: str | None = None) -> list[ExperimentConfig]:
    """The experiments of a config file (one when ``experiment`` names it)."""
    path = Path(path)
    try:
        body = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read: {e}") from None
    if not isinstance(body, dict) or "experiments" not in body:
        raise ConfigError(f"{path}: needs an 'experiments' mapping (and optionally 'base')")
    extra = sorted(set(body) - {"base", "experiments"})
    if extra:
        raise ConfigError(f"{path}: unknown top-level key '{extra[0]}'")
    names = list(body["experiments"] or {})
    if experiment is not None:
        if experiment not in names:
            raise ConfigError(f"{path}: no experiment '{experiment}' (have: {', '.join(names)})")
        names = [experiment]
    out = []
    for name in names:
        raw = _merge(body.get("base") or {}, body["experiments"][name] or {})
        where = f"{path}: experiments.{name}"
        extra = sorted(set(raw) - {"data", "model", "train", "out", "task", "recall", "distill", "cascade"})
        if extra:
            raise ConfigError(f"{where}: unknown key '{extra[0]}'")
        out.append(
            ExperimentConfig(
                name=name,
                data=_build(DataConfig, raw.get("data"), f"{where}.data"),
                model=_build(ModelConfig, raw.get("model"), f"{where}.model"),
                train=_train(raw.get("train"), f"{where}.train"),
                out=raw.get("out", "runs"),
                task=_task(raw.get("task", "pointwise"), where),
                recall=_build(RecallConfig, raw.get("recall"), f"{where}.recall"),
                distill=_build(DistillConfig, raw.get("distill"), f"{where}.distill"),
                cascade=_build(CascadeConfig, raw.get("cascade"), f"{where}.cascade"),
            )
        )
        missing = sorted({"config", "experiment"} - set(out[-1].cascade.recall))
        if out[-1].task == "cascade" and missing:
            raise ConfigError(f"{where}.cascade.recall: '{missing[0]}' is required (the recall experiment: {{config, experiment}})")
    return out
