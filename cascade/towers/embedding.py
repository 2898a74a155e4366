"""The shared embedding layer and the packed tower inputs.

A tower takes one ``int64`` tensor: the ids of its fields side by side (``layout``), so every
tower exports to ONNX with a single plain input. ``pack_user`` / ``pack_items`` build those
tensors from a ``ListBatch``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from cascade.data.lists import ListBatch
from cascade.features import Field, FeatureSpec

HISTORY = "history"


@dataclass(frozen=True)
class Slot:
    """One field's columns in a tower's packed input: ``x[:, start:start + width]``, embedded
    with the table of field ``table`` (the history uses ``item_id``'s)."""

    name: str
    start: int
    width: int
    table: str


def layout(fields: tuple[Field, ...], history_len: int = 0) -> tuple[Slot, ...]:
    """Column layout of a packed tower input: each field in order, then the history if any."""
    slots, start = [], 0
    for f in fields:
        width = f.max_len if f.multi else 1
        slots.append(Slot(f.name, start, width, f.name))
        start += width
    if history_len:
        slots.append(Slot(HISTORY, start, history_len, "item_id"))
    return tuple(slots)


class Embeddings(nn.Module):
    """One embedding table per field, ids 0..vocab with row 0 the (zero, frozen) padding.

    ``forward(x (B, W) int64, slots) -> (B, F, E)``: a single-valued field is looked up; a
    multi-valued one (and the history) is the mean of its non-zero ids' embeddings, zero when
    it has none. Shared by both towers, so the history pools the item tower's item_id table.

    ``history_fields`` (field name -> (max item id + 1,) ids, from the items table): each history
    item is embedded as its id's embedding plus those of its ids in these fields (``items``), as
    DIN embeds a behaviour by its goods and category ids. Kept as buffers outside the state dict:
    rebuilt from the logs with the model, and constants in an exported graph.
    """

    def __init__(self, spec: FeatureSpec, dim: int, history_fields: dict[str, np.ndarray] | None = None):
        super().__init__()
        self.dim = dim
        self.tables = nn.ModuleDict({f.name: nn.Embedding(f.vocab + 1, dim, padding_idx=0) for f in spec.fields})
        for table in self.tables.values():
            nn.init.normal_(table.weight, std=0.05)
            with torch.no_grad():
                table.weight[0].zero_()
        self.history_fields = tuple(history_fields or {})
        for name, ids in (history_fields or {}).items():
            self.register_buffer(f"history_{name}", torch.as_tensor(ids, dtype=torch.int64), persistent=False)

    def items(self, ids: torch.Tensor) -> torch.Tensor:
        """item ids (...) -> (..., E): the id's embedding plus its ``history_fields``' (0: zero)."""
        e = self.tables["item_id"](ids)
        for name in self.history_fields:
            e = e + self.tables[name](getattr(self, f"history_{name}")[ids])
        return e

    def _history_sum(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, L) -> (B, E): the sum of ``items`` over the history (padding adds 0)."""
        if not self.training:
            return self.items(ids).sum(dim=1)
        total = F.embedding_bag(ids, self.tables["item_id"].weight, mode="sum", padding_idx=0)
        for name in self.history_fields:
            total = total + F.embedding_bag(getattr(self, f"history_{name}")[ids], self.tables[name].weight, mode="sum", padding_idx=0)
        return total

    def forward(self, x: torch.Tensor, slots: tuple[Slot, ...]) -> torch.Tensor:
        out = []
        for s in slots:
            ids, table = x[:, s.start : s.start + s.width], self.tables[s.table]
            if s.width == 1:
                out.append(table(ids)[:, 0])
                continue
            if s.name == HISTORY and self.history_fields:
                total = self._history_sum(ids)
            elif self.training:
                # fused lookup and sum, never holding the (B, width, E) gather: the 2048 x 50
                # history's gather and its backward were the costliest non-matmul work of a DSSM
                # step. Eval (and so ONNX, where embedding_bag becomes a loop) keeps the plain
                # gather; row 0 is zero, so both sum the same rows
                total = F.embedding_bag(ids, table.weight, mode="sum", padding_idx=0)
            else:
                total = table(ids).sum(dim=1)
            out.append(total / (ids > 0).sum(dim=1, keepdim=True).clamp(min=1).to(total.dtype))
        return torch.stack(out, dim=1)


def pack_user(batch: ListBatch, slots: tuple[Slot, ...]) -> np.ndarray:
    """User side of a batch in the layout of ``slots``: (B, W) int64."""
    cols = [batch.history if s.name == HISTORY else batch.user[s.name].reshape(len(batch), -1) for s in slots]
    return np.concatenate(cols, axis=1).astype(np.int64)


def pack_items(batch: ListBatch, slots: tuple[Slot, ...]) -> np.ndarray:
    """Item side of a batch in the layout of ``slots``: (B, N, W) int64."""
    b, n = batch.mask.shape
    return np.concatenate([batch.item[s.name].reshape(b, n, -1) for s in slots], axis=2).astype(np.int64)
