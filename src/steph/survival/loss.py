"""Negative log-likelihood of the discrete-time logistic-hazard model (method.md section 2).

For a patient whose observed time falls in bin ``j`` with event flag ``e`` (1 = event
observed), with hazards ``h = sigmoid(logits)``, survival ``S_j = prod_{k<=j} (1 - h_k)`` and
``S_{-1} = 1``:

- uncensored part ``U = -(log S_{j-1} + log h_j)``, counted when ``e = 1`` (survived the bins
  before ``j``, then had the event in ``j``);
- censored part ``C = -log S_j``, counted when ``e = 0`` (survived to the end of bin ``j``);
- ``L = (1 - alpha) * (U + C) + alpha * U``.

Every ``log x`` is computed as ``log(clamp(x, min=eps))`` so that a saturated hazard (``h``
or ``S`` exactly 0 in floating point) gives a finite loss and a finite (zero) gradient.

With ``alpha = 0`` this is exactly the likelihood of Kvamme & Borgan's logistic-hazard model
(pycox's ``nll_logistic_hazard``) up to the clamping; ``alpha > 0`` up-weights the
uncensored patients, the convention of the MCAT / PORPOISE / STEPH reference code.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["nll_survival_loss", "NLLSurvLoss"]

_REDUCTIONS = ("mean", "sum", "none")


def _validate(logits: Tensor, bins: Tensor, events: Tensor, alpha: float, reduction: str) -> None:
    for name, x in (("logits", logits), ("bins", bins), ("events", events)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if logits.ndim != 2:
        raise ValueError(f"logits must have shape (B, n_bins), got {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be a floating-point tensor, got {logits.dtype}")
    batch, n_bins = logits.shape
    if bins.shape != (batch,):
        raise ValueError(
            f"bins must have shape (B,) = ({batch},) to match logits, got {tuple(bins.shape)}"
        )
    if events.shape != (batch,):
        raise ValueError(
            f"events must have shape (B,) = ({batch},) to match logits, got {tuple(events.shape)}"
        )
    if bins.is_floating_point() or bins.is_complex() or bins.dtype == torch.bool:
        raise ValueError(f"bins must be an integer tensor (int64), got {bins.dtype}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if batch == 0:
        raise ValueError("empty batch: logits has 0 rows")
    lo, hi = int(bins.min()), int(bins.max())
    if lo < 0 or hi >= n_bins:
        raise ValueError(
            f"bin indices must lie in [0, {n_bins - 1}] (n_bins = {n_bins}), got range [{lo}, {hi}]"
        )
    if not bool(((events == 0) | (events == 1)).all()):
        raise ValueError("events must be 0 (censored) or 1 (event observed)")


def nll_survival_loss(
    logits: Tensor,
    bins: Tensor,
    events: Tensor,
    alpha: float = 0.5,
    eps: float = 1e-7,
    reduction: str = "mean",
) -> Tensor:
    """Discrete-time survival NLL ``L = (1 - alpha) * (U + C) + alpha * U`` (see module doc).

    Args:
        logits: ``(B, n_bins)`` float tensor; hazards are ``sigmoid(logits)``.
        bins: ``(B,)`` integer tensor, the bin of each observed time, in ``[0, n_bins)``.
        events: ``(B,)`` tensor (bool, int or float) with 1 = event observed, 0 = censored.
        alpha: weight of the extra uncensored term, in [0, 1]; 0 gives the plain NLL.
        eps: lower clamp of every argument of ``log``.
        reduction: ``"mean"`` (over the batch), ``"sum"`` or ``"none"`` (per-patient ``(B,)``).
    """
    _validate(logits, bins, events, alpha, reduction)
    bins = bins.long().unsqueeze(1)  # (B, 1) for gather
    e = events.to(logits.dtype)

    hazards = torch.sigmoid(logits)
    surv = torch.cumprod(1.0 - hazards, dim=1)
    # S_padded[:, k] = S_{k-1}, with S_{-1} = 1 in column 0.
    surv_padded = torch.cat([torch.ones_like(surv[:, :1]), surv], dim=1)

    s_before = torch.gather(surv_padded, 1, bins).squeeze(1)  # S_{j-1}
    s_at = torch.gather(surv_padded, 1, bins + 1).squeeze(1)  # S_j
    h_at = torch.gather(hazards, 1, bins).squeeze(1)  # h_j

    uncensored = -e * (torch.log(s_before.clamp(min=eps)) + torch.log(h_at.clamp(min=eps)))
    censored = -(1.0 - e) * torch.log(s_at.clamp(min=eps))
    loss = (1.0 - alpha) * (uncensored + censored) + alpha * uncensored

    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


class NLLSurvLoss(nn.Module):
    """Module wrapper of :func:`nll_survival_loss`: ``NLLSurvLoss(alpha)(logits, bins, events)``."""

    def __init__(self, alpha: float = 0.5, eps: float = 1e-7, reduction: str = "mean") -> None:
        super().__init__()
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.alpha = float(alpha)
        self.eps = float(eps)
        self.reduction = reduction

    def forward(self, logits: Tensor, bins: Tensor, events: Tensor) -> Tensor:
        return nll_survival_loss(
            logits, bins, events, alpha=self.alpha, eps=self.eps, reduction=self.reduction
        )

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, eps={self.eps}, reduction={self.reduction!r}"
