"""RankFlow's tutor loss (Qin et al., SIGIR 2022): the next stage teaches this one.

Self-learning is plain ``pointwise.bce`` on the stage's own recall-truncated lists, where the
unexposed candidates carry label 0. The tutor term, on the same lists:

    tutor = alpha * TopK-BPR + (1 - alpha) * MSE(sigmoid(s), sigmoid(t))

with alpha on the rank term, as in the authors' code (RecStudio puts it on the MSE). The
teacher is detached. For an order-only teacher (LightGBM lambdarank) the MSE is meaningless:
use alpha = 1.
"""

from __future__ import annotations

import torch

from cascade.losses.sorting import top_k_indicator


def _masked_mean(x: torch.Tensor, weight: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return (x * weight).sum(dim) / weight.sum(dim).clamp(min=1e-12)


def topk_bpr(logits: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """``-log(1e-10 + sigmoid(mean p on the teacher's top-k - mean p on the rest))``, p the
    student's probabilities; the rest excludes padding. logits, teacher, mask (B, N) -> ().
    Lists whose top-k or rest is empty are left out (zero when none is left)."""
    mask = mask.bool()
    top = top_k_indicator(teacher.detach(), mask, k)
    rest = mask.to(top.dtype) - top
    p = torch.sigmoid(logits)
    gap = _masked_mean(p, top) - _masked_mean(p, rest)
    per_list = -torch.log(1e-10 + torch.sigmoid(gap))
    keep = (top.sum(1) > 0) & (rest.sum(1) > 0)
    return (per_list * keep).sum() / keep.sum().clamp(min=1)


def probability_mse(logits: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over valid items of ``(sigmoid(s) - sigmoid(t))^2``; teacher detached."""
    w = mask.to(logits.dtype)
    return (((torch.sigmoid(logits) - torch.sigmoid(teacher.detach())) ** 2) * w).sum() / w.sum().clamp(min=1)


def tutor(logits: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, k: int, alpha: float) -> torch.Tensor:
    """``alpha * topk_bpr + (1 - alpha) * probability_mse`` (alpha on the rank term)."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"rankflow alpha must be in [0, 1], got {alpha}")
    loss = alpha * topk_bpr(logits, teacher, mask, k) if alpha > 0 else logits.new_zeros(())
    if alpha < 1:
        loss = loss + (1 - alpha) * probability_mse(logits, teacher, mask)
    return loss
