"""Numeric sanity of checkpoint tensors: NaN, Inf, and floating weight tensors that are entirely zero.

One pass per real floating tensor, as it is read or placed: `torch.aminmax` reads the values once without a
temporary (NaN propagates into both results, an infinity shows as an extreme, and an all-zero tensor has
min == max == 0); counts are taken only when that finds a problem. Zero checks skip tensors that are normally
zero: biases, BatchNorm running means and counters, and one-element tensors.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from torchgraft.io.pages import FileMaps

__all__ = ["check_tensor", "scan", "NORMALLY_ZERO", "describe_problems"]

#: Last name components of tensors that are zero in a healthy checkpoint (never flagged as all_zero).
NORMALLY_ZERO = ("bias", "running_mean", "num_batches_tracked", "position_ids", "token_type_ids",
                 "relative_position_index")


def _normally_zero(key: str) -> bool:
    last = key.rsplit(".", 1)[-1]
    return last in NORMALLY_ZERO or last.endswith("_bias") or last.startswith("bias_")


def check_tensor(key: str, t: torch.Tensor) -> list[dict[str, Any]]:
    """Problems of one tensor: `[{"key", "problem": "nan"|"inf"|"all_zero", "count"}]` (empty when healthy)."""
    if t.is_meta or not (t.dtype.is_floating_point or t.dtype.is_complex) or t.numel() == 0:
        return []
    t = t.detach()
    try:
        problems: list[dict[str, Any]] = []
        if not t.dtype.is_complex:
            low, high = (float(v) for v in torch.aminmax(t))
            if math.isfinite(low) and math.isfinite(high):  # the common case: one read, no temporary
                if low == high == 0 and t.numel() > 1 and not _normally_zero(key):
                    problems.append({"key": key, "problem": "all_zero", "count": int(t.numel())})
                return problems
        finite = torch.isfinite(t)
        if not bool(finite.all()):
            nan = int(torch.isnan(t).sum())
            inf = int(t.numel() - int(finite.sum()) - nan)
            if nan:
                problems.append({"key": key, "problem": "nan", "count": nan})
            if inf:
                problems.append({"key": key, "problem": "inf", "count": inf})
            return problems
        if t.numel() > 1 and not _normally_zero(key) and not bool(t.any()):
            problems.append({"key": key, "problem": "all_zero", "count": int(t.numel())})
        return problems
    except RuntimeError:  # a dtype without these kernels (e.g. float8 on some builds): not checked
        return []


def scan(tensors: Any, keys: Any = None, *, release_pages: bool = False) -> list[dict[str, Any]]:
    """Check each tensor of a mapping (a Source's tensors or a state_dict), reading each once.

    release_pages: hand back the pages of memory-mapped tensors once checked (`torchgraft.io.pages`), so
    scanning a checkpoint bigger than memory keeps about one tensor resident. Only for tensors not changed
    in place since they were read (a Source's are not).
    """
    out: list[dict[str, Any]] = []
    maps = FileMaps() if release_pages else None
    try:
        for k in (keys if keys is not None else list(tensors)):
            t = tensors[k]
            out.extend(check_tensor(k, t))
            if maps:
                maps.release(t)
    finally:
        if maps is not None:
            maps.close()
    return out


def describe_problems(problems: list[dict[str, Any]]) -> str:
    """One line per problem, e.g. `fc.weight: 3 NaN values`."""
    words = {"nan": "NaN values", "inf": "infinite values", "all_zero": "values, all zero"}
    return "; ".join(f"{p['key']}: {p['count']} {words[p['problem']]}" for p in problems)
