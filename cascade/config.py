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

from cascade.train import TrainConfig


METHODS = ("frozen", "rankflow", "lcron")  # task: cascade


@dataclass(frozen=True)
class RecallConfig:
    temperature: float = 0.05
    popularity_negatives: int = 0  # M per batch, drawn by popularity ** popularity_power
    popularity_power: float = 0.75
    hard_negatives: int = 0  # K per pair, from the request's logged items cut before rank
    seed: int = 0


@dataclass(frozen=True)
class DistillConfig:
    """The loss mix (a weight per term; 0 leaves it out) and the flow's quotas."""

    # an experiment of the same config file whose model is the frozen ranker (pointwise, or a
    # distill-task one trained on the lists itself); None: no teacher (label losses only)
    teacher: str | None = "din"
    prerank_quota: int = 50  # the pre-ranker passes on its top-m
    rank_quota: int = 10  # the ranker shows its top-k of those
    exposure_bce: float = 1.0  # BCE on the logged exposures only (the independent baseline)
    rankflow_bce: float = 0.0  # RankFlow self-learning: BCE on the whole list, unexposed = 0
    tutor: float = 0.0  # RankFlow tutor: alpha * TopK-BPR + (1 - alpha) * probability MSE
    tutor_alpha: float = 0.5
    arf: float = 0.0  # ARF-v2 relaxed top-m BCE + uncertainty-weighted OPA (L_global)
    arf_tau: float = 200.0  # NeuralSort temperature, on the scale of list length x logit gaps
    arf_global_rows: int | None = None  # rows of L_global (None: every valid row)
    listwise_kd: float = 0.0  # -T^2 sum softmax(t/T) log softmax(s/T)
    kd_temperature: float = 1.0
    logit_mse: float = 0.0
    soft_bce: float = 0.0  # BCE against sigmoid(teacher)
    lists_per_batch: int = 32

    def __post_init__(self) -> None:
        if not 0 < self.rank_quota < self.prerank_quota:
            raise ValueError(f"need 0 < rank_quota < prerank_quota, got {self.rank_quota} and {self.prerank_quota}")
        weights = [self.exposure_bce, self.rankflow_bce, self.tutor, self.arf, self.listwise_kd, self.logit_mse, self.soft_bce]
        if min(weights) < 0 or max(weights) == 0:
            raise ValueError("loss weights must be >= 0 and at least one > 0")
        if self.teacher is None and max(weights[2:]) > 0:
            raise ValueError("tutor, arf, listwise_kd, logit_mse and soft_bce need a teacher")


@dataclass(frozen=True)
class CascadeConfig:
    """The three stages, their quotas and the training schedule."""

    method: str = "frozen"  # frozen | rankflow | lcron
    # {config, experiment}: the recall tower (a ``task: recall`` experiment); its data are the
    # logs the whole cascade runs over
    recall: dict = field(default_factory=dict)
    prerank: str = "exposure_bce"  # an experiment of this config: the (warm-up) pre-ranker
    rank: str = "din"  # an experiment of this config: the (warm-up) ranker
    recall_quota: int = 200
    prerank_quota: int = 50
    rank_quota: int = 10
    rounds: int = 2  # rankflow
    trained: tuple[str, ...] = ("rank", "prerank", "recall")  # rankflow: the stages its rounds train
    self_epochs: int = 2
    tutor_epochs: int = 1
    tutor_alpha: float = 0.5  # the pre-ranker's tutor (RankFlow's ML-1M value)
    recall_tutor_alpha: float = 0.2  # recall's tutor (RankFlow's ML-1M value)
    recall_lr: float | None = None  # rankflow: the lr of recall's phases (None: train.lr)
    # rankflow: recall's self-learning. lists: BCE on its own top-n + positives (RankFlow's);
    # retrieval: its warm-up objective (sampled softmax over the catalog) on the logged positives
    recall_self: str = "lists"
    # rankflow self-learning positives. all: every logged positive of the split joins each stage's
    # list (RankFlow's); listed: only those inside the stage's own list
    self_positives: str = "all"
    lcron_epochs: int = 2
    # uniform catalog items (label 0) added to each of recall's training lists: its candidate space
    # is the catalog, and trained on its own top-n alone it forgets the rest (see the module doc)
    catalog_negatives: int = 200
    lcron_recall_quota: int = 100  # recall's quota inside LCRON's n-item training lists
    tau: float = 200.0  # LCRON's NeuralSort temperature, on the scale of list length x logit gaps
    lists_per_batch: int = 32

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method '{self.method}' is not one of {', '.join(METHODS)}")
        if not 0 < self.rank_quota < self.prerank_quota < self.recall_quota:
            raise ValueError(f"need 0 < rank_quota < prerank_quota < recall_quota, got {self.rank_quota}, {self.prerank_quota} and {self.recall_quota}")
        if self.self_positives not in ("all", "listed"):
            raise ValueError(f"self_positives: '{self.self_positives}' is not 'all' or 'listed'")
        if self.recall_self not in ("lists", "retrieval"):
            raise ValueError(f"recall_self: '{self.recall_self}' is not 'lists' or 'retrieval'")
        unknown = sorted(set(self.trained) - {"rank", "prerank", "recall"})
        if unknown:
            raise ValueError(f"trained: unknown stage '{unknown[0]}' (stages: rank, prerank, recall)")
        if not self.prerank_quota < self.lcron_recall_quota <= self.recall_quota:
            raise ValueError(f"need prerank_quota < lcron_recall_quota <= recall_quota, got {self.prerank_quota}, {self.lcron_recall_quota} and {self.recall_quota}")


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


# What the command line overrides (``--epochs``, ``--seed``, ``--device``, ``--out``), in config
# form ({"train": {...}, "out": ...}): applied to every experiment loaded in this process, so the
# stages a cascade loads by name get them too. Set only by ``cascade.cli``.
COMMAND_LINE: dict[str, Any] = {}


def load_config(path: str | Path, experiment: str | None = None) -> list[ExperimentConfig]:
    """The experiments of a config file (one when ``experiment`` names it), with the command
    line's overrides (``COMMAND_LINE``)."""
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
        raw = _merge(_merge(body.get("base") or {}, body["experiments"][name] or {}), COMMAND_LINE)
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
