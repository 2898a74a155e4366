"""Typed experiment configs from YAML.

A config file holds a ``base`` block and named ``experiments``; each experiment is ``base`` with
its own keys merged over it (FuxiCTR style). Unknown keys are errors that name the key. Models
are found through the explicit ``MODELS`` registry in ``cascade.models``, tasks through
``cascade.tasks.TASKS`` (names, help and monitors; that package's ``__init__`` imports nothing of
the package, so this module may read it), never by name lookup in modules.
"""

from __future__ import annotations

import math
import re
import types
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Iterator, Union, get_args, get_origin, get_type_hints

import torch

from cascade.tasks import TASKS
from cascade.train import TrainConfig, above, at_least
from cascade.yamlfile import YamlError, read_yaml


METHODS = ("frozen", "rankflow", "lcron")  # task: cascade


@dataclass(frozen=True)
class RecallConfig:
    temperature: float = 0.05
    popularity_negatives: int = 0  # M per batch, drawn by popularity ** popularity_power
    popularity_power: float = 0.75
    hard_negatives: int = 0  # K per pair, from the request's logged items cut before rank
    # "positive": each logged positive counts once; "request": each request counts once, as
    # Recall@k averages over requests (a pair weighs mean positives / its request's positives)
    pair_weight: str = "positive"
    seed: int = 0

    def __post_init__(self) -> None:
        above(self, temperature=0)
        at_least(self, popularity_negatives=0, popularity_power=0, hard_negatives=0, seed=0)
        if self.pair_weight not in ("positive", "request"):
            raise ValueError(f"pair_weight: '{self.pair_weight}' is not 'positive' or 'request'")


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
    # train only on requests whose history holds at least this many events (returning users'
    # sessions, which a temporal test split is made of); 0: every training request
    min_history: int = 0

    def __post_init__(self) -> None:
        above(self, arf_tau=0, kd_temperature=0)
        at_least(self, lists_per_batch=1, arf_global_rows=1, tutor_alpha=0, min_history=0)
        if self.tutor_alpha > 1:
            raise ValueError(f"tutor_alpha: {self.tutor_alpha} is above 1")
        if not 0 < self.rank_quota < self.prerank_quota:
            raise ValueError(f"need 0 < rank_quota < prerank_quota, got {self.rank_quota} and {self.prerank_quota}")
        weights = [self.exposure_bce, self.rankflow_bce, self.tutor, self.arf, self.listwise_kd, self.logit_mse, self.soft_bce]
        if min(weights) < 0 or max(weights) == 0:
            raise ValueError("loss weights must be >= 0 and at least one > 0")
        if self.teacher is None and self.guided:
            raise ValueError("tutor, arf, listwise_kd, logit_mse and soft_bce need a teacher")

    @property
    def guided(self) -> bool:
        """Whether a term learns from the teacher (else the mix learns from labels alone)."""
        return max(self.tutor, self.arf, self.listwise_kd, self.logit_mse, self.soft_bce) > 0


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
    # the stages the method trains: rankflow's rounds (any of the three); lcron: recall and/or
    # prerank (the other one stays as it is)
    trained: tuple[str, ...] = ("rank", "prerank", "recall")
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
        above(self, tau=0, recall_lr=0)
        at_least(self, rounds=1, self_epochs=0, tutor_epochs=0, lcron_epochs=1, catalog_negatives=0, lists_per_batch=1, tutor_alpha=0, recall_tutor_alpha=0)
        for key in ("tutor_alpha", "recall_tutor_alpha"):
            if getattr(self, key) > 1:
                raise ValueError(f"{key}: {getattr(self, key)} is above 1")
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
        if self.method == "lcron" and not {"recall", "prerank"} & set(self.trained):
            raise ValueError(f"trained: lcron trains recall or prerank, and {list(self.trained)} names neither")
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
    # recall_output: {config, experiment, n, folds, trend_days, trend_scale}: a recall experiment (trained first if needed)
    # whose top-n per request, labelled from its data's logs, becomes this directory's candidates;
    # folds > 1 cross-fits the training requests' lists (tasks.recall.frozen_recall_output)
    recall: dict[str, Any] = field(default_factory=dict)
    # pointwise, distill and recall training: read the candidates a row group at a time (cascade.data.stream)
    # rather than whole; auto streams logs whose in-memory copies would not fit (stream.fits_in_memory)
    stream: str = "auto"  # auto | always | never

    def __post_init__(self) -> None:
        if self.stream not in ("auto", "always", "never"):
            raise ValueError(f"stream: '{self.stream}' is not one of auto, always, never")
        if self.kind not in DATA_KINDS:
            raise ValueError(f"kind: '{self.kind}' is not one of {', '.join(DATA_KINDS)}")
        if self.protocol not in ("ctr", "cascade"):
            raise ValueError(f"protocol: '{self.protocol}' is not 'ctr' or 'cascade'")
        if not self.dir:
            raise ValueError("dir: empty")


