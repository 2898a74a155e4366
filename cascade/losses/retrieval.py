"""Sampled softmax for retrieval, with its corrections as small separate transforms.

Candidates for a batch of B (user, positive item) pairs are the B positives themselves (each
the others' in-batch negatives) plus any extra negatives. A candidate drawn from a source that
samples item j with expected count c_j is corrected by subtracting log c_j from its logit
(logQ correction; Yi et al., RecSys 2019), one count per negative source; hard negatives mined
from the cascade are not sampled from a distribution and are left uncorrected.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def log_q_correction(logits: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """logits (B, M) - log_q (M,) or (B, M): popular candidates, over-sampled as negatives,
    are pushed down by how often they are drawn."""
    return logits - log_q


def remove_accidental_hits(logits: torch.Tensor, positive_ids: torch.Tensor, candidate_ids: torch.Tensor, own_column: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) every candidate that is the row's positive item but not its own column.

    logits (B, M), positive_ids (B,), candidate_ids (M,) or (B, M), own_column (B,).
    """
    ids = candidate_ids if candidate_ids.dim() == 2 else candidate_ids.unsqueeze(0).expand_as(logits)
    hit = ids == positive_ids.unsqueeze(1)
    hit[torch.arange(len(logits)), own_column] = False
    return logits.masked_fill(hit, float("-inf"))


def sampled_softmax(logits: torch.Tensor, target_column: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy of each row's target column, each row times its ``weight`` if given.
    logits (B, M), target_column (B,), weight (B,)."""
    if weight is None:
        return F.cross_entropy(logits, target_column)
    return (weight * F.cross_entropy(logits, target_column, reduction="none")).mean()
