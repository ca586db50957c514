"""torchgraft: put pretrained weights to work in a PyTorch model that is not quite the one they were trained for.

    src = tg.load("resnet50-0676ba61.pth")      # read any checkpoint safely
    report = tg.transfer(src, model)             # map it into a modified model; a Report for every tensor
    tg.freeze(model); tg.unfreeze(model, "fc")   # BatchNorm held in eval while frozen
    groups = tg.param_groups(model, lr=1e-3, weight_decay=0.05)

The submodules `transfer`, `freeze` and `verify` share their names with these functions; import from them
directly (`from torchgraft.transfer import apply`) for the rest of their API.
"""

from torchgraft.errors import CheckpointError, GraftError, IntegrityError, SpecError, UnsafePickleError
from torchgraft.freeze import freeze, param_groups, trainable_summary, unfreeze
from torchgraft.io.read import Source, load
from torchgraft.transfer import Report, plan, transfer
from torchgraft.verify import verify

__version__ = "0.1.0"

__all__ = [
    "load",
    "Source",
    "transfer",
    "plan",
    "Report",
    "verify",
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