DATA_KINDS = ("synth", "movielens", "recall_output", "logs")


@dataclass(frozen=True)
class ModelConfig:
    name: str = "dssm"
    embedding_dim: int = 32
    drop_fields: tuple[str, ...] = ()  # fields the model leaves out ("history" for the history)
    history_fields: tuple[str, ...] = ()  # item fields each history item is embedded with, beside its id (Embeddings.items)
    params: dict[str, Any] = field(default_factory=dict)  # the model constructor's own keywords

    def __post_init__(self) -> None:
        at_least(self, embedding_dim=1)


@dataclass(frozen=True)
class ExperimentConfig:
    name: str
    data: DataConfig
    model: ModelConfig
    train: TrainConfig
    out: str = "runs"
    # pointwise: BCE on exposures | recall: retrieval over the catalog | distill: a pre-ranker on
    # the flow's lists | blend: a model's weights chosen on validation lists (model.name: blend) |
    # cascade: recall -> pre-rank -> rank reported and trained as one
    task: str = "pointwise"
    recall: RecallConfig = field(default_factory=RecallConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    cascade: CascadeConfig = field(default_factory=CascadeConfig)
    source: str = ""  # the config file it was read from

    @property
    def run_dir(self) -> Path:
        return Path(self.out) / self.name

    @property
    def where(self) -> str:
        """How errors name it: 'FILE: experiments.NAME'."""
        return f"{self.source}: experiments.{self.name}"

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


TYPE_NAMES = {int: "a whole number", float: "a number", str: "text", bool: "true or false", dict: "a mapping", type(None): "empty (null)"}


def _type_name(hint: Any) -> str:
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(hint))
    if origin is tuple:
        return f"a list of {_type_name(get_args(hint)[0])}"
    return TYPE_NAMES.get(origin or hint, str(hint))


def _matches(value: Any, hint: Any) -> bool:
    """Whether a YAML value fits a dataclass field's annotation (a bool is no number; an int is a
    float; a list is a tuple; NaN and infinities are no numbers)."""
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        return any(_matches(value, a) for a in get_args(hint))
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    if hint is dict or origin is dict:
        return isinstance(value, dict)
    if origin is tuple:
        return isinstance(value, (list, tuple)) and all(_matches(v, get_args(hint)[0]) for v in value)
    return True


def _build(cls, raw: Any, where: str):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {raw!r}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key '{unknown[0]}' (known: {', '.join(sorted(known))})")
    hints = get_type_hints(cls)
    for key, value in raw.items():
        if not _matches(value, hints[key]):
            raise ConfigError(f"{where}.{key}: {value!r} is not {_type_name(hints[key])}")
    try:
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in raw.items()})
    except (TypeError, ValueError) as e:
        key = str(e).split(":")[0]  # "lr: -0.001 must be above 0" -> where.lr: ...
        raise ConfigError(f"{where}.{e}" if key in known else f"{where}: {e}") from None


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
    if value not in TASKS:  # the registry of cascade.tasks, which imports nothing of the package
        raise ConfigError(f"{where}.task: '{value}' is not one of {', '.join(TASKS)}")
    return value


# What the command line overrides (``--epochs``, ``--seed``, ``--device``, ``--out``), in config
# form ({"train": {...}, "out": ...}), for the command running: every experiment loaded inside
# ``command_line``'s block gets them, so the stages a cascade loads by name get them too.
_COMMAND_LINE: ContextVar[dict[str, Any]] = ContextVar("command_line", default={})


@contextmanager
def command_line(overrides: dict[str, Any]) -> Iterator[None]:
    """Apply ``overrides`` (config form: ``{"train": {"epochs": 3}, "out": "runs/x"}``) to every
    experiment ``load_config`` returns inside the block, then forget them."""
    token = _COMMAND_LINE.set(dict(overrides))
    try:
        yield
    finally:
        _COMMAND_LINE.reset(token)


NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
SECTIONS = {"data", "model", "train", "out", "task", "recall", "distill", "cascade"}


def _output_path(value: Any, where: str) -> str:
    """``out`` from a config file: a folder of its own. Relative to the directory the command runs
    in and never climbing out of it ('..'); an absolute path is an explicit choice and allowed."""
    if not isinstance(value, str) or Path(value.strip()) == Path("."):
        raise ConfigError(f"{where}.out: {value!r} is not a folder of its own (e.g. runs/my_job)")
    if ".." in Path(value).parts:
        raise ConfigError(f"{where}.out: '{value}' climbs out of the directory the command runs in; give a path without '..' (or --out on the command line)")
    return value


