"""One trainer for every method: optimiser groups, schedule, 16-bag steps, checkpoints, resume."""

from steph.training.trainer import (
    TrainResult,
    cosine_with_warmup,
    evaluate,
    fit,
    parameter_groups,
    predict,
)

__all__ = ["TrainResult", "cosine_with_warmup", "evaluate", "fit", "parameter_groups", "predict"]
