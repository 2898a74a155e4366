"""Distillation from a teacher's scores over the same padded lists (B, N); teacher detached.

``listwise_kd`` is ListNet with the teacher's softmax as the target, scaled by T^2 so the
gradient's size does not depend on T (Hinton et al.). ``logit_mse`` and ``soft_bce`` need a
teacher whose scores are calibrated logits (DIN), not an order-only one (lambdarank).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def listwise_kd(logits: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """``-T^2 sum_j softmax(t/T)_j log softmax(s/T)_j`` per list (padding at -inf in both),
    averaged over lists with a valid item. logits, teacher, mask (B, N) -> ()."""
    mask = mask.bool()
    neg_inf = torch.finfo(logits.dtype).min
    log_q = F.log_softmax((logits / temperature).masked_fill(~mask, neg_inf), dim=1)
    p = F.softmax((teacher.detach() / temperature).masked_fill(~mask, neg_inf), dim=1)
    per_list = -(p * log_q).masked_fill(~mask, 0.0).sum(dim=1) * temperature**2
    keep = mask.any(dim=1)
    return (per_list * keep).sum() / keep.sum().clamp(min=1)


def logit_mse(logits: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over valid items of ``(s - t)^2``."""
    w = mask.to(logits.dtype)
    return (((logits - teacher.detach()) ** 2) * w).sum() / w.sum().clamp(min=1)


def soft_bce(logits: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """BCE of the student's logits against the teacher's probability ``sigmoid(t)``."""
    w = mask.to(logits.dtype)
    per_item = F.binary_cross_entropy_with_logits(logits, torch.sigmoid(teacher.detach()), reduction="none")
    return (per_item * w).sum() / w.sum().clamp(min=1)
