"""Pure tensor adapters: turn a pretrained tensor into one that fits a slightly different model.

Every adapter takes tensors (and plain numbers or names) and returns a new tensor; none of them touches a model,
a module or a state dict. Each states its rule in its docstring, keeps the dtype and device of the tensor it
adapts (arithmetic happens in float32 internally), returns a fresh tensor detached from autograd, and raises
`GraftError` with what was found, what was expected and what to do when the adaptation is impossible.

`ADAPTERS` declares each adapter once (`Adapter`): its stable name, when it applies to a shape mismatch
(`choose`), the pure function, the arguments a plan records, and the sentence a report prints. Matching,
applying, reporting and the guide's table all read it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchgraft.errors import GraftError

__all__ = [
    "ADAPTERS",
    "Adapter",
    "Fit",
    "adapt_input_channels",
    "adapt_classifier_rows",
    "class_row_map",
    "copy_rows",
    "resize_pos_embed",
    "resize_embedding",
    "split_part",
    "merge",
    "reshape",
    "canonical_shape",
    "choose",
    "describe",
    "docs_table",
    "get",
]


# --------------------------------------------------------------------------------------------------------------
# input channels


def adapt_input_channels(weight: Tensor, in_chans: int) -> Tensor:
    """Adapt a first-layer convolution weight `[out, in, *kernel]` to `in_chans` input channels.

    Let `S = weight.shape[1]` be the source channel count (3 for an RGB model) and `N = in_chans`. The rules
    follow timm's `adapt_input_conv`:

    - `N == S`: the weight is returned unchanged (a copy).
    - `N == 1`: the weight is summed over its input channels. A grayscale image `g` through the new conv gives
      exactly what the source conv gives on `g` replicated to `S` channels.
    - `N > S` (e.g. RGB -> 4 or 6): the source channels are repeated cyclically up to `N`
      (channel `i` takes source channel `i % S`) and the result is scaled by `S / N`, so the summed weight
      mass per output channel is of the same order as before. Exact guarantee: when `N` is a multiple of `S`
      and the input repeats the source channels `N / S` times (RGBRGB for `N == 6`), the output equals the
      source conv's output on the `S`-channel input. For other `N` only the scale is kept: e.g. with
      `S == 3`, `N == 4` and input `[R, G, B, R]` the output is `3/4 * (conv_RGB([R, G, B]) + conv_R(R))`,
      where `conv_R` is the source conv restricted to its first channel.
    - `1 < N < S` (e.g. RGB -> 2): the first `N` source channels are kept and scaled by `S / N`.

    The arithmetic is done in float32; the result has the dtype and device of `weight`.
    """
    if not isinstance(weight, Tensor) or weight.ndim < 3:
        found = f"shape {tuple(weight.shape)}" if isinstance(weight, Tensor) else type(weight).__name__
        raise GraftError(
            f"input_channels: found a weight with {found}; expected a convolution weight of shape "
            "[out_channels, in_channels, *kernel] (at least 3 dimensions). Pass the first convolution's "
            "`.weight`, not a linear or bias tensor."
        )
    if isinstance(in_chans, bool) or not isinstance(in_chans, int) or in_chans < 1:
        raise GraftError(
            f"input_channels: found in_chans={in_chans!r}; expected a positive integer number of input "
            "channels. Pass the target model's input channel count (e.g. 1 for grayscale, 4 for RGB-NIR)."
        )
    source = weight.shape[1]
    if source < 1:
        raise GraftError(
            f"input_channels: found a weight with 0 input channels (shape {tuple(weight.shape)}); expected at "
            "least one. Check that the right tensor was passed."
        )
    if in_chans == source:
        return weight.detach().clone()
    w = weight.detach().float()
    if in_chans == 1:
        out = w.sum(dim=1, keepdim=True)
    else:
        repeats = math.ceil(in_chans / source)
        out = w.repeat(1, repeats, *([1] * (w.ndim - 2)))[:, :in_chans] * (source / in_chans)
    return out.to(weight.dtype)


# --------------------------------------------------------------------------------------------------------------
# classifier rows

_WHITESPACE = re.compile(r"\s+")


def _normalise_class_name(name: str) -> str:
    return _WHITESPACE.sub(" ", name.replace("_", " ")).strip().casefold()


def _check_class_list(classes: Sequence[str], side: str) -> list[str]:
    if isinstance(classes, (str, bytes)) or not isinstance(classes, Sequence):
        raise GraftError(
            f"classifier_rows: found {side}_classes of type {type(classes).__name__}; expected a sequence of "
            "class-name strings, one per classifier row. Pass a list such as ['cat', 'dog']."
        )
    bad = [c for c in classes if not isinstance(c, str)]
    if bad:
        raise GraftError(
            f"classifier_rows: found non-string entries in {side}_classes (first: {bad[0]!r} of type "
            f"{type(bad[0]).__name__}); expected class-name strings. Convert the labels with str() first."
        )
    return list(classes)


def _unique_index(classes: list[str]) -> dict[str, int]:
    """Normalised name -> row, leaving out every name that occurs more than once after normalisation."""
    index: dict[str, int] = {}
    duplicated: set[str] = set()
    for row, name in enumerate(classes):
        key = _normalise_class_name(name)
        if key in index:
            duplicated.add(key)
        else:
            index[key] = row
    for key in duplicated:
        del index[key]
    return index


def class_row_map(source_classes: Sequence[str], target_classes: Sequence[str]) -> list[tuple[int, int]]:
    """`(source_row, target_row)` for every class name on both sides, unambiguous on each, by target row.

    Names match exactly after normalisation: underscores become spaces, runs of whitespace collapse to one
    space, then `strip()` and `casefold()` (so "golden_retriever" == "Golden Retriever", but "tabby" !=
    "tabby cat"). A name that occurs more than once after normalisation, on either side, is ambiguous and left
    out.
    """
    source = _unique_index(_check_class_list(source_classes, "source"))
    target = _unique_index(_check_class_list(target_classes, "target"))
    return sorted(((source[key], j) for key, j in target.items() if key in source), key=lambda pair: pair[1])


def count_shared_classes(source_classes: Sequence[str], target_classes: Sequence[str]) -> int:
    """How many rows `adapt_classifier_rows` would copy: names on both sides, unambiguous on each."""
    return len(class_row_map(source_classes, target_classes))


def copy_rows(weight_or_bias: Tensor, init: Tensor, rows: Sequence[Sequence[int]]) -> Tensor:
    """`init` with target row `j` replaced by source row `i` for each `(i, j)` in `rows`.

    `weight_or_bias` is `[num_source, ...]`, `init` is `[num_target, ...]` with the same row shape; the result
    has the dtype and device of `init`.
    """
    if not isinstance(weight_or_bias, Tensor) or not isinstance(init, Tensor):
        raise GraftError(
            "classifier_rows: found a non-tensor weight_or_bias or init; expected two tensors, the source "
            "head's weight (or bias) and the target head's freshly initialised one."
        )
    if weight_or_bias.ndim < 1 or init.ndim < 1 or weight_or_bias.shape[1:] != init.shape[1:]:
        raise GraftError(
            f"classifier_rows: found source rows of shape {tuple(weight_or_bias.shape[1:])} and target rows "
            f"of shape {tuple(init.shape[1:])}; expected the same row shape (same feature width). The "
            "feature dimension differs, so rows cannot be copied; adapt the features first or re-initialise "
            "the head."
        )
    bad = [(i, j) for i, j in rows if not (0 <= i < weight_or_bias.shape[0] and 0 <= j < init.shape[0])]
    if bad:
        raise GraftError(
            f"classifier_rows: found the row pair {list(bad[0])} outside a source of {weight_or_bias.shape[0]} "
            f"rows and a target of {init.shape[0]} rows; expected (source_row, target_row) pairs inside both. "
            "The plan does not fit this checkpoint and model; re-run `graft plan`."
        )
    out = init.detach().clone()
    if rows:
        source_rows = weight_or_bias.detach().to(device=out.device, dtype=out.dtype)
        src_index = torch.tensor([i for i, _ in rows], dtype=torch.long)
        tgt_index = torch.tensor([j for _, j in rows], dtype=torch.long)
        out[tgt_index] = source_rows[src_index]
    return out


def adapt_classifier_rows(
    weight_or_bias: Tensor,
    source_classes: Sequence[str],
    target_classes: Sequence[str],
    init: Tensor,
) -> tuple[Tensor, int]:
    """Carry classifier rows over by class name; return `(new_tensor, number_of_copied_rows)`.

    `weight_or_bias` is the source head's weight `[num_source, features]` or bias `[num_source]`, with row `i`
    belonging to `source_classes[i]`; `init` is the target head's freshly initialised tensor
    `[num_target, ...]`, row `j` belonging to `target_classes[j]`. The result starts as a copy of `init`; each
    target row whose class name also names a source row gets that source row (`class_row_map` says which:
    names compared after normalising case, underscores and whitespace; names that occur twice on one side are
    not copied). The result has the dtype and device of `init`.
    """
    src = _check_class_list(source_classes, "source")
    tgt = _check_class_list(target_classes, "target")
    if not isinstance(weight_or_bias, Tensor) or not isinstance(init, Tensor):
        raise GraftError(
            "classifier_rows: found a non-tensor weight_or_bias or init; expected two tensors, the source "
            "head's weight (or bias) and the target head's freshly initialised one."
        )
    if weight_or_bias.ndim < 1 or weight_or_bias.shape[0] != len(src):
        raise GraftError(
            f"classifier_rows: found a source tensor of shape {tuple(weight_or_bias.shape)} but "
            f"{len(src)} source class names; expected one row per source class. Pass the class list the "
            "checkpoint was trained with, in row order."
        )
    if init.ndim < 1 or init.shape[0] != len(tgt):
        raise GraftError(
            f"classifier_rows: found a target init tensor of shape {tuple(init.shape)} but {len(tgt)} target "
            "class names; expected one row per target class. Pass the target head's freshly initialised "
            "tensor and the target class list in row order."
        )
    rows = class_row_map(src, tgt)
    return copy_rows(weight_or_bias, init, rows), len(rows)


# --------------------------------------------------------------------------------------------------------------
# position embeddings

_MODES = ("nearest", "nearest-exact", "bilinear", "bicubic", "area")


def _check_grid(grid: object, what: str) -> tuple[int, int]:
    if (
        not isinstance(grid, (tuple, list))
        or len(grid) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in grid)
    ):
        raise GraftError(
            f"pos_embed_resize: found {what}={grid!r}; expected a pair of positive integers (height, width) "
            "in patches. Pass e.g. (14, 14) for a 224px image with 16px patches."
        )
    return int(grid[0]), int(grid[1])


def resize_pos_embed(
    posemb: Tensor,
    new_len_or_grid: int | tuple[int, int] | None,
    num_prefix_tokens: int = 1,
    old_grid: tuple[int, int] | None = None,
    new_grid: tuple[int, int] | None = None,
    mode: str = "bicubic",
) -> Tensor:
    """Resize a ViT absolute position embedding `[1, num_prefix_tokens + H*W, C]` to a new patch grid.

    The first `num_prefix_tokens` tokens (class, distillation, register tokens) are kept unchanged. The
    remaining `H*W` tokens are laid out as an `H x W` grid (row-major) and interpolated in 2-D with
    `F.interpolate(mode=mode, align_corners=False, antialias=False)` (for modes that take those options) to
    the new grid, in float32; the result has the dtype and device of `posemb`. This is timm's
    `resample_abs_pos_embed(..., antialias=False)`.

    - `new_len_or_grid`: an `(H, W)` grid, or an int giving the new total length *including* the prefix
      tokens (what the target's `pos_embed.shape[1]` is), whose grid part must be a perfect square. It may be
      None when `new_grid` is given; if both are given they must agree.
    - `old_grid`: the source grid; default the square root of the source grid length (which must be square).

    Resizing to the same grid returns an unchanged copy.
    """
    if not isinstance(posemb, Tensor) or posemb.ndim != 3 or posemb.shape[0] != 1:
        found = f"shape {tuple(posemb.shape)}" if isinstance(posemb, Tensor) else type(posemb).__name__
        raise GraftError(
            f"pos_embed_resize: found a position embedding with {found}; expected [1, prefix + H*W, C]. "
            "Pass the ViT's `pos_embed` parameter; other layouts (e.g. [H*W, C]) need reshaping first."
        )
    if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, int) or num_prefix_tokens < 0:
        raise GraftError(
            f"pos_embed_resize: found num_prefix_tokens={num_prefix_tokens!r}; expected an integer >= 0 "
            "(1 for a class token, 0 for none, 1 + registers for register models)."
        )
    if mode not in _MODES:
        raise GraftError(
            f"pos_embed_resize: found mode={mode!r}; expected one of {', '.join(_MODES)}. Use 'bicubic' "
            "(timm's default) unless the model was trained otherwise."
        )
    length = posemb.shape[1]
    grid_len = length - num_prefix_tokens
    if grid_len <= 0:
        raise GraftError(
            f"pos_embed_resize: found {length} tokens with num_prefix_tokens={num_prefix_tokens}, leaving no "
            "grid tokens; expected prefix + H*W tokens with H*W > 0. Check num_prefix_tokens."
        )

    if old_grid is None:
        side = math.isqrt(grid_len)
        if side * side != grid_len:
            raise GraftError(
                f"pos_embed_resize: found {grid_len} grid tokens ({length} tokens minus {num_prefix_tokens} "
                "prefix tokens), which is not a square; expected H*W with H == W when old_grid is not given. "
                "Pass old_grid=(H, W) for a non-square grid, or check num_prefix_tokens."
            )
        old = (side, side)
    else:
        old = _check_grid(old_grid, "old_grid")
        if old[0] * old[1] != grid_len:
            raise GraftError(
                f"pos_embed_resize: found old_grid={old} ({old[0] * old[1]} tokens) but the embedding has "
                f"{grid_len} grid tokens ({length} minus {num_prefix_tokens} prefix tokens); expected them to "
                "match. Check old_grid and num_prefix_tokens."
            )

    new: tuple[int, int] | None = None
    if isinstance(new_len_or_grid, (tuple, list)):
        new = _check_grid(new_len_or_grid, "new_len_or_grid")
    elif new_len_or_grid is not None:
        if isinstance(new_len_or_grid, bool) or not isinstance(new_len_or_grid, int):
            raise GraftError(
                f"pos_embed_resize: found new_len_or_grid={new_len_or_grid!r}; expected an int (new total "
                "length including prefix tokens) or an (H, W) grid."
            )
        new_grid_len = new_len_or_grid - num_prefix_tokens
        side = math.isqrt(new_grid_len) if new_grid_len > 0 else 0
        if new_grid_len <= 0 or side * side != new_grid_len:
            raise GraftError(
                f"pos_embed_resize: found a new length of {new_len_or_grid} tokens, i.e. {new_grid_len} grid "
                f"tokens after {num_prefix_tokens} prefix tokens, which is not a positive square; expected "
                "prefix + H*W with H == W. Pass an (H, W) grid for a non-square target."
            )
        new = (side, side)
    if new_grid is not None:
        explicit = _check_grid(new_grid, "new_grid")
        if new is not None and new != explicit:
            raise GraftError(
                f"pos_embed_resize: found new_len_or_grid={new_len_or_grid!r} (grid {new}) and "
                f"new_grid={explicit}, which disagree; expected one target grid. Pass only one of them."
            )
        new = explicit
    if new is None:
        raise GraftError(
            "pos_embed_resize: found neither new_len_or_grid nor new_grid; expected the target grid. Pass "
            "new_len_or_grid=(H, W) or the target's total length."
        )

    posemb = posemb.detach()
    if new == old:
        return posemb.clone()

    prefix, grid = posemb[:, :num_prefix_tokens], posemb[:, num_prefix_tokens:]
    dim = posemb.shape[-1]
    x = grid.float().reshape(1, old[0], old[1], dim).permute(0, 3, 1, 2)
    kwargs: dict[str, object] = {}
    if mode in ("bilinear", "bicubic"):
        kwargs = {"align_corners": False, "antialias": False}
    x = F.interpolate(x, size=new, mode=mode, **kwargs)
    x = x.permute(0, 2, 3, 1).reshape(1, new[0] * new[1], dim).to(posemb.dtype)
    return torch.cat([prefix, x], dim=1)


# --------------------------------------------------------------------------------------------------------------
# embeddings


def resize_embedding(weight: Tensor, num_rows: int, init: Tensor | None = None) -> Tensor:
    """Resize an embedding table `[old_rows, ...]` (token embeddings, LM heads) to `num_rows` rows.

    Rows `[:min(old_rows, num_rows)]` are copied unchanged; shrinking therefore keeps the first rows. When
    growing, the new rows `[old_rows:num_rows]` are taken from the same rows of `init` if it is given (the
    target's freshly initialised tensor, shape `[num_rows, ...]`); otherwise every new row is the mean of the
    old rows, computed in float32. This is the idea of Hugging Face's
    `resize_token_embeddings(mean_resizing=True)` without its sampling from a normal distribution with the
    old rows' covariance: all new rows are identical (the mean), which keeps new tokens' logits near the
    average instead of arbitrary. The result has the dtype and device of `weight`.
    """
    if not isinstance(weight, Tensor) or weight.ndim < 1:
        raise GraftError(
            "embedding_resize: found a non-tensor or 0-dimensional weight; expected an embedding table "
            "[num_rows, ...]. Pass the embedding's `.weight`."
        )
    if isinstance(num_rows, bool) or not isinstance(num_rows, int) or num_rows < 0:
        raise GraftError(
            f"embedding_resize: found num_rows={num_rows!r}; expected a non-negative integer. Pass the "
            "target vocabulary size."
        )
    old_rows = weight.shape[0]
    if init is not None:
        if not isinstance(init, Tensor) or tuple(init.shape) != (num_rows, *weight.shape[1:]):
            found = tuple(init.shape) if isinstance(init, Tensor) else type(init).__name__
            raise GraftError(
                f"embedding_resize: found init of shape {found}; expected the target's full tensor of shape "
                f"{(num_rows, *weight.shape[1:])}. Pass the target embedding's freshly initialised weight, or "
                "leave init out to use the mean of the old rows."
            )
    keep = min(old_rows, num_rows)
    out = weight.new_empty((num_rows, *weight.shape[1:]))
    out[:keep] = weight[:keep].detach()
    if num_rows > old_rows:
        if init is not None:
            out[old_rows:] = init[old_rows:].detach().to(device=out.device, dtype=out.dtype)
        else:
            if old_rows == 0:
                raise GraftError(
                    "embedding_resize: found an empty embedding table (0 rows); expected at least one row to "
                    "take the mean of. Pass init= with the target's freshly initialised weight."
                )
            mean = weight.detach().float().mean(dim=0)
            out[old_rows:] = mean.to(out.dtype)
    return out


# --------------------------------------------------------------------------------------------------------------
# splits and merges


def split_part(tensor: Tensor, parts: int, part: int, dim: int = 0) -> Tensor:
    """Part `part` (from 0) of `tensor` cut into `parts` equal chunks along `dim` (a fused `qkv` -> `k`)."""
    if not isinstance(parts, int) or parts < 1 or not isinstance(part, int) or not 0 <= part < parts:
        raise GraftError(f"split: found part={part!r} of parts={parts!r}; expected 0 <= part < parts. Fix the "
                         "plan's split arguments.")
    if not -tensor.ndim <= dim < tensor.ndim or tensor.shape[dim] % parts:
        raise GraftError(f"split: found a tensor of shape {tuple(tensor.shape)}, which does not cut into {parts} "
                         f"equal parts along dim {dim}; expected a length divisible by {parts}.")
    return torch.chunk(tensor, parts, dim=dim)[part]


def merge(tensors: Sequence[Tensor], dim: int = 0) -> Tensor:
    """The tensors concatenated along `dim` (separate `q`, `k`, `v` -> one fused `qkv`)."""
    return torch.cat(list(tensors), dim=dim)


# --------------------------------------------------------------------------------------------------------------
# registry: each adapter declared once, for choosing, applying, reporting and the docs


@dataclass(frozen=True)
class Fit:
    """What an adapter's `choose` sees: one target tensor, the source tensor paired with it, and the context."""

    target: str
    source: str
    target_shape: tuple[int, ...]
    source_shape: tuple[int, ...]
    module: nn.Module | None
    """The target module that owns the tensor (None when unknown)."""
    first_conv: bool
    """Whether the owning module is the model's first convolution (timm's `pretrained_cfg["first_conv"]`)."""
    source_classes: Sequence[str] | None = None
    target_classes: Sequence[str] | None = None
    num_prefix_tokens: int = 1

    @property
    def param(self) -> str:
        return self.target.rpartition(".")[2]


#: choose(fit) -> the adapter's arguments when it applies; a sentence when it is the right adapter but cannot
#: apply (the tensor then stays new with that sentence as its note); None when it is not the right adapter.
Choose = Callable[[Fit], "dict[str, Any] | str | None"]


@dataclass(frozen=True)
class Adapter:
    """One named way to turn source tensor(s) into a target tensor."""

    name: str
    summary: str
    """The rule in one line: for `describe`, `graft plan --help` and the guide's table."""
    fn: Callable[..., Any]
    """The pure tensor function (documented, testable alone)."""
    args: tuple[str, ...]
    """The arguments a plan records for it, so applying re-derives nothing."""
    run: Callable[[list[Tensor], Tensor, dict[str, Any]], Tensor]
    """(source tensors, the target's current tensor, args) -> the value to place."""
    sentence: Callable[[dict[str, Any], tuple[int, ...], tuple[int, ...]], str]
    """(args, source shape, target shape) -> the note a plan and a report print."""
    choose: Choose | None = None
    """When it applies to a shape mismatch; None for adapters only rules ask for (split, merge)."""
    exact: bool = False
    """The values are the source's own, only cut or joined: the report says `loaded`, not `adapted`."""
    needs_init: bool = False
    """Builds on the target's freshly initialised tensor (rows for new classes or tokens)."""

    def check_args(self, args: Any, where: str) -> dict[str, Any]:
        if args is None and not self.args:  # a plan file leaves out an empty argument object
            return {}
        if not isinstance(args, dict) or set(args) != set(self.args):
            found = sorted(args) if isinstance(args, dict) else type(args).__name__
            raise GraftError(f"{where}: adapter {self.name!r} has arguments {found}; expected exactly "
                             f"{list(self.args)}. Re-run `graft plan`, or fix the plan by hand.")
        return args


def canonical_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """The shape without its size-1 dimensions: `(O, I, 1, 1)`, `(O, I)`; `(C, 1, 1)`, `(C,)`; `(1, N, D)`,
    `(N, D)` hold the same numbers in the same order (the `reshape` adapter), roles agreeing."""
    kept = tuple(int(d) for d in shape if d != 1)
    return kept if kept or not shape else (1,)


def _choose_reshape(fit: Fit) -> dict[str, Any] | None:
    if canonical_shape(fit.source_shape) == canonical_shape(fit.target_shape):
        return {"shape": list(fit.target_shape)}
    return None


def reshape(tensor: Tensor, shape: Sequence[int]) -> Tensor:
    """The same numbers in the same order under another shape that differs only in size-1 dimensions: a
    `Linear (O, I)` as a 1x1 convolution `(O, I, 1, 1)`, a layer scale `(C,)` as `(C, 1, 1)`, a position
    embedding `(1, N, D)` as `(N, D)`. Anything else (a crop, a transpose) is refused."""
    if canonical_shape(tensor.shape) != canonical_shape(shape):
        raise GraftError(f"reshape: found shape {tuple(tensor.shape)}, which differs from {tuple(shape)} in more "
                         "than size-1 dimensions; expected the same numbers in the same order. Nothing is cropped.")
    return tensor.reshape(tuple(shape))


def _choose_input_channels(fit: Fit) -> dict[str, Any] | None:
    s, t = fit.source_shape, fit.target_shape
    if fit.first_conv and isinstance(fit.module, nn.modules.conv._ConvNd) and fit.param == "weight" \
            and len(s) == len(t) and s[0] == t[0] and s[2:] == t[2:]:
        return {"in_chans": t[1]}
    return None


def _same_rows(fit: Fit) -> bool:
    s, t = fit.source_shape, fit.target_shape
    return len(s) == len(t) >= 1 and s[1:] == t[1:] and s[0] != t[0]


def _choose_classifier_rows(fit: Fit) -> dict[str, Any] | str | None:
    if not isinstance(fit.module, nn.Linear) or not _same_rows(fit):
        return None
    s, t = fit.source_shape[0], fit.target_shape[0]
    src, tgt = fit.source_classes, fit.target_classes
    if not (src and tgt and len(src) == s and len(tgt) == t):
        return (f"classifier with {t} outputs; the source has {s} and no class names on both sides, so it starts "
                f"new (source {fit.source})")
    rows = class_row_map(src, tgt)
    if not rows:
        return (f"classifier with {t} outputs shares no class name with the source's {s}; it starts new "
                f"(source {fit.source})")
    return {"rows": [list(pair) for pair in rows]}


def _choose_embedding_resize(fit: Fit) -> dict[str, Any] | None:
    if isinstance(fit.module, nn.Embedding) and _same_rows(fit):
        return {"num_rows": fit.target_shape[0]}
    return None


def _choose_pos_embed(fit: Fit) -> dict[str, Any] | None:
    s, t = fit.source_shape, fit.target_shape
    if "pos_embed" in fit.param and len(s) == 3 == len(t) and s[0] == t[0] == 1 and s[2] == t[2]:
        return {"num_prefix_tokens": fit.num_prefix_tokens}
    return None


ADAPTERS: dict[str, Adapter] = {a.name: a for a in (
    Adapter(
        "reshape",
        "the same numbers under a shape that differs only in size-1 dimensions (Linear <-> 1x1 conv, "
        "(C,) <-> (C, 1, 1), (1, N, D) <-> (N, D))",
        reshape, ("shape",),
        run=lambda src, cur, a: reshape(src[0], a["shape"]),
        sentence=lambda a, s, t: f"reshaped {list(s)} -> {a['shape']} (size-1 dimensions only)",
        choose=_choose_reshape, exact=True),
    Adapter(
        "input_channels",
        "input conv channels adapted: summed for 1 channel, else repeated cyclically/truncated and scaled by "
        "source/target channels",
        adapt_input_channels, ("in_chans",),
        run=lambda src, cur, a: adapt_input_channels(src[0], a["in_chans"]),
        sentence=lambda a, s, t: f"stem {s[1]} -> {a['in_chans']} input channels",
        choose=_choose_input_channels),
    Adapter(
        "classifier_rows",
        "classifier rows copied by class name (case/underscore-insensitive); unmatched or ambiguous classes "
        "keep fresh init",
        copy_rows, ("rows",),
        run=lambda src, cur, a: copy_rows(src[0], cur, a["rows"]),
        sentence=lambda a, s, t: (f"classifier {s[0]} -> {t[0]} classes: the rows of {len(a['rows'])} shared "
                                  "class names copied, the rest new"),
        choose=_choose_classifier_rows, needs_init=True),
    Adapter(
        "embedding_resize",
        "embedding rows resized: overlapping rows kept, new rows from fresh init or the mean of old rows",
        resize_embedding, ("num_rows",),
        run=lambda src, cur, a: resize_embedding(src[0], a["num_rows"], cur),
        sentence=lambda a, s, t: f"{s[0]} -> {a['num_rows']} rows: overlap copied, the rest initialised",
        choose=_choose_embedding_resize, needs_init=True),
    Adapter(
        "pos_embed_resize",
        "position embedding grid resampled in 2-D (bicubic by default); prefix tokens kept unchanged",
        resize_pos_embed, ("num_prefix_tokens",),
        run=lambda src, cur, a: resize_pos_embed(src[0], cur.shape[1], num_prefix_tokens=a["num_prefix_tokens"]),
        sentence=lambda a, s, t: f"{s[1]} -> {t[1]} positions: grid interpolated, prefix tokens kept",
        choose=_choose_pos_embed),
    Adapter(
        "split",
        "one part of a source tensor cut into equal parts along a dimension (a fused qkv into q, k, v)",
        split_part, ("dim", "part", "parts"),
        run=lambda src, cur, a: split_part(src[0], a["parts"], a["part"], a["dim"]),
        sentence=lambda a, s, t: f"part {a['part'] + 1} of {a['parts']} along dim {a['dim']}",
        exact=True),
    Adapter(
        "merge",
        "source tensors concatenated along a dimension (q, k, v into a fused qkv)",
        merge, ("dim",),
        run=lambda src, cur, a: merge(src, a["dim"]),
        sentence=lambda a, s, t: f"concatenated along dim {a['dim']}",
        exact=True),
)}
"""Every adapter by the name reports and plans use."""


def _with_layouts() -> None:
    from torchgraft.layout import _register

    ADAPTERS.update({a.name: a for a in _register()})


_with_layouts()  # the layouts of other frameworks (torchgraft.layout), registered beside the rest


def get(name: Any, where: str = "plan") -> Adapter:
    """The adapter registered as `name`, or a GraftError naming the known ones."""
    adapter = ADAPTERS.get(name) if isinstance(name, str) else None
    if adapter is None:
        raise GraftError(f"{where}: found adapter name {name!r}; expected one of {', '.join(sorted(ADAPTERS))}. "
                         "Use a name from torchgraft.adapt.ADAPTERS.")
    return adapter


def describe(name: str) -> str:
    """One-line human description of the adapter registered as `name`, for reports."""
    try:
        return ADAPTERS[name].summary
    except (KeyError, TypeError):
        raise GraftError(
            f"found adapter name {name!r}; expected one of {', '.join(sorted(ADAPTERS))}. Use a name from "
            "torchgraft.adapt.ADAPTERS."
        ) from None


def choose(fit: Fit) -> tuple[Adapter, dict[str, Any]] | str | None:
    """The first registered adapter that applies to `fit` with its arguments; else the sentence of one that
    is right for it but cannot apply; else None."""
    why = None
    for adapter in ADAPTERS.values():
        if adapter.choose is None:
            continue
        got = adapter.choose(fit)
        if isinstance(got, dict):
            return adapter, got
        if isinstance(got, str) and why is None:
            why = got
    return why


def docs_table() -> str:
    """The guide's table of adapters, made from the registry."""
    rows = ["| adapter | what it does | arguments in a plan |", "|---|---|---|"]
    rows += [f"| `{a.name}` | {a.summary} | {', '.join(f'`{x}`' for x in a.args)} |" for a in ADAPTERS.values()]
    return "\n".join(rows)
