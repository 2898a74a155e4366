"""TARQ's alignment terms (Li et al., SIGIR 2026; the authors' ``ta_loss``), and the RQ-VAE
codebook terms that learn its codes.

At level l the item's residual ``r_l`` (the raw item vector after the codewords of the levels
before) falls on the codebook ``C_l`` (K, E) with the distribution ``p = softmax(-||r_l - C_l||^2)``;
the target-attention output's residual ``rbar_l`` falls on the *attended* codebook ``Cbar_l``
(each codeword's target attention over the request's history) with ``pbar``. The symmetric KL
between the two asks the codes chosen for the item to be the codes under which the attended
codebook rebuilds the attention output; the reconstruction term asks the attended codewords of
the item's codes to sum to that output.
"""

from __future__ import annotations

import torch


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    w = mask.to(x.dtype)
    return (x * w).sum() / w.sum().clamp(min=1.0)


def squared_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (B, N, E), b (K, E) or (B, K, E) -> (B, N, K) squared Euclidean distances, by one
    matmul (no (B, N, K, E) difference; smooth at 0, where ``cdist``'s square root is not)."""
    cross = a @ b.transpose(-1, -2)
    return (a.square().sum(-1, keepdim=True) - 2 * cross + b.square().sum(-1).unsqueeze(-2)).clamp(min=0.0)


def code_kl(r: torch.Tensor, codebook: torch.Tensor, r_bar: torch.Tensor, attended: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One level's symmetric KL(p || pbar) + KL(pbar || p), mean over valid candidates.

    r (B, N, E) item residuals, codebook (K, E), r_bar (B, N, E) attention-output residuals,
    attended (B, K, E) the request's attended codebook, mask (B, N) -> ()."""
    log_p = torch.log_softmax(-squared_distance(r, codebook), dim=-1)  # (B, N, K)
    log_pbar = torch.log_softmax(-squared_distance(r_bar, attended), dim=-1)
    kl = (log_p.exp() * (log_p - log_pbar)).sum(-1) + (log_pbar.exp() * (log_pbar - log_p)).sum(-1)
    return _masked_mean(kl, mask)


def reconstruction(rebuilt: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Half the squared distance between the summed attended codewords and the stop-gradient
    attention output (``tf.nn.l2_loss`` per candidate), mean over valid candidates.
    rebuilt, target (B, N, E), mask (B, N) -> ()."""
    return _masked_mean(0.5 * (rebuilt - target.detach()).square().sum(-1), mask)


def rq_codebook(residuals: list[torch.Tensor], chosen: list[torch.Tensor], mask: torch.Tensor, commitment: float) -> torch.Tensor:
    """RQ-VAE's terms per level: ``||sg(r_l) - c_l||^2`` moves the chosen codeword to the
    residual, ``commitment * ||r_l - sg(c_l)||^2`` the residual to its codeword; summed over
    levels, mean over valid candidates. residuals, chosen: per level (B, N, E); mask (B, N)."""
    total = mask.new_zeros((), dtype=residuals[0].dtype)
    for r, c in zip(residuals, chosen):
        per = (r.detach() - c).square().sum(-1) + commitment * (r - c.detach()).square().sum(-1)
        total = total + _masked_mean(per, mask)
    return total
