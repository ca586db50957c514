"""Numeric sanity of checkpoint tensors: NaN, Inf, and floating weight tensors that are entirely zero.

One cheap pass per tensor, as it is read or placed (`torch.isfinite(t).all()` first; counts only when that
fails). Zero checks skip tensors that are normally zero: biases, BatchNorm running means and counters, and
one-element tensors.
"""

from __future__ import annotations

from typing import Any

import torch

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
    try:
        problems: list[dict[str, Any]] = []
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


def scan(tensors: Any, keys: Any = None) -> list[dict[str, Any]]:
    """Check each tensor of a mapping (a Source's tensors or a state_dict), reading each once."""
    out: list[dict[str, Any]] = []
    for k in (keys if keys is not None else list(tensors)):
        out.extend(check_tensor(k, tensors[k]))
    return out


def describe_problems(problems: list[dict[str, Any]]) -> str:
    """One line per problem, e.g. `fc.weight: 3 NaN values`."""
    words = {"nan": "NaN values", "inf": "infinite values", "all_zero": "values, all zero"}
    return "; ".join(f"{p['key']}: {p['count']} {words[p['problem']]}" for p in problems)
