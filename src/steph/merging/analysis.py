"""Analyses of task vectors: the subspace alignment ratio (SAR) of the STEPH paper, appendix A.

For one weight matrix (``m x n``), with ``tau_new = U diag(s) V^T`` (thin SVD, ``s`` descending):

- ``R_alpha`` is the smallest rank ``R`` (``0 <= R <= min(m, n)``) whose tail energy ratio
  ``sum_{r > R} s_r^2 / sum_r s_r^2`` is ``<= (1 - alpha)^2`` (appendix A, eq. 4; equivalently
  ``||tau_new - tau_new_R||_F <= (1 - alpha) ||tau_new||_F`` for the best rank-R approximation);
- ``P = U_R U_R^T tau_t`` projects ``tau_t`` on the span of the first ``R`` left singular vectors;
- ``SAR = ||P||_F / ||tau_t||_F``, in [0, 1].

Conventions where the appendix is silent: the comparison is ``<=`` without tolerance, evaluated in
float64 on the suffix sums of ``s^2`` (so ``alpha = 1`` asks for an exactly zero tail); a zero
``tau_new`` has an empty dominant subspace (``R = 0``) and gives SAR 0; a zero ``tau_t`` makes the
ratio 0/0 and gives ``nan``. ``tau_t`` and ``tau_new`` must have the same number of rows.

Note: the STEPH reference release has a ``compute_rank`` helper (used by its projection code, not
necessarily by SAR) that picks the first rank whose *head* energy ratio satisfies
``sqrt(sum_{r <= R} s_r^2 / sum s_r^2) > alpha``, i.e. a tail ratio ``< 1 - alpha^2`` (0.0975 at
alpha = 0.95), a looser threshold than the appendix's ``(1 - alpha)^2`` (0.0025). This module
follows the appendix.

Pure functions: inputs are not modified, everything runs under ``torch.no_grad()``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from steph.errors import ConfigError, DataError

__all__ = ["dominant_rank", "subspace_alignment_ratio", "subspace_alignment_ratios"]


def _check_alpha(alpha: float) -> float:
    try:
        a = float(alpha)
    except (TypeError, ValueError):
        raise ConfigError(f"SAR alpha must be a number in [0, 1], got {alpha!r}") from None
    if not (0.0 <= a <= 1.0):
        raise ConfigError(f"SAR alpha must lie in [0, 1], got {alpha!r}")
    return a


@torch.no_grad()
def dominant_rank(singular_values: Tensor, alpha: float = 0.95) -> int:
    """``R_alpha``: the smallest ``R`` with ``sum_{r>R} s_r^2 / sum s_r^2 <= (1 - alpha)^2``.

    ``singular_values`` must be sorted in descending order (as ``torch.linalg.svd`` returns
    them). Returns 0 when all singular values are 0.
    """
    a = _check_alpha(alpha)
    s = singular_values.detach().to(torch.float64).reshape(-1)
    if s.numel() > 1 and bool((s[1:] > s[:-1]).any()):
        raise ConfigError("dominant_rank: singular values must be sorted in descending order")
    energy = s * s
    total = energy.sum()
    if s.numel() == 0 or total.item() == 0.0:
        return 0
    # tail[R] = sum_{r >= R} energy[r] (0-based) = sum_{r > R} s_r^2 (1-based); tail[len] = 0
    tail = torch.cat(
        [torch.flip(torch.cumsum(torch.flip(energy, [0]), 0), [0]), energy.new_zeros(1)]
    )
    ok = (tail / total) <= (1.0 - a) ** 2
    return int(torch.nonzero(ok)[0].item())  # ok[-1] is always True


@torch.no_grad()
def subspace_alignment_ratio(tau_t: Tensor, tau_new: Tensor, alpha: float = 0.95) -> float:
    """SAR of ``tau_t`` with respect to the dominant left subspace of ``tau_new`` (appendix A)."""
    _check_alpha(alpha)
    if tau_t.dim() != 2 or tau_new.dim() != 2:
        raise DataError(
            "subspace_alignment_ratio needs two 2-D weight matrices, got shapes "
            f"{tuple(tau_t.shape)} and {tuple(tau_new.shape)}"
        )
    if tau_t.shape[0] != tau_new.shape[0]:
        raise DataError(
            "subspace_alignment_ratio: tau_t and tau_new need the same number of rows, got "
            f"{tuple(tau_t.shape)} and {tuple(tau_new.shape)}"
        )
    t = tau_t.detach().to(torch.float64)
    new = tau_new.detach().to(torch.float64)
    norm_t = torch.linalg.matrix_norm(t)
    if norm_t.item() == 0.0:
        return float("nan")
    u, s, _ = torch.linalg.svd(new, full_matrices=False)
    r = dominant_rank(s, alpha)
    u_r = u[:, :r]
    proj = u_r @ (u_r.T @ t)
    return float(torch.linalg.matrix_norm(proj) / norm_t)


@torch.no_grad()
def subspace_alignment_ratios(
    tau_t: Mapping[str, Tensor], tau_new: Mapping[str, Tensor], alpha: float = 0.95
) -> dict[str, float]:
    """SAR for every 2-D tensor of ``tau_t`` (1-D tensors such as biases are skipped), keyed by
    name, in the order of ``tau_t``. Every such name must exist in ``tau_new``."""
    _check_alpha(alpha)
    out: dict[str, float] = {}
    for name, t in tau_t.items():
        if t.dim() != 2:
            continue
        if name not in tau_new:
            raise DataError(f"subspace_alignment_ratios: '{name}' is missing from tau_new")
        out[name] = subspace_alignment_ratio(t, tau_new[name], alpha=alpha)
    return out
