"""TARQ: target attention in a pre-ranker by residual quantisation (Li et al., Taobao, SIGIR 2026).

A ranker's target attention runs the history against every candidate. TARQ runs it against a
fixed set of codewords instead, once per request, and gives each candidate the attended
codewords of its codes:

- **Item side** (cached): the item vector ``v`` (D) and the item's codes ``z_1..z_L``, the
  residual quantisation of a second item vector ``q`` (E) over ``L`` codebooks of ``K``
  codewords (``Codebooks``, learned as in RQ-VAE and initialised from the first batch).
- **User side** (once per request): the user vector ``u`` (D) and, for each of the L x K
  codewords, the target attention of the request's history against it (DIN's unit), projected
  to D: ``A (L, K, D)``.
- **Score**: ``<u + sum_l A[l, z_l], v>``: L gathers and a dot per candidate.

Training (``regularised``) adds the authors' alignment (``cascade.losses.tarq``): a target
attention branch scores the candidate with the exact attention output ``abar = TA(q, history)``
in place of the codewords (``<u + P abar, v>``, BCE on the labels: the authors' ``ta_loss``),
and the codes are pulled to where the attended codebooks rebuild ``abar``: a symmetric KL per
level between the code distributions of ``q``'s and ``abar``'s residuals, and the squared error
between the summed attended codewords and ``abar``. These two move the codewords only (the
attention unit and the history held fixed in them: else they scale up the output they rebuild,
which comes from the same unit). The task's distillation loss trains the quantised score
against the ranker teacher.

The exported item side is ``(2, D)``: ``v``, then the codes as exact small integers in the first
L columns (``l * K + z_l``, the row of the user side's ``A`` they pick); the score is a graph.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import distributed as dist
from torch import nn

from cascade.features import Field
from cascade.losses.pointwise import bce
from cascade.losses.tarq import code_kl, reconstruction, rq_codebook, squared_distance
from cascade.towers.attention import attention_unit, target_attention
from cascade.towers.base import TwoTower, mlp_out
from cascade.towers.embedding import HISTORY, Embeddings, Slot


class Codebooks(nn.Module):
    """``weight`` (L, K, E): L levels of K codewords, shared by both towers."""

    def __init__(self, levels: int, codes: int, dim: int):
        super().__init__()
        if levels < 1 or codes < 2:
            raise ValueError(f"TARQ needs levels >= 1 and codes >= 2, got levels {levels}, codes {codes}")
        self.weight = nn.Parameter(torch.randn(levels, codes, dim) * 0.05)
        self.register_buffer("initialised", torch.tensor(False))  # saved: a restored model keeps its codebooks

    @property
    def levels(self) -> int:
        return self.weight.shape[0]

    @property
    def codes(self) -> int:
        return self.weight.shape[1]

    def encode(self, q: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """q (B, N, E) -> codes (B, N, L) int64, and per level the residual (B, N, E) quantised
        there and the codeword chosen (B, N, E): level l takes the nearest codeword to what the
        levels before left."""
        r, codes, residuals, chosen = q, [], [], []
        for book in self.weight:
            z = squared_distance(r, book).argmin(-1)  # (B, N)
            c = book[z]
            codes.append(z)
            residuals.append(r)
            chosen.append(c)
            r = r - c
        return torch.stack(codes, -1), residuals, chosen

    @torch.no_grad()
    def initialise(self, q: torch.Tensor) -> None:
        """Each level's codewords := distinct residuals of the valid item vectors ``q`` (M, E),
        drawn at random (RQ-VAE's data initialisation; random codewords far from the data
        leave most codes dead). In a data-parallel run rank 0's draw is everyone's."""
        r = q
        for level in range(self.levels):
            pick = torch.randint(len(r), (self.codes,), device=r.device) if len(r) < self.codes else torch.randperm(len(r), device=r.device)[: self.codes]
            self.weight[level] = r[pick] + torch.randn_like(r[pick]) * 1e-3  # distinct even if rows repeat
            r = r - self.weight[level][squared_distance(r[None], self.weight[level])[0].argmin(-1)]
        if dist.is_available() and dist.is_initialized():
            dist.broadcast(self.weight.data, 0)
        self.initialised.fill_(True)


class TARQItem(nn.Module):
    """x (B, W) -> (B, 2, D): the item vector, then its codes (``l * K + z_l``) as floats."""

    def __init__(self, embeddings: Embeddings, slots: tuple[Slot, ...], hidden: Sequence[int], dropout: float, codebooks: Codebooks):
        super().__init__()
        self.embeddings, self.slots, self.codebooks = embeddings, slots, codebooks
        in_dim = len(slots) * embeddings.dim
        self.net = mlp_out(in_dim, hidden, dropout)
        self.query = nn.Linear(in_dim, embeddings.dim)  # the vector the codes quantise (the authors' cross_item_net)

    def parts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, W) -> v (B, D), q (B, E)."""
        e = self.embeddings(x, self.slots).flatten(1)
        return self.net(e), self.query(e)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v, q = self.parts(x)
        codes, _, _ = self.codebooks.encode(q.unsqueeze(0))  # (1, B, L)
        rows = codes[0] + torch.arange(self.codebooks.levels, device=x.device) * self.codebooks.codes
        code_row = torch.cat([rows.to(v.dtype), torch.zeros_like(v[:, rows.shape[1] :])], dim=1)  # shapes from v: the batch stays dynamic in the export
        return torch.stack([v, code_row], dim=1)


