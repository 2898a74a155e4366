"""A stage that is a blend: ``sum_i w_i z(score_i)`` over each list, a part being a model (its
logits) or an item field (its value, e.g. the 7-day trend ``item_trend_7d``); ``z`` standardises a
part's scores over the list's candidates (mean 0, population std 1; padding, item id 0, ignored).

On MovieLens-1M the DIN ranker z-blended with the item trend ranks the recall lists better than
the DIN alone (benchmarks/results/ranker_ml1m.md): the DIN cannot learn how fast the catalog's
taste moves from training requests a year older than the test ones.

``Blend`` is a plain model (``user_slots``, ``item_slots``, ``forward(user, items) -> (B, N)``):
its packed inputs are the union of its parts', each part reading its own columns, so a blend
scores, exports to ONNX, teaches and is served wherever a model is. Its scores depend on the list
it is given (``list_dependent``): a cascade cuts it on the list it serves (``Cascade.run``).
``blend_weights`` picks the weights on validation lists (the first part's weight is 1).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from cascade.towers.embedding import Slot

BLEND = "blend"  # model.name of a blend (``task: blend``)
GRID = (0.0, 0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)  # the weights tried for each part after the first


def union(layouts: Sequence[tuple[Slot, ...]]) -> tuple[tuple[Slot, ...], list[torch.Tensor]]:
    """One packed layout holding every field of ``layouts`` once (in first-seen order), and for
    each layout the columns of the union that make up its own packed input."""
    slots: dict[str, Slot] = {}
    start = 0
    for layout in layouts:
        for s in layout:
            if s.name in slots:
                if slots[s.name].width != s.width:
                    raise ValueError(f"field '{s.name}' is {slots[s.name].width} wide in one part and {s.width} in another")
                continue
            slots[s.name] = Slot(s.name, start, s.width, s.table)
            start += s.width
    columns = [torch.tensor([c for s in layout for c in range(slots[s.name].start, slots[s.name].start + s.width)], dtype=torch.long) for layout in layouts]
    return tuple(slots.values()), columns


def standardised(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, N) -> each row's scores over ``mask`` to mean 0 and population std 1 (0 elsewhere);
    a row with one candidate, or all of one value, gives 0."""
    m = mask.to(scores.dtype)
    n = m.sum(dim=1, keepdim=True).clamp(min=1.0)
    mean = (scores * m).sum(dim=1, keepdim=True) / n
    std = torch.sqrt((((scores - mean) * m) ** 2).sum(dim=1, keepdim=True) / n)
    # a row of equal values is 0, not rounding noise over a tiny std (nor 0/0: onnxruntime lost
    # an added epsilon); 1e-6 relative is above float32's rounding of the mean
    spread = std > 1e-6 * torch.clamp(mean.abs(), min=1.0)
    return torch.where(spread, (scores - mean) / torch.where(spread, std, torch.ones_like(std)), torch.zeros_like(scores)) * m


class Blend(nn.Module):
    """``parts``: name -> a model, or None for an item field of that name; ``weights`` (P,)."""

    list_dependent = True

    def __init__(self, parts: dict[str, nn.Module | None], weights: Sequence[float], fields: dict[str, Slot]):
        """``fields``: the slot of each item-field part (width 1)."""
        super().__init__()
        if len(weights) != len(parts):
            raise ValueError(f"{len(parts)} parts and {len(weights)} weights")
        self.names = list(parts)
        models = {name: m for name, m in parts.items() if m is not None}
        self.models = nn.ModuleList(models.values())  # positional: a part's name may hold a '.'
        self.model_of = {name: i for i, name in enumerate(models)}
        item_id = Slot("item_id", 0, 1, "item_id")
        self.user_slots, user_cols = union([m.user_slots for m in models.values()])
        self.item_slots, item_cols = union([(item_id,)] + [m.item_slots if m is not None else (fields[name],) for name, m in parts.items()])
        for p, cols in enumerate(item_cols[1:]):
            self.register_buffer(f"item_cols_{p}", cols, persistent=False)
        for i, cols in enumerate(user_cols):
            self.register_buffer(f"user_cols_{i}", cols, persistent=False)
        self.register_buffer("weights", torch.tensor(list(weights), dtype=torch.float32))

    def describe(self) -> dict[str, float]:
        """Each part's weight by name (what stages.json and a bundle's manifest show)."""
        return dict(zip(self.names, (float(w) for w in self.weights)))

    def part_scores(self, user: torch.Tensor, items: torch.Tensor) -> list[torch.Tensor]:
        """Each part's raw scores (B, N): a model's logits, a field's value."""
        out = []
        for p, name in enumerate(self.names):
            part_items = items.index_select(-1, getattr(self, f"item_cols_{p}"))
            if name in self.model_of:
                i = self.model_of[name]
                out.append(self.models[i](user.index_select(-1, getattr(self, f"user_cols_{i}")), part_items))
            else:
                out.append(part_items[..., 0].to(torch.float32))
        return out

    def combine(self, parts: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        """The weighted sum of the parts' scores (each (B, N)), each standardised over ``mask``."""
        total = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
        for w, scores in zip(self.weights, parts):
            total = total + w * standardised(scores.to(torch.float32), mask)
        return total

    def forward(self, user: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """user (B, Wu), items (B, N, Wi) packed in ``user_slots`` / ``item_slots`` -> (B, N)."""
        return self.combine(self.part_scores(user, items), items[..., 0] > 0)  # item_id leads the item layout


def blend_weights(z: list[np.ndarray], quality: Callable[[np.ndarray], float], grid: Sequence[float] = GRID, passes: int = 2) -> list[float]:
    """Weights of the standardised parts ``z`` (each (B, N)) that maximise ``quality`` of their
    sum on validation lists: the first part at 1, the others by coordinate ascent over ``grid``
    (``passes`` rounds; two parts need one). Ties keep the smaller weight."""
    weights = [1.0] + [0.0] * (len(z) - 1)
    for _ in range(passes if len(z) > 2 else 1):
        for p in range(1, len(z)):
            rest = sum(w * s for i, (w, s) in enumerate(zip(weights, z)) if i != p)
            best = max(grid, key=lambda w: (quality(rest + w * z[p]), -w))
            weights[p] = float(best)
    return weights
