"""``task: blend``: a rank stage that is a weighted sum of per-list standardised scores of
trained models and item fields (``cascade.blend``), its weights chosen on validation lists.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn

from cascade import metrics as M
from cascade.blend import BLEND, Blend, blend_weights, standardised
from cascade.config import ConfigError, ExperimentConfig
from cascade.data.lists import ListBatch, build_lists
from cascade.data.store import write_atomic
from cascade.models import blend_parts, load_trained, score_lists
from cascade.saved import write_results
from cascade.tasks.recall import task_logs
from cascade.towers.embedding import Slot


def train_blend(exp: ExperimentConfig, models: dict[str, Callable[..., nn.Module]], train_part: Callable) -> dict:
    """Choose a blend's weights (``cascade.blend``) on the validation lists of its data, never on
    test: each model part trained first (``train_part``) if its run folder has none, every part
    scored and standardised per list, the weights by ``blend_weights`` on ``train.monitor``
    (Recall@k or NDCG@k of the logged positives). Writes ``best.pt`` (the blend with its parts'
    weights) and ``results.json``: the weights, and the blend beside each part alone on valid and
    test."""
    if exp.model.name != BLEND:
        raise ConfigError(f"{exp.where}.model.name: a 'task: blend' experiment's model is '{BLEND}', got '{exp.model.name}'")
    if exp.data.stream == "always":
        raise ConfigError(f"{exp.where}.data.stream: a blend reads its validation and test lists whole; set stream: auto or never")
    ds, _ = task_logs(exp.data, whole=True)
    parts = blend_parts(exp, ds)
    loaded = {name: None if e is None else load_trained(e, ds, models, train_part) for name, e in parts.items()}
    lists = {split: build_lists(ds, split) for split in ("valid", "test")}
    metric, k = exp.train.monitor.split("@")
    quality = {"recall": M.recall_at_k, "ndcg": M.ndcg_at_k}[metric]
    figures = lambda scores, lst: {f"recall@{k}": quality_of(M.recall_at_k, scores, lst, int(k)), f"ndcg@{k}": quality_of(M.ndcg_at_k, scores, lst, int(k))}  # noqa: E731
    z = {}
    for split, lst in lists.items():
        raw = [lst.item[name].astype(np.float32) if m is None else score_lists(m, lst) for name, m in loaded.items()]
        z[split] = [standardised(torch.from_numpy(r), torch.from_numpy(lst.mask)).numpy() for r in raw]
    weights = blend_weights(z["valid"], lambda s: quality_of(quality, s, lists["valid"], int(k)))
    fields = {name: Slot(name, 0, 1, name) for name, m in loaded.items() if m is None}
    blend = Blend(loaded, weights, fields)
    exp.run_dir.mkdir(parents=True, exist_ok=True)
    state = {key: v.cpu() for key, v in blend.state_dict().items()}
    write_atomic(exp.run_dir / "best.pt", lambda f: torch.save(state, f))
    result = {"experiment": exp.name, "task": "blend", "model": BLEND, "weights": dict(zip(loaded, weights))}
    for split, lst in lists.items():
        blended = score_lists(blend, lst)
        result[split] = figures(blended, lst)
        result[f"{split}_parts"] = {name: figures(part, lst) for name, part in zip(loaded, z[split])}
    write_results(exp.run_dir, result)  # last: the mark of a complete run
    print(f"{exp.name}: " + " + ".join(f"{w:g} z({name})" for name, w in result["weights"].items()) + f" (on valid {exp.train.monitor}); test " + " ".join(f"{key} {v:.4f}" for key, v in result["test"].items()) + "; alone: " + "; ".join(f"{name} " + " ".join(f"{v:.4f}" for v in f.values()) for name, f in result["test_parts"].items()), flush=True)
    return result


def quality_of(metric: Callable, scores: np.ndarray, lists: ListBatch, k: int) -> float:
    """A list metric (``metrics.recall_at_k``, ``ndcg_at_k``) of ``scores`` against the lists'
    logged positives, as one number."""
    return float(metric(scores, lists.label, k, lists.mask))


def run(exp: ExperimentConfig, context) -> dict:
    """``task: blend`` (``cascade.tasks.TASKS``): a part without a run is trained first."""
    return train_blend(exp, context.models, context.train)
