"""COLD: the all-to-all end of the pre-ranking ladder (Wang et al., Alibaba 2020).

Not a two-tower: every candidate runs the whole network, with nothing cached. The field groups
are each user field (the history mean-pooled), each item field, and a cross feature per (user
group, item group) pair, their elementwise product; a Squeeze-and-Excitation block weighs the
groups (COLD's feature selection: a group whose weight stays low can be dropped to meet a
latency budget), and an MLP over the weighted groups gives the logit. As the 2022 IntTower
peer's COLD, plus the explicit crosses the paper describes.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from cascade.features import Field
from cascade.towers.base import mlp
from cascade.towers.embedding import Embeddings, layout
from cascade.towers.senet import SENet


class COLD(nn.Module):
    """forward(user (B, Wu), items (B, N, Wi)) -> logits (B, N)."""

    def __init__(
        self,
        user_fields: tuple[Field, ...],
        item_fields: tuple[Field, ...],
        embeddings: Embeddings,
        history_len: int = 0,
        hidden: Sequence[int] = (300, 300, 128),
        dropout: float = 0.3,
        reduction: int = 3,
    ):
        super().__init__()
        self.user_slots = layout(user_fields, history_len)
        self.item_slots = layout(item_fields)
        self.embeddings = embeddings
        fu, fi = len(self.user_slots), len(self.item_slots)
        self.groups = fu + fi + fu * fi
        self.select = SENet(self.groups, reduction)
        self.head = nn.Sequential(mlp(self.groups * embeddings.dim, hidden, dropout), nn.Linear(hidden[-1], 1))

    def group_weights(self, user: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """The SE block's weight of each group, user (B, Wu), items (B, N, Wi) -> (B * N, G):
        user fields, item fields, then the crosses user-major."""
        return self.select.weights(self._groups(user, items))

    def _groups(self, user: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        b, n, w = items.shape
        eu = self.embeddings(user, self.user_slots)  # (B, Fu, E)
        ei = self.embeddings(items.reshape(b * n, w), self.item_slots)  # (B * N, Fi, E)
        eu = eu.unsqueeze(1).expand(b, n, *eu.shape[1:]).reshape(b * n, *eu.shape[1:])  # (B * N, Fu, E)
        cross = (eu.unsqueeze(2) * ei.unsqueeze(1)).flatten(1, 2)  # (B * N, Fu * Fi, E)
        return torch.cat([eu, ei, cross], dim=1)

    def forward(self, user: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        b, n, _ = items.shape
        return self.head(self.select(self._groups(user, items)).flatten(1)).reshape(b, n)
