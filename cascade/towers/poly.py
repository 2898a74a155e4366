"""Two-towers whose user side is several vectors, combined per candidate at a cost of a few dots.

**Poly-encoder** (Humeau et al., ICLR 2020): the user's context is its field embeddings and each
history item (projected to D); ``m`` learned codes each attend over that context, giving m user
vectors ``y_1..y_m``. The candidate attends over them: ``w = softmax_j <y_j, v>``, and the score
is ``<sum_j w_j y_j, v>``. Per candidate: m dots, a softmax, a dot.

**MVKE**, mixture of virtual-kernel experts (Xu et al., Tencent, DLP-KDD 2022): ``K`` learned
virtual kernels each attend over the user's field embeddings, and expert k's MLP turns its
kernel's weighting of the fields into a user vector ``u_k``. The item gates the experts by its
own similarity to the kernels, ``g = softmax_k <v, P kernel_k>``, which depends on the item
alone, so it is cached with the item side; the score is ``sum_k g_k <u_k, v>``. The item side
is ``(2, D)``: ``v``, then the gate in the first K columns.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from cascade.features import Field
from cascade.towers.base import TwoTower, mlp_out
from cascade.towers.embedding import HISTORY, Embeddings, Slot


class FieldMLP(nn.Module):
    """x (B, W) -> (B, 1, D): ``mlp_out`` over the slots' embeddings, one plain vector (not unit
    length) as the tower's one head."""

    def __init__(self, embeddings: Embeddings, slots: tuple[Slot, ...], hidden: Sequence[int], dropout: float):
        super().__init__()
        self.embeddings, self.slots = embeddings, slots
        self.net = mlp_out(len(slots) * embeddings.dim, hidden, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.embeddings(x, self.slots).flatten(1)).unsqueeze(1)


class PolyUser(nn.Module):
    """x (B, W) -> (B, m, D): each code's attention over the user's context."""

    def __init__(self, embeddings: Embeddings, slots: tuple[Slot, ...], dim: int, codes: int):
        super().__init__()
        self.embeddings = embeddings
        self.fields = tuple(s for s in slots if s.name != HISTORY)
        self.history = next((s for s in slots if s.name == HISTORY), None)
        self.context = nn.Linear(embeddings.dim, dim)
        self.codes = nn.Parameter(torch.randn(codes, dim) / dim**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts, valid = [self.embeddings(x, self.fields)], [torch.ones(x.shape[0], len(self.fields), dtype=torch.bool, device=x.device)]
        if self.history is not None:
            ids = x[:, self.history.start : self.history.start + self.history.width]
            parts.append(self.embeddings.items(ids))
            valid.append(ids > 0)
        c = self.context(torch.cat(parts, 1))  # (B, T, D)
        logits = torch.einsum("md,btd->bmt", self.codes, c)
        weights = torch.softmax(logits.masked_fill(~torch.cat(valid, 1).unsqueeze(1), float("-inf")), dim=-1)
        return torch.einsum("bmt,btd->bmd", weights, c)


class PolyEncoder(TwoTower):
    """forward(user (B, Wu), items (B, N, Wi)) -> logits (B, N)."""

    dot_scale = None  # a softmax over the user vectors per candidate: exported as a score graph

    def __init__(self, user_fields: tuple[Field, ...], item_fields: tuple[Field, ...], embeddings: Embeddings, history_len: int = 0, hidden: Sequence[int] = (300, 300, 128), dropout: float = 0.3, codes: int = 8):
        super().__init__(user_fields, item_fields, embeddings, history_len)
        if codes < 1:
            raise ValueError(f"codes must be at least 1, got {codes}")
        self.user = PolyUser(embeddings, self.user_slots, hidden[-1], codes)
        self.item = FieldMLP(embeddings, self.item_slots, hidden, dropout)

    def score(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """u (B, m, D), v (B, N, 1, D) -> (B, N)."""
        item = v[:, :, 0]
        sim = torch.einsum("bmd,bnd->bnm", u, item)
        return (torch.softmax(sim, dim=-1) * sim).sum(-1)  # <sum_j w_j y_j, v> = sum_j w_j <y_j, v>


class MVKEUser(nn.Module):
    """x (B, W) -> (B, K, D): expert k's MLP over the fields as virtual kernel k weighs them."""

    def __init__(self, embeddings: Embeddings, slots: tuple[Slot, ...], hidden: Sequence[int], dropout: float, kernels: nn.Parameter):
        super().__init__()
        self.embeddings, self.slots, self.kernels = embeddings, slots, kernels
        self.key = nn.Linear(embeddings.dim, embeddings.dim)
        in_dim = len(slots) * embeddings.dim
        self.experts = nn.ModuleList(mlp_out(in_dim, hidden, dropout) for _ in range(len(kernels)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.embeddings(x, self.slots)  # (B, F, E)
        weights = torch.softmax(torch.einsum("ke,bfe->bkf", self.kernels, self.key(e)) / e.shape[-1] ** 0.5, dim=-1)  # each kernel over the fields
        weighted = weights.unsqueeze(-1) * e.unsqueeze(1) * e.shape[1]  # (B, K, F, E); x F: uniform weights keep the fields' scale
        return torch.stack([expert(weighted[:, k].flatten(1)) for k, expert in enumerate(self.experts)], dim=1)


class MVKEItem(nn.Module):
    """x (B, W) -> (B, 2, D): the item vector, then its gate over the K experts."""

    def __init__(self, embeddings: Embeddings, slots: tuple[Slot, ...], hidden: Sequence[int], dropout: float, kernels: nn.Parameter):
        super().__init__()
        self.vector = FieldMLP(embeddings, slots, hidden, dropout)
        self.kernels = kernels
        self.project = nn.Linear(kernels.shape[1], hidden[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = self.vector(x)[:, 0]  # (B, D)
        gate = torch.softmax(v @ self.project(self.kernels).T / v.shape[-1] ** 0.5, dim=-1)  # (B, K)
        row = torch.cat([gate, torch.zeros_like(v[:, gate.shape[1] :])], dim=1)
        return torch.stack([v, row], dim=1)


class MVKE(TwoTower):
    """forward(user (B, Wu), items (B, N, Wi)) -> logits (B, N)."""

    dot_scale = None  # a gated sum of K dots: exported as a score graph

    def __init__(self, user_fields: tuple[Field, ...], item_fields: tuple[Field, ...], embeddings: Embeddings, history_len: int = 0, hidden: Sequence[int] = (300, 300, 128), dropout: float = 0.3, kernels: int = 4):
        super().__init__(user_fields, item_fields, embeddings, history_len)
        if not 1 <= kernels <= hidden[-1]:
            raise ValueError(f"kernels must be from 1 to hidden[-1] ({hidden[-1]}): the item side carries its gate in a row of that width; got {kernels}")
        self.kernels = nn.Parameter(torch.randn(kernels, embeddings.dim) / embeddings.dim**0.5)
        self.user = MVKEUser(embeddings, self.user_slots, hidden, dropout, self.kernels)
        self.item = MVKEItem(embeddings, self.item_slots, hidden, dropout, self.kernels)

    def score(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """u (B, K, D), v (B, N, 2, D) -> (B, N): ``sum_k g_k <u_k, v>``."""
        k = u.shape[1]
        return (torch.einsum("bkd,bnd->bnk", u, v[:, :, 0]) * v[:, :, 1, :k]).sum(-1)
