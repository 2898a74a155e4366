"""What every two-tower pre-ranker shares: the MLP block, the cheap scores, the packed forward.

A pre-ranker holds ``user`` and ``item`` towers (``nn.Module``s taking one packed int64 tensor,
``(B, W) -> (B, H, D)``, each exportable alone) and a cheap ``score(u, v)``. The item side is
computed once per item and cached at serving time; only the user side runs per request.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from cascade.features import Field
from cascade.towers.embedding import Embeddings, layout


class Dropout(nn.Module):
    """Inverted dropout with the mask drawn as 16 random bits per element: four elements' bits
    from one 64-bit ``randint``, kept where the bits (as int16) reach ``-32768 + round(65536 p)``.
    The drop rate is ``p`` rounded to a multiple of 1/65536 (0.3 -> 0.300003) and the kept values
    are scaled by one over the rounded keep rate, so the expectation is exact. On CPU this costs
    a quarter of ``rand_like(x) >= p`` (1.9 against 7.6 ms for a 2048 x 300 mask), which itself
    costs a third of ``nn.Dropout``'s ``bernoulli_``; the masks were 15% of a DSSM training step.
    Identity in eval mode (and so in ONNX)."""

    def __init__(self, p: float):
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"dropout must be in [0, 1), got {p}")
        self.p = p
        dropped = round(p * 65536)  # of the 65536 int16 values, the lowest this many drop
        self.threshold = -32768 + dropped
        self.scale = 65536 / (65536 - dropped)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        n = x.numel()
        bits = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=x.device)
        keep = bits.view(torch.int16)[:n].view(x.shape) >= self.threshold
        return x * keep.to(x.dtype).mul_(self.scale)  # one (B, H) mask: backward is one multiply


def mlp(in_dim: int, hidden: Sequence[int], dropout: float, batch_norm: bool = True) -> nn.Sequential:
    """Linear -> [BatchNorm] -> ReLU -> [Dropout] per hidden size."""
    layers: list[nn.Module] = []
    for width in hidden:
        layers.append(nn.Linear(in_dim, width))
        if batch_norm:
            # BatchNorm subtracts the batch mean, so this bias gets no gradient, only rounding
            # noise, which Adam scales into steps of size lr: it drifted, and the running mean
            # (used at eval) lagged behind it. Frozen at its init (kept in the state dict).
            layers[-1].bias.requires_grad_(False)
            layers.append(nn.BatchNorm1d(width))
        layers.append(nn.ReLU())
        if dropout > 0:
            layers.append(Dropout(dropout))
        in_dim = width
    return nn.Sequential(*layers)


def mlp_out(in_dim: int, hidden: Sequence[int], dropout: float) -> nn.Sequential:
    """``mlp`` over every width but the last, then a plain Linear to ``hidden[-1]`` (no
    activation, no BatchNorm): a tower's output vector. (DSSM's and DAT's towers build the same
    as ``mlp`` and ``out``, the names their saved weights carry.)"""
    return nn.Sequential(mlp(in_dim, hidden[:-1], dropout), nn.Linear(hidden[-2] if len(hidden) > 1 else in_dim, hidden[-1]))


def dot_score(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """u (B, H, D), v (B, N, H, D) -> (B, N): sum over heads of <u_h, v_h> (H = 1: a dot)."""
    return torch.einsum("bhd,bnhd->bn", u, v)


def maxsim_score(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """u (B, Hu, D), v (B, N, Hv, D) -> (B, N): sum_a max_b <u_a, v_b> (ColBERT MaxSim).

    A broadcast matmul and ``max(...).values``: its backward scatters to the arg-max, where
    ``einsum`` + ``amax`` copied and compared the whole (B, N, Hu, Hv) block (51 vs 118 ms for
    B = 2048, Hu = 96, Hv = 32, D = 64, forward + backward)."""
    sim = torch.matmul(u.unsqueeze(1), v.transpose(-1, -2))  # (B, N, Hu, Hv)
    return sim.max(dim=3).values.sum(dim=2)


class TwoTower(nn.Module):
    """Base of the pre-rankers: the input layouts and the shared embeddings; subclasses add the
    ``user`` and ``item`` towers and ``score``."""

    user: nn.Module
    item: nn.Module
    # score = dot_scale * sum_h <u_h, v_h> when set (serving needs no score graph); None: the
    # score is not a plain dot (MaxSim + bias) and is exported as a graph of its own
    dot_scale: float | None = None

    def __init__(self, user_fields: tuple[Field, ...], item_fields: tuple[Field, ...], embeddings: Embeddings, history_len: int = 0):
        super().__init__()
        self.user_slots = layout(user_fields, history_len)
        self.item_slots = layout(item_fields)
        self.embeddings = embeddings

    def score(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, user: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """user (B, Wu), items (B, N, Wi) -> logits (B, N)."""
        b, n, w = items.shape
        u = self.user(user)
        v = self.item(items.reshape(b * n, w))
        return self.score(u, v.reshape(b, n, *v.shape[1:]))
