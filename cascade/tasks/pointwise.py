"""``task: pointwise``: a model trained with BCE on the logged exposures, one sample at a time
(a CTR model, a pre-ranker trained independently of the ranker); early-stopped on validation
AUC and scored on test with AUC, GAUC and LogLoss.
"""

from __future__ import annotations

import json
from typing import Callable

import numpy as np
import torch
from torch import nn

from cascade import metrics as M
from cascade.config import ExperimentConfig
from cascade.data.lists import ListBatch, pointwise_lists
from cascade.data.schema import EXPOSED
from cascade.data.store import Dataset
from cascade.data.stream import SampleStream
from cascade.losses.pointwise import bce
from cascade.models import MODELS, build_model, predict, training_forward
from cascade.saved import write_results
from cascade.tasks.recall import task_logs
from cascade.towers.embedding import pack_items, pack_user
from cascade.train import StreamedTensors, Tensors, Trainer


def pointwise_step(model: nn.Module, batch: Tensors) -> torch.Tensor:
    """The pointwise training loss: BCE on the model's logits plus its own regulariser."""
    logits, regulariser = training_forward(model, batch)
    return bce(logits, batch.label, batch.mask) + regulariser


def exposures(ds: Dataset, split: str, model: nn.Module) -> tuple[ListBatch, Tensors]:
    """The logged exposures of a split, one sample per list (N = 1), packed for ``model``."""
    return packed(pointwise_lists(ds, split, min_stage=EXPOSED), model)


def packed(flat: ListBatch, model: nn.Module) -> tuple[ListBatch, Tensors]:
    """Samples (N = 1) and the same packed for ``model``: user, items, label and mask."""
    tensors = Tensors(
        user=torch.from_numpy(pack_user(flat, model.user_slots)),
        items=torch.from_numpy(pack_items(flat, model.item_slots)),
        label=torch.from_numpy(flat.label),
        mask=torch.from_numpy(flat.mask),
    )
    return flat, tensors


def streamed_metrics(model: nn.Module, stream: SampleStream, pack: Callable[[ListBatch], Tensors]) -> dict[str, float]:
    """``pointwise_metrics`` of ``model`` over a stream's samples, scored a row group at a time."""
    logits, labels, requests = [], [], []
    for flat in (f for f in stream.groups() if len(f)):
        logits.append(predict(model, pack(flat)))
        labels.append(flat.label)
        requests.append(flat.request_id)
    return pointwise_metrics(np.concatenate(logits), np.concatenate(labels), np.concatenate(requests))


def pointwise_metrics(logits: np.ndarray, label: np.ndarray, request_id: np.ndarray) -> dict[str, float]:
    """logits, label (n, 1), request_id (n,) -> AUC, LogLoss, GAUC (and the groups GAUC dropped)."""
    y = label[:, 0]
    s = logits[:, 0].astype(np.float64)
    gauc, dropped = M.gauc(y, s, request_id)
    return {"auc": M.auc(y, s), "logloss": M.logloss(y, 1 / (1 + np.exp(-s))), "gauc": gauc, "gauc_dropped": int(dropped)}


def train_pointwise(exp: ExperimentConfig, models: dict[str, Callable[..., nn.Module]] = MODELS) -> dict:
    """Train a pre-ranker with BCE on logged exposures; early-stop on validation; score test.
    A streamed run (``data.stream``) reads the exposures a row group at a time, and scores the
    valid and test ones a row group at a time too (only logits, labels and request ids kept)."""
    ds, streamed = task_logs(exp.data)
    torch.manual_seed(exp.train.seed)
    model = build_model(exp, ds, models)
    pack = lambda flat: packed(flat, model)[1]  # noqa: E731
    if streamed:
        stream = lambda split: SampleStream.open(exp.data.dir, split, EXPOSED, ds)  # noqa: E731
        train, held_out = StreamedTensors(stream("train"), pack), {s: stream(s) for s in ("valid", "test")}
        score = lambda split: streamed_metrics(model, held_out[split], pack)  # noqa: E731
    else:
        _, train = exposures(ds, "train", model)
        held_out = {s: pointwise_lists(ds, s, min_stage=EXPOSED) for s in ("valid", "test")}
        score = lambda split: pointwise_metrics(predict(model, pack(held_out[split])), held_out[split].label, held_out[split].request_id)  # noqa: E731
    trainer = Trainer(model, exp.train, exp.run_dir)
    trainer.log(f"{exp.name}: {exp.model.name} on {exp.data.dir}{' (streamed)' if streamed else ''}: train {len(train):,} valid {len(held_out['valid']):,} test {len(held_out['test']):,} samples; {sum(p.numel() for p in model.parameters()):,} parameters")
    best = trainer.fit(train, step_loss=lambda b: pointwise_step(model, b), evaluate=lambda: score("valid"), resolved_config=exp.to_dict())
    result = {"experiment": exp.name, "model": exp.model.name, "parameters": sum(p.numel() for p in model.parameters()), "best_epoch": best.get("epoch"), "valid": {k: best[k] for k in ("auc", "logloss", "gauc")}, "test": score("test"), "seconds_per_epoch": best.get("seconds"), "train_samples_per_s": best.get("samples_per_s"), **trainer.parallel}
    write_results(exp.run_dir, result)  # last: the mark of a complete run
    trainer.log(f"test: {json.dumps(result['test'])}")
    return result


def run(exp: ExperimentConfig, context) -> dict:
    """``task: pointwise`` (``cascade.tasks.TASKS``)."""
    return train_pointwise(exp, context.models)
