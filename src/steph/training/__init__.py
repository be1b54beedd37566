"""One trainer for every method: optimiser groups, schedule, 16-bag steps, checkpoints, resume."""

from steph.training.trainer import (
    TrainingRestart,
    TrainResult,
    cosine_with_warmup,
    evaluate,
    fit,
    parameter_groups,
    predict,
)

__all__ = ["TrainingRestart", "TrainResult", "cosine_with_warmup", "evaluate", "fit", "parameter_groups", "predict"]
