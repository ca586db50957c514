"""torchgraft: put pretrained weights to work in a PyTorch model that is not quite the one they were trained for."""

from torchgraft.errors import CheckpointError, GraftError, IntegrityError, SpecError, UnsafePickleError
from torchgraft.io.read import Source, load

__version__ = "0.1.0"

__all__ = [
    "load",
    "Source",
    "GraftError",
    "CheckpointError",
    "UnsafePickleError",
    "IntegrityError",
    "SpecError",
]
