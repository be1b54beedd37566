"""Survival core: time bins, the discrete-time NLL loss, risk scores and metrics."""

from steph.survival.bins import TimeBins
from steph.survival.loss import NLLSurvLoss, nll_survival_loss
from steph.survival.metrics import (
    CensoringDistribution,
    ConcordanceResult,
    brier_score,
    concordance_index,
    concordance_index_details,
    concordance_index_or_nan,
    integrated_brier_score,
    uno_concordance_index,
)
from steph.survival.risk import hazards_from_logits, risk_from_logits, survival_from_logits

__all__ = [
    "TimeBins",
    "NLLSurvLoss",
    "nll_survival_loss",
    "hazards_from_logits",
    "survival_from_logits",
    "risk_from_logits",
    "ConcordanceResult",
    "CensoringDistribution",
    "concordance_index",
    "concordance_index_details",
    "concordance_index_or_nan",
    "uno_concordance_index",
    "brier_score",
    "integrated_brier_score",
]
