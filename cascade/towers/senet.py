"""SENet two-tower: each tower squeezes every field embedding to its mean, excites the field
vector with a two-layer MLP, and re-weights the fields before its DSSM-style MLP."""

from __future__ import annotations

import torch
from torch import nn

from cascade.towers.dssm import DSSM


class SENet(nn.Module):
    """E (B, F, E) -> E * w, w = sigmoid(W2 relu(W1 mean_e(E) + b1) + b2), one weight per field;
    W1: F -> max(1, F // reduction). The sigmoid output (Hu et al.'s SENet) keeps every field
    passing some signal; a ReLU output (FiBiNET) can start dead and silence a tower for good."""

    def __init__(self, n_fields: int, reduction: int = 3):
        super().__init__()
        mid = max(1, n_fields // reduction)
        self.excite = nn.Sequential(nn.Linear(n_fields, mid), nn.ReLU(), nn.Linear(mid, n_fields), nn.Sigmoid())

    def weights(self, e: torch.Tensor) -> torch.Tensor:
        """E (B, F, E) -> w (B, F), each field's weight."""
        return self.excite(e.mean(dim=-1))

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        return e * self.weights(e).unsqueeze(-1)


class SENetTwoTower(DSSM):
    """DSSM with a SENet layer on each tower's field embeddings (same constructor keywords,
    plus ``reduction``)."""

    def __init__(self, *args, reduction: int = 3, **kwargs):
        self.reduction = reduction
        super().__init__(*args, **kwargs)

    def field_weighting(self, n_fields: int) -> nn.Module:
        return SENet(n_fields, self.reduction)
