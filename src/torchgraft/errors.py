"""One exception hierarchy. Every message says what was found, what was expected and what to do."""

from __future__ import annotations

__all__ = [
    "GraftError",
    "CheckpointError",
    "UnsafePickleError",
    "IntegrityError",
    "SpecError",
    "UsageError",
]


class GraftError(Exception):
    """Base class of every error torchgraft raises on bad input; the CLI prints it as one `error:` line."""


class CheckpointError(GraftError):
    """A file or folder could not be read as a checkpoint (missing, empty, truncated, corrupt, unknown format)."""


class UnsafePickleError(CheckpointError):
    """A pickle asked to call something that is not plain data; nothing was called."""

    def __init__(self, path: str, global_name: str, detail: str = "") -> None:
        self.global_name = global_name
        extra = f" {detail}" if detail else ""
        super().__init__(
            f"{path}: the pickle asks to call `{global_name}`, which is not tensor or container data;{extra} "
            "nothing was run and nothing was loaded. If the file should hold weights, re-save them from a "
            "trusted environment with `torch.save(model.state_dict(), ...)` or as safetensors."
        )


class IntegrityError(CheckpointError):
    """A file's content does not match the hash its name promises."""


class SpecError(GraftError):
    """A model spec could not be resolved into a model."""


class UsageError(GraftError):
    """The command line (or a config file standing for it) asks for something impossible: a value out of range,
    a flag without the flag it needs. The CLI exits 2 for it, as for any other usage error."""