class TARQUser(nn.Module):
    """x (B, W) -> (B, 1 + L * K, D): the user vector, then every codeword's attended history
    projected to D (row ``1 + l * K + k`` for codeword k of level l)."""

    def __init__(self, embeddings: Embeddings, slots: tuple[Slot, ...], hidden: Sequence[int], dropout: float, codebooks: Codebooks, attention_hidden: Sequence[int]):
        super().__init__()
        self.embeddings, self.slots, self.codebooks = embeddings, slots, codebooks
        self.history = next(s for s in slots if s.name == HISTORY)
        self.net = mlp_out(len(slots) * embeddings.dim, hidden, dropout)
        self.unit = attention_unit(embeddings.dim, attention_hidden)
        # no bias: the projection of a sum of attended codewords is the sum of their projections,
        # so the per-request table serves the score exactly
        self.project = nn.Linear(embeddings.dim, hidden[-1], bias=False)

    def parts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, W) -> u (B, D), history (B, T, E), valid (B, T), attended codebooks (B, L, K, E)."""
        u = self.net(self.embeddings(x, self.slots).flatten(1))
        ids = x[:, self.history.start : self.history.start + self.history.width]
        k = self.embeddings.items(ids)
        books = self.codebooks.weight
        queries = books.reshape(1, -1, books.shape[-1])  # (1, L * K, E): the same for every request, broadcast
        attended = target_attention(self.unit, queries, k, ids > 0).reshape(-1, *books.shape)
        return u, k, ids > 0, attended

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u, _, _, attended = self.parts(x)
        return torch.cat([u.unsqueeze(1), self.project(attended.flatten(1, 2))], dim=1)


class TARQ(TwoTower):
    """forward(user (B, Wu), items (B, N, Wi)) -> logits (B, N); needs the history."""

    dot_scale = None  # gather, then dot: exported as a score graph

    def __init__(
        self,
        user_fields: tuple[Field, ...],
        item_fields: tuple[Field, ...],
        embeddings: Embeddings,
        history_len: int = 0,
        hidden: Sequence[int] = (300, 300, 128),
        dropout: float = 0.3,
        levels: int = 3,
        codes: int = 64,
        attention_hidden: Sequence[int] = (80, 40),
        ta_weight: float = 1.0,
        kl_weight: float = 1.0,
        reconstruction_weight: float = 1.0,
        commitment: float = 0.25,
    ):
        super().__init__(user_fields, item_fields, embeddings, history_len)
        if history_len < 1:
            raise ValueError("TARQ attends over the history: it needs one (history_len >= 1, 'history' not in drop_fields)")
        if levels > hidden[-1]:
            raise ValueError(f"TARQ's item side carries its {levels} codes in a row of width {hidden[-1]} (hidden[-1]): levels must not exceed it")
        self.codebooks = Codebooks(levels, codes, embeddings.dim)
        self.user = TARQUser(embeddings, self.user_slots, hidden, dropout, self.codebooks, attention_hidden)
        self.item = TARQItem(embeddings, self.item_slots, hidden, dropout, self.codebooks)
        self.weights = {"ta": ta_weight, "kl": kl_weight, "reconstruction": reconstruction_weight}
        self.commitment = commitment
        self._counts = torch.zeros(levels, codes)  # codes chosen in training since epoch_stats last read them

    def score(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """u (B, 1 + L K, D), v (B, N, 2, D) -> (B, N): ``<u + sum_l A[z_l], v>``."""
        b, n = v.shape[:2]
        levels = self.codebooks.levels
        rows = v[:, :, 1, :levels].to(torch.int64).reshape(b, n * levels, 1).expand(-1, -1, u.shape[-1])
        picked = torch.gather(u[:, 1:], 1, rows).reshape(b, n, levels, -1).sum(2)  # (B, N, D)
        return torch.einsum("bnd,bnd->bn", u[:, :1] + picked, v[:, :, 0])  # an einsum, so FLOP counters see the dot

    def regularised(self, user: torch.Tensor, items: torch.Tensor, label: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """user (B, Wu), items (B, N, Wi), label and mask (B, N) -> the quantised logits (B, N)
        (``forward``'s) and the weighted alignment terms (), from one forward pass."""
        b, n, w = items.shape
        v, q = self.item.parts(items.reshape(b * n, w))
        v, q = v.reshape(b, n, -1), q.reshape(b, n, -1)
        if self.training and not bool(self.codebooks.initialised):
            self.codebooks.initialise(q[mask].detach())
        u, history, valid, attended = self.user.parts(user)  # attended (B, L, K, E)
        codes, residuals, chosen = self.codebooks.encode(q)  # (B, N, L)
        levels = self.codebooks.levels
        per_level = [torch.gather(attended[:, l], 1, codes[..., l : l + 1].expand(-1, -1, attended.shape[-1])) for l in range(levels)]  # each (B, N, E)
        quantised = torch.stack(per_level).sum(0)
        exact = target_attention(self.user.unit, q, history, valid)  # the target attention branch (B, N, E)
        project = self.user.project
        logits = ((u.unsqueeze(1) + project(quantised)) * v).sum(-1)
        ta_logits = ((u.unsqueeze(1) + project(exact)) * v).sum(-1)
        # the alignment moves the codewords only: through the attention unit or the history it
        # could scale up the output it rebuilds, since the target comes from the same unit and
        # history (a runaway: |abar| 1 -> 380,000 and a loss of 1e9 within one epoch)
        fixed = copy.deepcopy(self.user.unit).requires_grad_(False)
        books = self.codebooks.weight
        aligned = target_attention(fixed, books.reshape(1, -1, books.shape[-1]), history.detach(), valid).reshape(-1, *books.shape)  # (B, L, K, E)
        kl, r_bar, rebuilt = logits.new_zeros(()), exact.detach(), 0.0
        for l in range(levels):
            kl = kl + code_kl(residuals[l], books[l], r_bar, aligned[:, l], mask)
            picked = torch.gather(aligned[:, l], 1, codes[..., l : l + 1].expand(-1, -1, aligned.shape[-1]))
            r_bar, rebuilt = r_bar - picked, rebuilt + picked
        wt = self.weights
        term = wt["ta"] * bce(ta_logits, label, mask) + wt["kl"] * kl + wt["reconstruction"] * reconstruction(rebuilt, exact, mask) + rq_codebook(residuals, chosen, mask, self.commitment)
        if self.training:
            with torch.no_grad():
                for l in range(levels):
                    self._counts[l] += torch.bincount(codes[..., l][mask].cpu(), minlength=self.codebooks.codes).to(self._counts.dtype)
        return logits, term

    def epoch_stats(self) -> dict[str, float]:
        """Codebook utilisation (share of the K codes chosen at least once) and token entropy
        (nats, of the chosen codes) over the training candidates since the last call, each the
        mean over levels (the authors' logged figures); empty if no training step ran."""
        counts, self._counts = self._counts, torch.zeros_like(self._counts)
        if counts.sum() == 0:
            return {}
        p = counts / counts.sum(1, keepdim=True)
        entropy = -(p * torch.log(p.clamp(min=1e-12))).sum(1)
        return {"codebook_utilisation": float((counts > 0).float().mean()), "token_entropy": float(entropy.mean())}
