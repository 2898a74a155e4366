"""DIN: a ranker with target attention over the request's history (Zhou et al., KDD 2018).

For each candidate, an attention unit scores every history item against it from
``[q, k, q - k, q * k]`` (q the candidate's item embedding, k a history item's: its id's, plus
its category's and other fields' with ``model.history_fields``, as the paper's goods and
category ids); padded history
positions (id 0) get weight 0. The weighted sum of history embeddings joins the user and item
field embeddings in an MLP head. Unlike a two-tower model it sees the target and the history
together, which is what it has to teach.

``pooling: mean`` replaces the attention by the plain mean of the history's embeddings (padding
left out): the same ranker without the interaction, the control that shows whether a world's
target attention is something the DIN uses (``benchmarks/ta_worlds.py``).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import torch
from torch import nn

from cascade.features import Field
from cascade.towers.attention import attention_unit, target_attention
from cascade.towers.base import mlp
from cascade.towers.embedding import HISTORY, Embeddings, layout


POOLINGS = ("attention", "mean")


class DIN(nn.Module):
    """forward(user (B, Wu), items (B, N, Wi)) -> logits (B, N)."""

    def __init__(
        self,
        user_fields: tuple[Field, ...],
        item_fields: tuple[Field, ...],
        embeddings: Embeddings,
        history_len: int,
        attention_hidden: Sequence[int] = (80, 40),
        hidden: Sequence[int] = (200, 80),
        dropout: float = 0.0,
        pooling: str = "attention",
    ):
        super().__init__()
        if history_len < 1:
            raise ValueError("DIN needs a history (history_len >= 1)")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling: '{pooling}' is not one of {', '.join(POOLINGS)}")
        self.pooling = pooling
        self.user_slots = layout(user_fields, history_len)
        self.item_slots = layout(item_fields)
        self.embeddings = embeddings
        self._fields = tuple(s for s in self.user_slots if s.name != HISTORY)
        self._history = next(s for s in self.user_slots if s.name == HISTORY)
        self._target = next(s for s in self.item_slots if s.name == "item_id")
        self._pooled = replace(self._history, start=0)  # the history alone, as attend gets it
        dim = embeddings.dim
        self.attention = attention_unit(dim, attention_hidden)
        head_in = (len(self._fields) + len(self.item_slots) + 1) * dim
        self.head = nn.Sequential(mlp(head_in, hidden, dropout), nn.Linear(hidden[-1], 1))

    def attend(self, history: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """history (B, L) ids, target (B, N) ids -> (B, N, E) attention-pooled history."""
        if self.pooling == "mean":  # the control: the history pooled as every tower pools it, each (real) item weighing the same
            mean = self.embeddings(history, (self._pooled,))[:, 0]  # (B, E)
            return mean.unsqueeze(1).expand(target.shape[0], target.shape[1], mean.shape[-1])
        k = self.embeddings.items(history)  # (B, L, E): id (+ model.history_fields) embeddings
        return target_attention(self.attention, self.embeddings.items(target), k, history > 0)

    def forward(self, user: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        b, n, width = items.shape
        hist = user[:, self._history.start : self._history.start + self._history.width]
        target = items[:, :, self._target.start]
        pooled = self.attend(hist, target)  # (B, N, E)
        user_e = self.embeddings(user, self._fields).flatten(1)  # (B, Fu * E)
        item_e = self.embeddings(items.reshape(b * n, width), self.item_slots).reshape(b, n, -1)
        x = torch.cat([user_e.unsqueeze(1).expand(b, n, user_e.shape[1]), item_e, pooled], dim=-1)
        return self.head(x.reshape(b * n, -1)).reshape(b, n)
