"""torchgraft: put pretrained weights to work in a PyTorch model that is not quite the one they were trained for.

    src = tg.load("resnet50-0676ba61.pth")      # read any checkpoint safely
    report = tg.transfer(src, model)             # map it into a modified model; a Report for every tensor
    report = tg.transfer(src, build="timm:resnet50", out="r50.safetensors")   # low memory, written atomically
    plan = tg.plan(src, model)                   # what a transfer would do, and why; a file to review
    tg.freeze(model); tg.unfreeze(model, "fc")   # BatchNorm held in eval while frozen
    groups = tg.param_groups(model, lr=1e-3, weight_decay=0.05)

`tg.transfer`, `tg.freeze` and `tg.verify` are modules that can be called as their main function, so
`import torchgraft.transfer as t` gives the module and `from torchgraft.transfer import apply` the rest of it.
"""

from torchgraft.errors import CheckpointError, GraftError, IntegrityError, SpecError, UnsafePickleError
from torchgraft.freeze import param_groups, trainable_summary, unfreeze
from torchgraft.io.read import Source, load
from torchgraft.match.plan import Plan, plan
from torchgraft.report import Report

from torchgraft import freeze, transfer, verify  # noqa: E402  (callable modules: see torchgraft._callable)

__version__ = "0.1.0"

__all__ = [
    "load",
    "Source",
    "transfer",
    "plan",
    "Plan",
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