def _inputs_relative_to(exp: ExperimentConfig, base: Path) -> ExperimentConfig:
    """Paths the config reads (data.src, a 'kind: logs' dir, other config files) resolved against
    the config file's folder."""
    rel = lambda p: str(base / p) if p is not None and not Path(p).is_absolute() else p  # noqa: E731
    data = replace(exp.data, src=rel(exp.data.src), dir=rel(exp.data.dir) if exp.data.kind == "logs" else exp.data.dir)
    if "config" in data.recall:
        data = replace(data, recall={**data.recall, "config": rel(data.recall["config"])})
    cascade = exp.cascade
    if "config" in cascade.recall:
        cascade = replace(cascade, recall={**cascade.recall, "config": rel(cascade.recall["config"])})
    return replace(exp, data=data, cascade=cascade)


def load_config(path: str | Path, experiment: str | None = None) -> list[ExperimentConfig]:
    """The experiments of a config file (one when ``experiment`` names it), with the command
    line's overrides (``command_line``). Every key is type- and range-checked here, before any
    work: errors name the file and the key."""
    path = Path(path)
    try:
        body = read_yaml(path)
    except YamlError as e:
        raise ConfigError(str(e)) from None
    if "experiments" not in body:
        raise ConfigError(f"{path}: needs an 'experiments' mapping (and optionally 'base')")
    extra = sorted(set(body) - {"base", "experiments"}, key=str)
    if extra:
        raise ConfigError(f"{path}: unknown top-level key '{extra[0]}'")
    for key in ("base", "experiments"):
        if not isinstance(body.get(key) or {}, dict):
            raise ConfigError(f"{path}: '{key}' must be a mapping")
    names = list(body["experiments"] or {})
    for name in names:
        if not isinstance(name, str) or not NAME.match(name):
            raise ConfigError(f"{path}: experiments: '{name}' is not a plain name (letters, digits, '_', '.', '-'; it names the run folder)")
        if not isinstance(body["experiments"][name] or {}, dict):
            raise ConfigError(f"{path}: experiments.{name}: expected a mapping")
    if experiment is not None:
        if experiment not in names:
            raise ConfigError(f"{path}: no experiment '{experiment}' (have: {', '.join(names)})")
        names = [experiment]
    out = []
    for name in names:
        from_file = _merge(body.get("base") or {}, body["experiments"][name] or {})
        where = f"{path}: experiments.{name}"
        extra = sorted(set(from_file) - SECTIONS)
        if extra:
            raise ConfigError(f"{where}: unknown key '{extra[0]}' (known: {', '.join(sorted(SECTIONS))})")
        _output_path(from_file.get("out", "runs"), where)
        raw = _merge(from_file, _COMMAND_LINE.get())
        exp = ExperimentConfig(
            name=name,
            data=_build(DataConfig, raw.get("data"), f"{where}.data"),
            model=_build(ModelConfig, raw.get("model"), f"{where}.model"),
            train=_train(raw.get("train"), f"{where}.train"),
            out=raw.get("out", "runs"),
            task=_task(raw.get("task", "pointwise"), where),
            recall=_build(RecallConfig, raw.get("recall"), f"{where}.recall"),
            distill=_build(DistillConfig, raw.get("distill"), f"{where}.distill"),
            cascade=_build(CascadeConfig, raw.get("cascade"), f"{where}.cascade"),
            source=str(path),
        )
        exp = _inputs_relative_to(exp, path.parent)
        missing = sorted({"config", "experiment"} - set(exp.cascade.recall))
        if exp.task == "cascade" and missing:
            raise ConfigError(f"{where}.cascade.recall: '{missing[0]}' is required (the recall experiment: {{config, experiment}})")
        if (exp.model.name == "blend") != (exp.task == "blend") and exp.task != "cascade":
            raise ConfigError(f"{where}: a blend is model.name 'blend' with task 'blend' (its weights are chosen, not trained), got model '{exp.model.name}' with task '{exp.task}'")
        if exp.data.stream == "always" and exp.model.name == "gbdt" and exp.task != "cascade":
            raise ConfigError(f"{where}.data.stream: 'always', but a LightGBM model (gbdt) reads its data whole; set stream: auto or never")
        allowed = TASKS[exp.task].monitors(exp)
        if allowed is not None and exp.train.monitor not in allowed:
            raise ConfigError(f"{where}.train.monitor: '{exp.train.monitor}' is not a validation metric of a '{exp.task}' task (it has: {', '.join(allowed)})")
        if exp.data.kind == "logs" and not (Path(exp.data.dir) / "schema.json").is_file():
            raise ConfigError(f"{where}.data.dir: '{exp.data.dir}' is not a cascade log directory (no schema.json; make one with `cascade data import`)")
        out.append(exp)
    return out
