"""DSSM: MLP towers, L2-normalised outputs, dot product over a temperature."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from cascade.features import Field
from cascade.towers.base import TwoTower, dot_score, mlp
from cascade.towers.embedding import Embeddings, Slot


class DSSMTower(nn.Module):
    """x (B, W) int64 -> (B, 1, D), unit length. ``reweight`` maps the field embeddings
    (B, F, E) -> (B, F, E) before the MLP (identity for DSSM, SENet for the SENet two-tower)."""

    def __init__(self, embeddings: Embeddings, slots: tuple[Slot, ...], hidden: Sequence[int], dropout: float, reweight: nn.Module | None = None):
        super().__init__()
        self.embeddings = embeddings
        self.slots = slots
        self.reweight = reweight or nn.Identity()
        in_dim = len(slots) * embeddings.dim
        self.mlp = mlp(in_dim, hidden[:-1], dropout)
        self.out = nn.Linear(hidden[-2] if len(hidden) > 1 else in_dim, hidden[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mlp(self.reweight(self.embeddings(x, self.slots)).flatten(1))
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
        super().__init__(user_fields, item_fields, embeddings, history_len)
        self.user = DSSMTower(embeddings, self.user_slots, hidden, dropout, self.field_weighting(len(self.user_slots)))
        self.item = DSSMTower(embeddings, self.item_slots, hidden, dropout, self.field_weighting(len(self.item_slots)))
        self.temperature = temperature

    def field_weighting(self, n_fields: int) -> nn.Module | None:
        return None

    @property
    def dot_scale(self) -> float:
        return 1.0 / self.temperature

    def score(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return dot_score(u, v) / self.temperature
