"""IntTower's contrastive interaction regulariser (CIR), the authors' updated form: in-batch
softmax over L2-normalised last-layer outputs of the two towers, temperature 0.07."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def contrastive_interaction(user: torch.Tensor, item: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """user, item (B, D) the towers' outputs for B (user, item) pairs, labels (B,). Over the
    positive pairs: cross-entropy of each user against every positive item of the batch, its own
    item the target. () ; zero when the batch has fewer than two positives."""
    pos = labels > 0.5
    if int(pos.sum()) < 2:
        return user.new_zeros(())
    u, v = F.normalize(user[pos], dim=-1), F.normalize(item[pos], dim=-1)
    logits = u @ v.T / temperature
    return F.cross_entropy(logits, torch.arange(len(u), device=u.device))
