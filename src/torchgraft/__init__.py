"""torchgraft: put pretrained weights to work in a PyTorch model that is not quite the one they were trained for."""

from torchgraft.errors import CheckpointError, GraftError, IntegrityError, SpecError, UnsafePickleError
from torchgraft.freeze import freeze, param_groups, trainable_summary, unfreeze
from torchgraft.io.read import Source, load

__version__ = "0.1.0"

__all__ = [
    "load",
    "Source",
    "freeze",
    "unfreeze",
    "param_groups",
    "trainable_summary",
    "GraftError",
    "CheckpointError",
    "UnsafePickleError",
    "IntegrityError",
    "SpecError",
]
