"""HIT, the hierarchical interaction-enhanced two-tower (Yang et al., 2025).

Each tower has two generators, two-layer MLPs over a chosen subset of its own fields: a
*target* one that learns to mimic the other tower's output on positives and a *non-target* one
on negatives (``cascade.losses.hit.generation``). Their inputs and outputs are cut from the
gradient: the tower reads their outputs as extra input but never trains them, and they learn
only from the generation loss. The tower MLP's output is projected to H heads of size D; the
score is MaxSim (sum_a max_b <u_a, v_b>) plus a bias.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from cascade.features import Field
from cascade.losses.hit import generation
from cascade.towers.base import TwoTower, maxsim_score, mlp
from cascade.towers.embedding import HISTORY, Embeddings, Slot


def _generator(in_dim: int, width: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, width), nn.ReLU(), nn.Linear(width, out_dim))


class HITSide(nn.Module):
    """x (B, W) -> (B, H, D); ``parts(x)`` also gives the tower output p (B, P) and the target
    and non-target generators' outputs (B, P_other)."""

    def __init__(self, embeddings: Embeddings, slots: tuple[Slot, ...], generator_slots: tuple[Slot, ...], hidden: Sequence[int], heads: int, head_dim: int, dropout: float, other_dim: int):
        super().__init__()
        self.embeddings = embeddings
        self.slots, self.generator_slots = slots, generator_slots
        gen_in = len(generator_slots) * embeddings.dim
        self.target_generator = _generator(gen_in, heads * head_dim, other_dim)
        self.non_target_generator = _generator(gen_in, heads * head_dim, other_dim)
        self.mlp = mlp(len(slots) * embeddings.dim + 2 * other_dim, hidden, dropout)
        self.heads = nn.Linear(hidden[-1], heads * head_dim)
        self.head_dim = head_dim

    def parts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        g_in = self.embeddings(x, self.generator_slots).flatten(1).detach()
        g_target, g_non_target = self.target_generator(g_in), self.non_target_generator(g_in)
        z = torch.cat([self.embeddings(x, self.slots).flatten(1), g_target.detach(), g_non_target.detach()], dim=1)
        p = self.mlp(z)
        return self.heads(p).unflatten(1, (-1, self.head_dim)), p, g_target, g_non_target

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.parts(x)[0]


class HIT(TwoTower):
    def __init__(
        self,
        user_fields: tuple[Field, ...],
        item_fields: tuple[Field, ...],
        embeddings: Embeddings,
        history_len: int = 0,
        hidden: Sequence[int] = (300, 300, 32),
        heads: int = 2,
        head_dim: int = 16,
        dropout: float = 0.3,
        generation_weight: float = 0.1,
        user_generator_fields: Sequence[str] | None = None,
        item_generator_fields: Sequence[str] | None = None,
    ):
        super().__init__(user_fields, item_fields, embeddings, history_len)
        out = hidden[-1]
        self.user = HITSide(embeddings, self.user_slots, self._subset(self.user_slots, user_generator_fields, "user_id"), hidden, heads, head_dim, dropout, out)
        self.item = HITSide(embeddings, self.item_slots, self._subset(self.item_slots, item_generator_fields, "item_id"), hidden, heads, head_dim, dropout, out)
        self.bias = nn.Parameter(torch.zeros(()))
        self.generation_weight = generation_weight  # read by the training step, not by forward

    @staticmethod
    def _subset(slots: tuple[Slot, ...], names: Sequence[str] | None, id_name: str) -> tuple[Slot, ...]:
        """The generator's fields: those named, or every field but the id and the history."""
        if names is None:
            chosen = tuple(s for s in slots if s.name not in (id_name, HISTORY))
            return chosen or tuple(s for s in slots if s.name == id_name)
        unknown = sorted(set(names) - {s.name for s in slots})
        if unknown:
            raise ValueError(f"generator field '{unknown[0]}' is not among {[s.name for s in slots]}")
        return tuple(s for s in slots if s.name in names)

    def score(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return maxsim_score(u, v) + self.bias

    def regularised(self, user: torch.Tensor, items: torch.Tensor, label: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """user (B, Wu), items (B, N, Wi), label and mask (B, N) -> logits (B, N) and the weighted
        four generation terms (user and item tower, target and non-target), one forward pass."""
        b, n, w = items.shape
        u, p_u, gt_u, gn_u = self.user.parts(user)
        v, p_v, gt_v, gn_v = self.item.parts(items.reshape(b * n, w))
        logits = self.score(u, v.reshape(b, n, *v.shape[1:]))
        expand = lambda x: x.unsqueeze(1).expand(b, n, x.shape[-1])  # noqa: E731  user side to (B, N, P)
        per_item = lambda x: x.reshape(b, n, -1)  # noqa: E731
        gen = generation(expand(gt_u), expand(gn_u), per_item(p_v), label, mask)
        gen = gen + generation(per_item(gt_v), per_item(gn_v), expand(p_u), label, mask)
        return logits, self.generation_weight * gen
