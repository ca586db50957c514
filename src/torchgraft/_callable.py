"""Modules that are also their main function: `torchgraft.transfer(src, model)` calls
`torchgraft.transfer.transfer`, while `import torchgraft.transfer as t` still gives the module and
`from torchgraft.transfer import apply` its other names. The public functions then never shadow their modules."""

from __future__ import annotations

import functools
import inspect
import sys
import types
from collections.abc import Callable
from typing import Any


def make_callable(module_name: str, function: Callable[..., Any]) -> None:
    """Make the module `module_name` callable as `function` (same signature, same docstring for help())."""
    module = sys.modules[module_name]

    class CallableModule(types.ModuleType):
        __doc__ = module.__doc__

        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            return function(*args, **kwargs)

    functools.update_wrapper(CallableModule.__call__, function)
    module.__signature__ = inspect.signature(function)  # type: ignore[attr-defined]
    module.__class__ = CallableModule
