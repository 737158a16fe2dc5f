"""Training and fine-tuning SED with the paper's recipe on Ray Train: labelled data, augmentation,
the distributed loop with resumable state, validation during training.

Entry points: `run_training(spec)`, and `training_inputs(spec)` to check a spec's data without training.
"""

from .data import TrainDataError, training_inputs
from .run import TrainSummary, run_training

__all__ = ["TrainDataError", "TrainSummary", "run_training", "training_inputs"]
