"""IntTower (Li et al., CIKM 2022): Light-SE, FE-Block heads on every user layer, MaxSim.

User tower: Light-SE re-weights the field embeddings, an MLP runs over them, and a linear head
projects the *input* of every layer (the embeddings, then each hidden output but the last) to
H heads of size D. Item tower: the same up to its last layer, whose output one head projects.
Score = sum over user heads (all layers) of the max over item heads of their dot product, plus
a bias: the authors' ``fe_score`` with their prediction layer's bias. No normalisation. The
optional CIR term (``losses.inttower.contrastive_interaction``) works on the towers' last-layer
outputs; ``IntTower.regularised`` adds it when ``cir_weight > 0``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from cascade.features import Field
from cascade.losses.inttower import contrastive_interaction
from cascade.towers.base import TwoTower, maxsim_score, mlp
from cascade.towers.embedding import Embeddings, Slot


class LightSE(nn.Module):
    """E (B, F, E) -> E + E * a, a = softmax(W mean_e(E)) over fields; W (F, F) without bias."""

    def __init__(self, n_fields: int):
        super().__init__()
        self.weight = nn.Linear(n_fields, n_fields, bias=False)

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        a = torch.softmax(self.weight(e.mean(dim=-1)), dim=-1)
        return e + e * a.unsqueeze(-1)


class IntTowerSide(nn.Module):
    """x (B, W) -> (B, heads_out, D): the user side projects every layer's input, the item side
    its last output."""

    def __init__(self, embeddings: Embeddings, slots: tuple[Slot, ...], hidden: Sequence[int], heads: int, head_dim: int, dropout: float, every_layer: bool, head_std: float = 1e-3):
        super().__init__()
        self.embeddings = embeddings
        self.slots = slots
        self.light_se = LightSE(len(slots))
        widths = [len(slots) * embeddings.dim, *hidden]
        self.layers = nn.ModuleList(mlp(a, [b], dropout) for a, b in zip(widths[:-1], widths[1:]))
        projected = widths[:-1] if every_layer else widths[-1:]
        self.heads = nn.ModuleList(nn.Linear(w, heads * head_dim) for w in projected)
        for head in self.heads:
            # MaxSim sums (layers x heads) maxima of unnormalised dots: default-initialised heads
            # start it near +-100 and saturate the sigmoid. Small heads start it near 0 (the
            # authors initialise every layer with std 1e-4 for the same reason).
            nn.init.normal_(head.weight, std=head_std)
            nn.init.zeros_(head.bias)
        self.every_layer = every_layer
        self.n_heads, self.head_dim = heads, head_dim

    def layer_heads(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """x (B, W) -> the heads of each projected layer, [(B, heads, D)], and the last layer's
        output (B, hidden[-1])."""
        h = self.light_se(self.embeddings(x, self.slots)).flatten(1)
        reps = []
        for i, layer in enumerate(self.layers):
            if self.every_layer:
                reps.append(self.heads[i](h).unflatten(1, (-1, self.head_dim)))
            h = layer(h)
        if not self.every_layer:
            reps.append(self.heads[0](h).unflatten(1, (-1, self.head_dim)))
        return reps, h

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, W) -> heads (B, heads_out, D) and the last layer's output (B, hidden[-1])."""
        reps, h = self.layer_heads(x)
        return (reps[0] if len(reps) == 1 else torch.cat(reps, dim=1)), h  # the item side's one head needs no copy

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode(x)[0]


class IntTower(TwoTower):
    def __init__(
        self,
        user_fields: tuple[Field, ...],
        item_fields: tuple[Field, ...],
        embeddings: Embeddings,
        history_len: int = 0,
        hidden: Sequence[int] = (300, 300, 128),
        heads: int = 32,
        head_dim: int = 64,
        dropout: float = 0.3,
        head_std: float = 1e-3,
        cir_weight: float = 0.0,
        cir_temperature: float = 0.07,
    ):
        super().__init__(user_fields, item_fields, embeddings, history_len)
        self.user = IntTowerSide(embeddings, self.user_slots, hidden, heads, head_dim, dropout, every_layer=True, head_std=head_std)
        self.item = IntTowerSide(embeddings, self.item_slots, hidden, heads, head_dim, dropout, every_layer=False, head_std=head_std)
        self.bias = nn.Parameter(torch.zeros(()))
        # the contrastive interaction regulariser (CIR): off by default, as in the authors' HEAD
        self.cir_weight, self.cir_temperature = cir_weight, cir_temperature

    def score(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """u (B, layers * heads, D), v (B, N, heads, D) -> (B, N)."""
        return maxsim_score(u, v) + self.bias

    def layer_score(self, layers: list[torch.Tensor], v: torch.Tensor) -> torch.Tensor:
        """``score`` with the user heads a layer at a time: [(B, heads, D)], v (B, N, heads, D) ->
        (B, N). The same sum of maxima, regrouped, without the (B, layers * heads, D) copy of the
        heads ``score`` takes: a training step at the published size ran 2-11% faster than through
        ``score``, in two alternating runs in one process (docs/scaling.md)."""
        return sum(maxsim_score(u, v) for u in layers) + self.bias

    def forward(self, user: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """user (B, Wu), items (B, N, Wi) -> logits (B, N), by ``layer_score``."""
        b, n, w = items.shape
        v = self.item(items.reshape(b * n, w))
        return self.layer_score(self.user.layer_heads(user)[0], v.reshape(b, n, *v.shape[1:]))

    def regularised(self, user: torch.Tensor, items: torch.Tensor, label: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """user (B, Wu), items (B, N, Wi), label and mask (B, N) -> logits (B, N) and, when
        ``cir_weight > 0``, the weighted CIR regulariser on the positive pairs (else 0)."""
        if self.cir_weight == 0:
            return self(user, items), label.new_zeros(())
        b, n, w = items.shape
        layers, u_last = self.user.layer_heads(user)
        v, v_last = self.item.encode(items.reshape(b * n, w))
        logits = self.layer_score(layers, v.reshape(b, n, *v.shape[1:]))
        user_rows = u_last.repeat_interleave(n, dim=0)  # (B * N, D): one row per (user, item) pair
        valid = mask.reshape(-1)
        cir = contrastive_interaction(user_rows[valid], v_last[valid], label.reshape(-1)[valid], self.cir_temperature)
        return logits, self.cir_weight * cir
