"""DSSM: MLP towers, L2-normalised outputs, dot product over a temperature."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from cascade.features import Field
from cascade.towers.base import TwoTower, dot_score, mlp
from cascade.towers.embedding import Embeddings, Slot, layout


class DSSMTower(nn.Module):
    """x (B, W) int64 -> (B, 1, D), unit length."""

    def __init__(self, embeddings: Embeddings, slots: tuple[Slot, ...], hidden: Sequence[int], dropout: float):
        super().__init__()
        self.embeddings = embeddings
        self.slots = slots
        self.mlp = mlp(len(slots) * embeddings.dim, hidden[:-1], dropout)
        self.out = nn.Linear(hidden[-2] if len(hidden) > 1 else len(slots) * embeddings.dim, hidden[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mlp(self.embeddings(x, self.slots).flatten(1))
        return F.normalize(self.out(h), dim=-1).unsqueeze(1)


class DSSM(TwoTower):
    def __init__(
        self,
        user_fields: tuple[Field, ...],
        item_fields: tuple[Field, ...],
        embeddings: Embeddings,
        history_len: int = 0,
        hidden: Sequence[int] = (300, 300, 128),
        dropout: float = 0.3,
        temperature: float = 0.05,
    ):
        super().__init__()
        self.user_slots = layout(user_fields, history_len)
        self.item_slots = layout(item_fields)
        self.embeddings = embeddings
        self.user = DSSMTower(embeddings, self.user_slots, hidden, dropout)
        self.item = DSSMTower(embeddings, self.item_slots, hidden, dropout)
        self.temperature = temperature

    def score(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return dot_score(u, v) / self.temperature
