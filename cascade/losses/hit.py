"""HIT's generation loss, with the intended sign (the public code's HEAD inverts it)."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def generation(g_target: torch.Tensor, g_non_target: torch.Tensor, partner: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """mean over positives of 1 - cos(g_target, sg(partner)) + mean over negatives of
    1 - cos(g_non_target, sg(partner)): each generator learns to mimic the other tower's output
    on its own kind of sample. All (B, N, P) but labels, mask (B, N); means are 0 when empty."""
    partner = partner.detach()
    valid = mask.to(labels.dtype)
    pos, neg = labels * valid, (1 - labels) * valid
    t = 1 - F.cosine_similarity(g_target, partner, dim=-1)
    n = 1 - F.cosine_similarity(g_non_target, partner, dim=-1)
    return (t * pos).sum() / pos.sum().clamp(min=1) + (n * neg).sum() / neg.sum().clamp(min=1)
