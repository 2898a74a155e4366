"""Target attention (DIN's activation unit): a query scores every history item, and the history
is summed with those weights. The DIN ranker uses it per candidate; TARQ per codeword."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from cascade.towers.base import mlp


def attention_unit(dim: int, hidden: Sequence[int]) -> nn.Sequential:
    """The scoring MLP on ``[q, k, q - k, q * k]`` (4 dim -> hidden -> 1), no BatchNorm."""
    return nn.Sequential(mlp(4 * dim, hidden, 0.0, batch_norm=False), nn.Linear(hidden[-1], 1))


def target_attention(unit: nn.Sequential, q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """q (B, N, E) queries (or (1, N, E): the same for every row), k (B, L, E) history, valid (B, L) bool -> (B, N, E): for each query
    the history summed with the unit's weights (unnormalised, as DIN's; invalid positions 0).

    The first layer on ``[q, k, q - k, q * k]`` is ``W [q; k; q - k; q * k] + c = (W_q + W_d) q
    + (W_k - W_d) k + W_p (q * k) + c``: the q part once per query, the k part once per history
    item, and only ``W_p`` per (query, history) pair, a quarter of the concatenated layer's work
    (and no (B, N, L, 4E) concatenation)."""
    first = unit[0][0]
    w_q, w_k, w_d, w_p = first.weight.split(q.shape[-1], dim=1)
    pre = (q @ (w_q + w_d).T).unsqueeze(2) + (k @ (w_k - w_d).T).unsqueeze(1) + (q.unsqueeze(2) * k.unsqueeze(1)) @ w_p.T + first.bias
    w = unit[1](unit[0][1:](pre)).squeeze(-1)  # (B, N, L)
    w = w * valid.unsqueeze(1).to(w.dtype)  # padding never contributes
    return torch.einsum("bnl,ble->bne", w, k)
