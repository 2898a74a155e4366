"""``task: recall``: a retrieval two-tower trained with sampled softmax over the catalog, and the
recall output it makes for the stages after it.

``frozen_recall_output`` is what makes a ``data.kind: recall_output`` data set: a recall
experiment's top-n of the catalog for every request, the recall tower trained first if its run
is missing. ``task_logs`` is how every task reads its logs, with that maker passed to
``cascade.prepare``: the one place reading data can train a model.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from cascade.config import ConfigError, DataConfig, ExperimentConfig, load_config
from cascade.data.store import Dataset, read_dataset, write_dataset
from cascade.data.trend import ItemTrend, with_trend
from cascade.models import MODELS, build_model, load_trained
from cascade.prepare import prepare_data, recall_trend_spec, streams
from cascade.recall import RecallStep, evaluate_recall, item_table, recall_output, streamed_training_data, training_pairs
from cascade.saved import write_results
from cascade.train import Trainer


def task_logs(cfg: DataConfig, whole: bool = False) -> tuple[Dataset, bool]:
    """A task's logs and whether their candidates stream (``data.stream``; ``whole``: read every
    candidate regardless, for a step that needs them in memory). A missing recall output is made
    by ``frozen_recall_output``, which trains its recall experiment when that has no run."""
    streamed = False if whole else streams(cfg, frozen_recall_output)
    return prepare_data(cfg, candidates=not streamed, recall_output=frozen_recall_output), streamed


def frozen_recall_output(spec: dict) -> Dataset:
    """``cascade.recall.recall_output`` of the recall experiment ``spec`` names ({config, experiment, n,
    folds}), trained first unless its run folder holds ``best.pt`` and ``results.json``.

    ``folds`` > 1 cross-fits the training lists: the training requests are split into that many
    seeded folds and each fold's lists come from a copy of the recall experiment trained without
    it (its fold as validation), so the lists a ranker trains on look like the ones it serves: a
    recall tower retrieves the positives it was trained on far more often (on MovieLens-1M 26.5
    rated items per training list against 2.1 per test list). Valid and test lists come from the
    recall trained on every training request, as before.

    ``trend_days`` (a list of windows in days) adds each candidate's item trend (``cascade.data.trend``:
    the item's exposures in the logs in that window before the request) as item fields, on
    ``trend_scale`` (``count``, the default, or ``list``: its percentile in its list)."""

    missing = sorted({"config", "experiment"} - set(spec))
    if missing:
        raise ConfigError(f"data.recall: '{missing[0]}' is required for kind 'recall_output'")
    trend = recall_trend_spec(spec)
    (exp,) = load_config(spec["config"], spec["experiment"])
    if exp.task != "recall":
        raise ConfigError(f"data.recall: experiment '{exp.name}' of {spec['config']} is not a recall task")
    ds, _ = task_logs(exp.data, whole=True)
    n, folds = int(spec.get("n", 200)), int(spec.get("folds", 1))
    out = recall_output(ds, load_trained(exp, ds, MODELS, train_recall), n)
    if folds > 1:
        out = cross_fitted(exp, ds, out, n, folds)
    return with_trend(out, ItemTrend.from_dataset(ds), trend) if trend else out


def cross_fitted(exp: ExperimentConfig, ds: Dataset, out: Dataset, n: int, folds: int) -> Dataset:
    """``out`` with each training request's list retrieved by a copy of recall experiment ``exp``
    trained without its fold (``frozen_recall_output``)."""
    req, cand = ds.requests, out.candidates
    train_rows = np.flatnonzero(req["split"] == "train")
    fold = np.full(len(req["request_id"]), -1)  # a training request's fold; -1 for valid and test
    fold[np.random.default_rng(exp.train.seed).permutation(train_rows)] = np.arange(len(train_rows)) % folds
    pieces = [{k: v[~np.isin(cand["request_id"], req["request_id"][train_rows])] for k, v in cand.items()}]
    for f in range(folds):
        # the fold's requests become the copy's validation; valid and test its (unused) test
        split = np.where(fold == f, "valid", np.where(req["split"] == "train", "train", "test"))
        fold_dir = Path(exp.data.dir).parent / f"{Path(exp.data.dir).name}_fold{f + 1}of{folds}"
        if not (fold_dir / "schema.json").exists():
            schema = replace(ds.schema, temporal=False)  # a random fold split does not follow time
            write_dataset(replace(ds, schema=schema, requests={**req, "split": split}), fold_dir)
        fold_exp = replace(exp, name=f"{exp.name}_fold{f + 1}of{folds}", data=replace(exp.data, kind="logs", dir=str(fold_dir)))
        fold_ds = read_dataset(fold_dir)
        fold_out = recall_output(fold_ds, load_trained(fold_exp, fold_ds, MODELS, train_recall), n).candidates
        rows = np.isin(fold_out["request_id"], req["request_id"][fold == f])
        pieces.append({k: v[rows] for k, v in fold_out.items()})
    merged = {k: np.concatenate([p[k] for p in pieces]) for k in cand}
    order = np.argsort(merged["request_id"], kind="stable")  # each list keeps its retrieval order
    return replace(out, candidates={k: v[order] for k, v in merged.items()})


def train_recall(exp: ExperimentConfig, models: dict[str, Callable[..., nn.Module]] = MODELS) -> dict:
    """Train a retrieval two-tower with sampled softmax; early-stop on validation Recall@k of the
    catalog retrieval (``train.monitor``, e.g. ``recall@200``); score test. A streamed run
    (``data.stream``) reads the candidates a row group at a time and keeps only the positives
    and the training pairs (``recall.streamed_training_data``)."""
    ds, streamed = task_logs(exp.data)
    torch.manual_seed(exp.train.seed)
    model = build_model(exp, ds, models)
    if getattr(model, "dot_scale", None) is None:  # recall searches the catalog's item vectors by inner product
        raise ConfigError(f"{exp.where}.model.name: '{exp.model.name}' cannot be a recall model: it does not score by one dot of a user and an item vector (recall: {', '.join(n for n, m in models.items() if isinstance(getattr(m, 'dot_scale', None), property))})")
    try:
        table = item_table(ds, model.item_slots)
    except ValueError as e:
        raise ConfigError(f"{exp.where}.model.drop_fields: {e}") from None
    if streamed:
        ds, train = streamed_training_data(ds, exp.data.dir, model, table, exp.recall)
    else:
        train = training_pairs(ds, model, "train", table, exp.recall)
    step = RecallStep(exp.recall, model, table, ds.items["item_id"], train)
    trainer = Trainer(model, exp.train, exp.run_dir)
    trainer.log(f"{exp.name}: recall with {exp.model.name} on {exp.data.dir}{' (streamed)' if streamed else ''}: {len(train):,} training pairs, {len(ds.items['item_id']):,} items")
    best = trainer.fit(train, step_loss=lambda b: step(model, b), evaluate=lambda: evaluate_recall(model, ds, "valid"), resolved_config=exp.to_dict())
    result = {"experiment": exp.name, "model": exp.model.name, "task": "recall", "best_epoch": best.get("epoch"), "valid": {k: v for k, v in best.items() if k.startswith("recall@")}, "test": evaluate_recall(model, ds, "test"), "seconds_per_epoch": best.get("seconds"), **trainer.parallel}
    write_results(exp.run_dir, result)  # last: the mark of a complete run
    trainer.log(f"test: {json.dumps(result['test'])}")
    return result


def run(exp: ExperimentConfig, context) -> dict:
    """``task: recall`` (``cascade.tasks.TASKS``)."""
    return train_recall(exp, context.models)
