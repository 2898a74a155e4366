"""DAT, the dual augmented two-tower (Yu et al., DLP-KDD 2021).

Each user (item) has a learnable augmented vector ``a`` (its own id table, width = the tower
output) concatenated into its tower's input; the adaptive-mimic loss
(``cascade.losses.dat.adaptive_mimic``) pulls ``a_u`` towards the stop-gradient output of the item
tower on positives, and the mirror, so the augmented vectors carry what the other tower knows.
Score: dot of the unit outputs over a temperature, as DSSM.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from cascade.features import Field
from cascade.losses.dat import adaptive_mimic
from cascade.towers.base import TwoTower, dot_score, mlp
from cascade.towers.embedding import Embeddings, Slot


class DATSide(nn.Module):
    """x (B, W) -> (B, 1, D) unit output; ``augmented(x) -> (B, D)``."""

    def __init__(self, embeddings: Embeddings, slots: tuple[Slot, ...], id_field: Field, hidden: Sequence[int], dropout: float):
        super().__init__()
        self.embeddings = embeddings
        self.slots = slots
        self.id_column = next(s.start for s in slots if s.name == id_field.name)
        self.augment = nn.Embedding(id_field.vocab + 1, hidden[-1], padding_idx=0)
        nn.init.normal_(self.augment.weight, std=0.05)
        in_dim = len(slots) * embeddings.dim + hidden[-1]
        self.mlp = mlp(in_dim, hidden[:-1], dropout)
        self.out = nn.Linear(hidden[-2] if len(hidden) > 1 else in_dim, hidden[-1])

    def augmented(self, x: torch.Tensor) -> torch.Tensor:
        return self.augment(x[:, self.id_column])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.cat([self.embeddings(x, self.slots).flatten(1), self.augmented(x)], dim=1)
        return F.normalize(self.out(self.mlp(z)), dim=-1).unsqueeze(1)


class DAT(TwoTower):
    def __init__(
        self,
        user_fields: tuple[Field, ...],
        item_fields: tuple[Field, ...],
        embeddings: Embeddings,
        history_len: int = 0,
        hidden: Sequence[int] = (300, 300, 128),
        dropout: float = 0.3,
        temperature: float = 0.05,
        mimic_weight: float = 0.5,
    ):
        super().__init__(user_fields, item_fields, embeddings, history_len)
        user_id = next(f for f in user_fields if f.name == "user_id")
        item_id = next(f for f in item_fields if f.name == "item_id")
        self.user = DATSide(embeddings, self.user_slots, user_id, hidden, dropout)
        self.item = DATSide(embeddings, self.item_slots, item_id, hidden, dropout)
        self.temperature = temperature
        self.mimic_weight = mimic_weight  # weighs the regulariser, not read by forward

    @property
    def dot_scale(self) -> float:
        return 1.0 / self.temperature

    def score(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return dot_score(u, v) / self.temperature

    def regularised(self, user: torch.Tensor, items: torch.Tensor, label: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """user (B, Wu), items (B, N, Wi), label and mask (B, N) -> logits (B, N) and the weighted
        adaptive-mimic loss on the positives, from one forward pass."""
        b, n, w = items.shape
        p_u = self.user(user)  # (B, 1, D)
        flat_items = items.reshape(b * n, w)
        p_v = self.item(flat_items).reshape(b, n, 1, -1)
        logits = self.score(p_u, p_v)
        a_u = self.user.augmented(user)
        a_v = self.item.augmented(flat_items).reshape(b, n, -1)
        return logits, self.mimic_weight * adaptive_mimic(a_u, a_v, p_u[:, 0], p_v[:, :, 0], label, mask)
