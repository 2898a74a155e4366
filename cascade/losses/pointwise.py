"""Pointwise BCE on logged samples: the warm-up / "independent" baseline."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def bce(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy over valid positions. logits, labels, mask (B, N) -> ()."""
    per_item = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    weight = mask.to(per_item.dtype)
    return (per_item * weight).sum() / weight.sum().clamp(min=1.0)
