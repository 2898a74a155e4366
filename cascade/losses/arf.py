"""ARF's recall-oriented losses (Wang et al., 2024) and LCRON's joint cascade loss (ICML 2025),
over NeuralSort permutation matrices of padded lists.

Notation: ``p_hat (B, N, N)`` the student's relaxed sort (``sorting.neural_sort``), ``g (B, N)``
the ground truth (top-k by the target: ``sorting.top_k_indicator``), ``m`` the stage's quota.
"""

from __future__ import annotations

import torch
from torch import nn

EPS = 1e-6


def _top_rows(n: int, m: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return (torch.arange(n, device=device) < m).to(dtype)  # (N,): 1 on rows 0..m-1


def _mean_over_valid(per_item: torch.Tensor, mask: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean over valid items of each kept list, then over kept lists (0 when none is kept)."""
    w = mask.to(per_item.dtype)
    per_list = (per_item * w).sum(1) / w.sum(1).clamp(min=1)
    return (per_list * keep).sum() / keep.sum().clamp(min=1)


def relax_loss(p_hat: torch.Tensor, g: torch.Tensor, mask: torch.Tensor, m: int) -> torch.Tensor:
    """ARF's L_relax: ``mean_j[-g_j log((1/m) sum_{i<m} P[i, j] + 1e-6)]``. Lists with no more
    than m valid items are skipped (every item passes: nothing to learn)."""
    top = torch.einsum("i,bij->bj", _top_rows(p_hat.shape[1], m, p_hat.device, p_hat.dtype), p_hat)
    per_item = -g * torch.log(top / m + EPS)
    return _mean_over_valid(per_item, mask, mask.sum(1) > m)


def column_normalised_top(p_hat: torch.Tensor, m: int) -> torch.Tensor:
    """``q(j) = sum_{i<m} P[i, j] / sg(sum_i P[i, j])`` (B, N): relaxed top-m membership whose
    column is normalised under stop-gradient (NeuralSort's columns need not sum to 1)."""
    top = torch.einsum("i,bij->bj", _top_rows(p_hat.shape[1], m, p_hat.device, p_hat.dtype), p_hat)
    return top / p_hat.sum(dim=1).detach().clamp(min=EPS)


def relax_bce(p_hat: torch.Tensor, g: torch.Tensor, mask: torch.Tensor, m: int) -> torch.Tensor:
    """ARF-v2 (LCRON's L_single): ``mean_j[-g log q_top - (1 - g) log q_bottom]`` with
    q_bottom = the column-normalised mass below row m. Lists with <= m valid items are skipped."""
    q_top = column_normalised_top(p_hat, m)
    q_bottom = p_hat.sum(1) / p_hat.sum(1).detach().clamp(min=EPS) - q_top
    per_item = -g * torch.log(q_top + EPS) - (1 - g) * torch.log(q_bottom + EPS)
    return _mean_over_valid(per_item, mask, mask.sum(1) > m)


def global_loss(p_hat: torch.Tensor, p_target: torch.Tensor, mask: torch.Tensor, size: int | None = None) -> torch.Tensor:
    """ARF's L_global (OPA surrogate): row-wise cross-entropy ``mean_i mean_j[-P_y[i, j] log(P[i, j]
    + 1e-6)]`` over the first ``size`` rows (every valid row when None); with ``size`` given, lists
    shorter than it are skipped. The mean over j runs over the valid items."""
    n_valid = mask.sum(1)
    rows = n_valid if size is None else torch.full_like(n_valid, size)
    row_w = (torch.arange(p_hat.shape[1], device=p_hat.device).unsqueeze(0) < rows.unsqueeze(1)).to(p_hat.dtype)  # (B, N)
    ce = -(p_target * torch.log(p_hat + EPS)) * mask.unsqueeze(1)  # (B, i, j)
    per_row = ce.sum(2) / n_valid.clamp(min=1).unsqueeze(1)
    per_list = (per_row * row_w).sum(1) / row_w.sum(1).clamp(min=1)
    keep = n_valid > 0 if size is None else n_valid >= size
    return (per_list * keep).sum() / keep.sum().clamp(min=1)


def joint_survival(p_hats: list[torch.Tensor], quotas: list[int]) -> torch.Tensor:
    """LCRON's survival probability of each item through all stages, (B, N): the product of its
    column-normalised relaxed top-quota membership in each stage's permutation."""
    p = None
    for p_hat, quota in zip(p_hats, quotas):
        q = column_normalised_top(p_hat, quota)
        p = q if p is None else p * q
    return p


def e2e_loss(p_hats: list[torch.Tensor], quotas: list[int], g: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """LCRON's L_e2e: BCE of the joint survival probability against the ground truth."""
    p = joint_survival(p_hats, quotas).clamp(EPS, 1 - EPS)
    per_item = -g * torch.log(p) - (1 - g) * torch.log(1 - p)
    return _mean_over_valid(per_item, mask, mask.any(1))


class UncertaintyWeights(nn.Module):
    """``main + sum_t aux_t / (2 sigma_t^2) + log sigma_t`` with learnable log sigma (init 0, so
    sigma = 1). The main term keeps weight 1 (ARF's and LCRON's variant of Kendall et al.)."""

    def __init__(self, n_aux: int):
        super().__init__()
        self.log_sigma = nn.Parameter(torch.zeros(n_aux))

    def forward(self, main: torch.Tensor, *aux: torch.Tensor) -> torch.Tensor:
        if len(aux) != len(self.log_sigma):
            raise ValueError(f"expected {len(self.log_sigma)} auxiliary losses, got {len(aux)}")
        total = main
        for loss, log_sigma in zip(aux, self.log_sigma):
            total = total + loss * torch.exp(-2 * log_sigma) / 2 + log_sigma
        return total
