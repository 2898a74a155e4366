"""Models to ONNX (torch's dynamo exporter) and onnxruntime sessions over the result.

Every exported graph takes one int64 input per feature field, named after the field (the history
as ``history``): ``(B,)`` for a single-valued field, ``(B, width)`` for a multi-valued one or the
history, and for a ranker's candidates ``(B, N)`` / ``(B, N, width)``; the batch and candidate
dimensions are dynamic. ``FieldInputs`` packs them into the towers' own packed input inside the
graph. BatchNorm is folded into the Linear before it (``fold_batchnorm``): onnxruntime runs a
standalone BatchNormalization slowly, and a folded layer is one Gemm.

- two-tower pre-rankers (``export_two_tower``): ``user.onnx`` -> ``(B, Hu, D)``, ``item.onnx`` ->
  ``(B, Hv, D)``, and ``score.onnx`` (u, v) -> ``(B, N)`` where the score is not a plain dot;
- the recall tower: its ``user.onnx`` only (its item side goes into a faiss index);
- a ranker (DIN): the whole model, (user fields, candidate fields) -> logits ``(B, N)``.
"""

from __future__ import annotations

import copy
import logging
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from cascade.data.lists import ListBatch
from cascade.towers.embedding import HISTORY, Slot


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """A copy of ``module`` in eval mode with every ``Linear -> BatchNorm1d`` pair of a Sequential
    made one Linear: ``W' = W * s``, ``b' = (b - mean) * s + beta``, ``s = gamma / sqrt(var + eps)``.
    Refuses a BatchNorm it cannot fold (naming it), so no standalone one reaches the graph."""
    folded = copy.deepcopy(module).eval()
    for seq in folded.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        for i in range(1, len(seq)):
            linear, norm = seq[i - 1], seq[i]
            if isinstance(linear, nn.Linear) and isinstance(norm, nn.BatchNorm1d):
                with torch.no_grad():
                    s = norm.weight / torch.sqrt(norm.running_var + norm.eps)
                    bias = linear.bias if linear.bias is not None else torch.zeros_like(norm.running_mean)
                    fused = nn.Linear(linear.in_features, linear.out_features)
                    fused.weight.copy_(linear.weight * s[:, None])
                    fused.bias.copy_((bias - norm.running_mean) * s + norm.bias)
                seq[i - 1], seq[i] = fused, nn.Identity()
    left = [name for name, m in folded.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if left:
        raise ValueError(f"BatchNorm '{left[0]}' does not follow a Linear in a Sequential and cannot be folded")
    return folded


class FieldInputs(nn.Module):
    """``module(*packed)`` with one input per field: ``forward(*fields)`` concatenates each
    group's fields (in its slots' order) on the last axis into that group's packed tensor."""

    def __init__(self, module: nn.Module, *groups: tuple[Slot, ...]):
        super().__init__()
        self.module, self.groups = module, groups

    def forward(self, *fields: torch.Tensor) -> torch.Tensor:
        packed, i = [], 0
        for slots in self.groups:
            cols = []
            for s in slots:
                x = fields[i]
                cols.append(x.unsqueeze(-1) if s.width == 1 else x)
                i += 1
            packed.append(torch.cat(cols, dim=-1))
        return self.module(*packed)


class ScoreHead(nn.Module):
    """A pre-ranker's score alone: u (B, Hu, D), v (B, N, Hv, D) -> (B, N)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.model.score(u, v)


def user_inputs(lists: ListBatch, slots: tuple[Slot, ...]) -> dict[str, np.ndarray]:
    """The user side of ``lists`` as one int64 array per slot: (B,) or (B, width)."""
    out = {}
    for s in slots:
        if s.name == HISTORY:
            h = lists.history[:, : s.width]
            v = np.pad(h, ((0, 0), (0, s.width - h.shape[1])))
        else:
            v = lists.user[s.name]
            if v.ndim == 2 and s.width == 1 and v.shape[1] == lists.list_size and lists.list_size > 1:
                raise ValueError(f"user field '{s.name}' is stored per candidate: a tower that runs once per request cannot take it")
        out[s.name] = np.ascontiguousarray(v.reshape(len(lists), -1) if s.width > 1 else v.reshape(len(lists)), dtype=np.int64)
    return out


def item_inputs(lists: ListBatch, slots: tuple[Slot, ...]) -> dict[str, np.ndarray]:
    """The candidates of ``lists`` as one int64 array per slot: (B, N) or (B, N, width)."""
    b, n = lists.mask.shape
    return {s.name: np.ascontiguousarray(lists.item[s.name].reshape((b, n, -1) if s.width > 1 else (b, n)), dtype=np.int64) for s in slots}


def flat_items(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Candidate inputs (B, N[, w]) as an item tower's batch (B * N[, w])."""
    return {k: v.reshape((-1,) + v.shape[2:]) for k, v in inputs.items()}


def export_module(module: nn.Module, examples: dict[str, np.ndarray], path: str | Path, output_name: str, candidates: tuple[str, ...] = ()) -> Path:
    """Export ``module(*examples.values())`` with every input's first dimension (the batch)
    dynamic, and the second of the inputs named in ``candidates`` (the candidate count)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module.eval()
    batch, n = torch.export.Dim("batch"), torch.export.Dim("candidates")
    tensors = tuple(torch.from_numpy(np.ascontiguousarray(v)) for v in examples.values())
    shapes = tuple({0: batch, 1: n} if name in candidates else {0: batch} for name in examples)
    if isinstance(module, FieldInputs):  # one *fields argument: torch.export wants its shapes as one entry
        shapes = {"fields": shapes}
    # the exporter's own deprecation notes, "torchvision is not installed" and onnxscript's
    # "Skipping constant folding for op Split" (DIN's q/k split stays a node) say nothing to a user
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    logging.getLogger("onnxscript.optimizer._constant_folding").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", UserWarning)
        program = torch.onnx.export(module, tensors, dynamo=True, dynamic_shapes=shapes, input_names=list(examples), output_names=[output_name], verbose=False)
    program.save(str(path))
    return path


def export_tower(tower: nn.Module, slots: tuple[Slot, ...], examples: dict[str, np.ndarray], path: str | Path) -> Path:
    """A tower (its fields) -> ``vec`` (B, H, D), BatchNorm folded."""
    return export_module(FieldInputs(fold_batchnorm(tower), slots), examples, path, "vec")


def export_two_tower(model: nn.Module, lists: ListBatch, out: str | Path) -> dict[str, str]:
    """``user.onnx``, ``item.onnx`` and, when ``model.dot_scale`` is None, ``score.onnx`` into
    ``out``; ``lists`` gives the example inputs. Returns the file names by part."""
    out = Path(out)
    users = user_inputs(lists, model.user_slots)
    items = flat_items(item_inputs(lists, model.item_slots))
    files = {"user": "user.onnx", "item": "item.onnx"}
    export_tower(model.user, model.user_slots, users, out / files["user"])
    export_tower(model.item, model.item_slots, items, out / files["item"])
    if model.dot_scale is None:
        folded = fold_batchnorm(model).eval()
        with torch.no_grad():
            u = FieldInputs(folded.user, model.user_slots)(*map(torch.from_numpy, users.values()))
            v = FieldInputs(folded.item, model.item_slots)(*map(torch.from_numpy, items.values()))
        b = len(lists)
        example = {"u": u.numpy(), "v": v.reshape(b, -1, *v.shape[1:]).numpy()}
        files["score"] = "score.onnx"
        export_module(ScoreHead(folded), example, out / files["score"], "score", candidates=("v",))
    return files


def export_ranker(model: nn.Module, lists: ListBatch, path: str | Path) -> Path:
    """A whole ranker (user fields, candidate fields) -> ``score`` (B, N), BatchNorm folded."""
    examples = user_inputs(lists, model.user_slots) | item_inputs(lists, model.item_slots)
    module = FieldInputs(fold_batchnorm(model), model.user_slots, model.item_slots)
    return export_module(module, examples, path, "score", candidates=tuple(s.name for s in model.item_slots))


def session(path: str | Path, threads: int = 1) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
