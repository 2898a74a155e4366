"""Relaxed and hard sorts of padded lists as permutation matrices, and top-k ground truth.

A permutation matrix ``P (B, N, N)`` has rows = positions in descending order of score and
columns = items; ``P[b, i, j]`` is the (relaxed) probability that item j sits at position i.
Padding follows TF-Ranking's masked ``neural_sort``: padded items are left out of every score
difference and take the last positions, in index order, with probability 1 — so every row sums
to 1 and the valid block is the NeuralSort of the valid items alone.
"""

from __future__ import annotations

import torch


def _padding_rows(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For mask (B, N): the (B, N, N) one-hot placing padded item j at row n_valid + (its rank
    among the padded items), and the (B, N, 1) indicator of the rows that belong to valid items."""
    b, n = mask.shape
    n_valid = mask.sum(dim=1, keepdim=True)  # (B, 1)
    padded = ~mask
    row_of_padded = n_valid + torch.cumsum(padded.long(), dim=1) - 1  # (B, N), meaningful where padded
    rows = torch.arange(n, device=mask.device).view(1, n, 1)
    one_hot = (rows == row_of_padded.unsqueeze(1)) & padded.unsqueeze(1)
    valid_row = rows < n_valid.unsqueeze(1)
    return one_hot, valid_row


def neural_sort(scores: torch.Tensor, mask: torch.Tensor, tau: float) -> torch.Tensor:
    """NeuralSort (Grover et al., 2019) over the valid items of each list.

    scores (B, N), mask (B, N) bool -> P (B, N, N). For a list of n valid items, row i (0-based)
    is ``softmax_j(((n - 1 - 2i) s_j - sum_k |s_j - s_k|) / tau)`` over valid j (the paper's
    ``n + 1 - 2i`` with 1-based rows). ``tau`` must sit on the scale of n times the score gaps.
    """
    mask = mask.bool()
    s = scores.masked_fill(~mask, 0.0)
    n_valid = mask.sum(dim=1, keepdim=True).to(s.dtype)  # (B, 1)
    pair = (s.unsqueeze(2) - s.unsqueeze(1)).abs() * mask.unsqueeze(1)  # (B, j, k), padded k left out
    a_sum = pair.sum(dim=2)  # (B, N): sum_k |s_j - s_k|
    rows = torch.arange(s.shape[1], device=s.device, dtype=s.dtype)
    scale = n_valid - 1 - 2 * rows  # (B, N): one per row
    logits = (scale.unsqueeze(2) * s.unsqueeze(1) - a_sum.unsqueeze(1)) / tau  # (B, i, j)
    logits = logits.masked_fill(~mask.unsqueeze(1), float("-inf"))
    one_hot, valid_row = _padding_rows(mask)
    # rows past n_valid are all -inf over valid columns; give them a finite row before softmax
    soft = torch.softmax(logits.masked_fill(~valid_row, 0.0), dim=2)
    return torch.where(valid_row, soft, one_hot.to(s.dtype))


def hard_sort(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The exact permutation matrix sorting ``values`` descending; ties go to the lower index
    and padding goes last. values (B, N), mask (B, N) -> P (B, N, N) of 0/1."""
    mask = mask.bool()
    n = values.shape[1]
    # a stable sort of -values keeps ties in index order; padded items sort after every valid one
    key = torch.where(mask, -values.double(), torch.full_like(values, float("inf"), dtype=torch.float64))
    order = torch.sort(key, dim=1, stable=True).indices  # (B, N): item at each position
    return torch.nn.functional.one_hot(order, n).to(values.dtype)


def top_k_indicator(values: torch.Tensor, mask: torch.Tensor, k: int | torch.Tensor) -> torch.Tensor:
    """Ground truth g (B, N) in {0, 1}: the top-k valid items by ``values`` (hard sort, ties to the
    lower index). ``k`` is an int or a (B,) tensor; lists with fewer valid items mark them all."""
    p = hard_sort(values, mask)
    n = values.shape[1]
    k = torch.as_tensor(k, device=values.device).reshape(-1, 1)
    in_top = (torch.arange(n, device=values.device).unsqueeze(0) < k).to(values.dtype)  # (B or 1, N) rows
    return torch.einsum("bi,bij->bj", in_top.expand(values.shape[0], n), p) * mask
