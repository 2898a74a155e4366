"""The tasks an experiment trains by (its ``task:``), one module each, and the one list of them.

``TASKS`` is the registry the config check, `cascade run`'s step order and the CLI's help all
read: each task's one-line help, the validation metrics ``train.monitor`` may name, and the
module whose ``run(exp, context)`` trains it. The modules import ``cascade.config``, which reads
this registry, so they are imported when a task runs (``train_experiment``), not here: this file
imports nothing of the package.

- ``pointwise``: BCE on the logged exposures (``tasks.pointwise``);
- ``recall``: a two-tower over the catalog with sampled softmax, and the recall output it makes
  for the stages after it (``tasks.recall``);
- ``blend``: a weighted sum of standardised scores, weights chosen on validation (``tasks.blend``);
- ``distill``: a model on recall's lists against a frozen teacher (``tasks.distill``);
- ``cascade``: the three stages as one, frozen or trained by RankFlow or LCRON (``tasks.cascade``,
  its stage data in ``tasks.stage_data``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

# a cascade.config.ExperimentConfig: not imported, not even for type checking, since config reads
# this registry and imports flow one way
ExperimentConfig = Any


def _pointwise_monitors(exp: ExperimentConfig) -> tuple[str, ...] | None:
    return None if exp.model.name == "gbdt" else ("auc", "gauc", "logloss")  # LightGBM early-stops its own way


def _distill_monitors(exp: ExperimentConfig) -> tuple[str, ...]:
    k, m = exp.distill.rank_quota, exp.distill.prerank_quota
    return (f"teacher_recall@{k}@20", f"teacher_recall@{k}@{m}", f"recall@{k}", f"ndcg@{k}", "oracle_ratio")


def _blend_monitors(exp: ExperimentConfig) -> tuple[str, ...]:
    k = exp.distill.rank_quota
    return (f"recall@{k}", f"ndcg@{k}")


@dataclass(frozen=True)
class Task:
    """A task: its help line, the metrics ``train.monitor`` may name (None: it trains a fixed
    schedule or its own way and ignores it), and ``cascade.tasks.MODULE``, whose
    ``run(exp, context)`` trains it."""

    help: str
    module: str
    monitors: Callable[[ExperimentConfig], tuple[str, ...] | None] = lambda exp: None


# In the order `cascade run` trains them: a blend may teach a student, and a cascade loads them all.
TASKS: dict[str, Task] = {
    "pointwise": Task("BCE on the logged exposures (any model; gbdt trains LightGBM)", "pointwise", _pointwise_monitors),
    "recall": Task("a two-tower over the whole catalog, sampled softmax (the recall stage)", "recall", lambda exp: ("recall@50", "recall@200")),
    "blend": Task(
        "sum_i w_i z(score_i) per list over models and item fields ('model: {name: blend,\n"
        "params: {parts: [din, item_trend_7d]}}'), the weights chosen on the validation lists",
        "blend",
        _blend_monitors,
    ),
    "distill": Task("a model on the recall lists with a loss mix, against a frozen teacher ('distill.teacher')", "distill", _distill_monitors),
    "cascade": Task(
        "recall -> pre-rank -> rank reported (and with 'method: rankflow|lcron' trained) as one;\n"
        "its run folder holds stages.json and stages/*.pt, what `cascade export` and `cascade eval` read",
        "cascade",
    ),
}


def tasks_help() -> str:
    """The tasks as `cascade train --help` lists them."""
    width = max(map(len, TASKS))
    lines = []
    for name, task in TASKS.items():
        first, *more = task.help.split("\n")
        lines += [f"  {name:<{width}}  {first}", *(f"  {'':<{width}}  {line}" for line in more)]
    return "tasks (an experiment's 'task:'):\n" + "\n".join(lines)


@dataclass(frozen=True)
class Context:
    """What a task trains with beyond its experiment: the config file it came from, the model
    registry, the models with a training function of their own (LightGBM), and ``named``, what an
    experiment it names becomes before use (see ``train_experiment``)."""

    config: Path
    models: dict[str, Callable[..., Any]]
    boosted: dict[str, Callable[..., dict]] = field(default_factory=dict)
    named: Callable[[ExperimentConfig], ExperimentConfig] = lambda exp: exp

    def train(self, exp: ExperimentConfig, config: str | Path | None = None) -> dict:
        """Train another experiment (a missing teacher, warm-up stage or blend part) of
        ``config`` (default: this context's)."""
        return train_experiment(exp, Path(config) if config else self.config, self.models, self.boosted, self.named)


def train_experiment(exp: ExperimentConfig, config: str | Path, models: dict[str, Callable[..., Any]], boosted: dict[str, Callable[..., dict]] | None = None, named: Callable = lambda exp: exp) -> dict:
    """Train one experiment of the config file ``config`` by its task (what `cascade train` runs).
    ``boosted``: models with their own training function (LightGBM), which trains them as a
    ``pointwise`` or ``distill`` task. ``named``: what an experiment this one names in ``config``
    (a student's teacher, a cascade's pre-rank and rank stages) becomes before use, e.g. the same
    experiment at another seed (benchmarks/distill_joint.py); a cascade's recall tower is not
    mapped, for it made the lists its stages were trained on. In a data-parallel run every rank
    returns once rank 0 has written the results."""
    from cascade.distributed import barrier

    context = Context(Path(config), models, boosted or {}, named)
    own = context.boosted.get(exp.model.name)
    if own is not None and exp.task in ("pointwise", "distill"):
        result = own(exp)
    else:
        result = importlib.import_module(f"cascade.tasks.{TASKS[exp.task].module}").run(exp, context)
    barrier()  # no rank looks for this run's results.json before rank 0 has written it
    return result

