"""DAT's adaptive-mimic loss."""

from __future__ import annotations

import torch


def adaptive_mimic(a_u: torch.Tensor, a_v: torch.Tensor, p_u: torch.Tensor, p_v: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """mean over valid samples of y * (||a_u - sg(p_v)||^2 + ||a_v - sg(p_u)||^2).

    a_u (B, D) user augmented vectors, p_u (B, D) user tower outputs, a_v and p_v (B, N, D) per
    candidate, labels and mask (B, N). Only the augmented vectors receive gradient.
    """
    w = labels * mask.to(labels.dtype)
    user_side = (a_u.unsqueeze(1) - p_v.detach()).pow(2).sum(-1)  # (B, N)
    item_side = (a_v - p_u.detach().unsqueeze(1)).pow(2).sum(-1)
    return ((user_side + item_side) * w).sum() / mask.sum().clamp(min=1)
