"""Never guess: random module trees, saved as safetensors (keys sorted as strings, module order lost) or as a
torch file (order kept), loaded into the same tree under other names. Whatever loads must be right."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn

from torchgraft.transfer import parameters_on_meta, transfer

SHAPES = [(4, 4), (4,), (8, 4), (4, 8)]  # few shapes: many groups alike, as in real networks

# A tree: ("leaf", shape_index, has_bias) or ("numbered" | "named", [children]).
_leaf = st.tuples(st.just("leaf"), st.integers(0, len(SHAPES) - 1), st.booleans())
_tree = st.recursive(
    _leaf,
    lambda inner: st.tuples(st.sampled_from(["numbered", "named"]), st.lists(inner, min_size=1, max_size=4)),
    max_leaves=14,
)


def _edited(tree, remove: int = -1, insert: int = -1, insert_shape: int = 0, changed: int = -1,
            counter: list[int] | None = None) -> list:
    """The tree's nodes, leaves numbered in build order and carrying that number as an id (so the same leaf can
    be found on both sides): leaf `remove` left out, a new leaf (id None) after leaf `insert`, and leaf
    `changed` given a shape no other leaf has."""
    counter = [0] if counter is None else counter
    kind, *rest = tree
    if kind == "leaf":
        i = counter[0]
        counter[0] += 1
        shape = (5, 4) if i == changed else SHAPES[rest[0]]
        nodes = [] if i == remove else [("leaf", shape, rest[1], i)]
        return nodes + ([("leaf", SHAPES[insert_shape], False, None)] if i == insert else [])
    return [(kind, [node for child in rest[0]
                    for node in _edited(child, remove, insert, insert_shape, changed, counter)])]


def _build(node, names_for, ids: dict, path: str = "", depth: int = 0) -> nn.Module:
    """The module tree of `_edited` nodes; `ids` receives each leaf module's path and id."""
    module = nn.Module()
    if node[0] == "leaf":
        _, shape, has_bias, leaf_id = node
        module.weight = nn.Parameter(torch.randn(shape))
        if has_bias:
            module.bias = nn.Parameter(torch.randn(shape[0]))
        ids[path] = leaf_id
        return module
    kind, children = node
    for name, child in zip(names_for(kind, len(children), depth), children):
        module.add_module(name, _build(child, names_for, ids, f"{path}.{name}" if path else name, depth + 1))
    return module


def _save(source: nn.Module, tmp_path_factory, fmt: str):
    """The source's state as safetensors (keys sorted) or a torch file (order kept): its path and the state."""
    path = tmp_path_factory.mktemp("src") / f"source.{fmt}"
    state = {k: v.detach().contiguous() for k, v in source.state_dict().items()}
    save_file(state, path) if fmt == "safetensors" else torch.save(state, path)
    return path, state


def _expected_source(target_key: str, tgt_ids: dict, src_ids: dict) -> str | None:
    """The source tensor that holds the same leaf's tensor, or None for a leaf the source does not have."""
    module, _, local = target_key.rpartition(".")
    leaf_id = tgt_ids[module]
    path_of = {i: p for p, i in src_ids.items()}
    return None if leaf_id is None else f"{path_of[leaf_id]}.{local}"


def _source_names(kind: str, n: int, depth: int = 0) -> list[str]:
    # numbered children as torch containers name them; named children in an order a string sort breaks
    return [str(i) for i in range(n)] if kind == "numbered" else ["proj", "norm", "conv", "act_fc", "attn"][:n]


def _target_names(kind: str, n: int, depth: int = 0) -> list[str]:
    # no name token in common with the source's (`fc` in both would be read as evidence by the name tie-break)
    return [f"m{i}" for i in range(n)] if kind == "numbered" else ["z_out", "y_ln", "x_cv", "w_dense", "v_at"][:n]


def _top_renamed(kind: str, n: int, depth: int) -> list[str]:
    """Only the top-level modules renamed, as a wrapper or a refactor does: the names inside are the same."""
    return (_target_names if depth == 0 else _source_names)(kind, n, depth)


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tree=st.tuples(st.just("named"), st.lists(_tree, min_size=1, max_size=4)), seed=st.integers(0, 2**16),
       changed=st.integers(-1, 8), meta=st.booleans(), top_only=st.booleans())
def test_whatever_loads_is_right(tmp_path_factory, fmt, tree, seed, changed, meta, top_only):
    """`changed`: one leaf of the target has another shape (a new head, a changed stem), or none does (-1).
    `meta`: the target is built with its parameters on the meta device. `top_only`: only the top-level names
    differ (prefix analysis has something to find). Each tensor reported loaded holds exactly its source tensor
    afterwards; the others are real tensors."""
    names = _top_renamed if top_only else _target_names
    torch.manual_seed(seed)
    (source_tree,), (target_tree,) = _edited(tree), _edited(tree, changed=changed)
    src_ids: dict[str, int] = {}
    tgt_ids: dict[str, int | None] = {}
    source = _build(source_tree, _source_names, src_ids)
    if meta:
        with parameters_on_meta():
            target = _build(target_tree, names, tgt_ids)
    else:
        target = _build(target_tree, names, tgt_ids)
    path, state = _save(source, tmp_path_factory, fmt)
    report = transfer(path, target)
    after = target.state_dict()
    for entry in report.entries:
        if entry.status != "new":
            assert entry.source == _expected_source(entry.target, tgt_ids, src_ids), (entry, sorted(state))
            assert torch.equal(after[entry.target], state[entry.source])
    assert not any(t.is_meta for t in after.values())


# Real layer types, so that the adapters' rules run too: the target's first convolution takes one more input
# channel (a 4-channel stem from RGB weights), under other names.
_LAYERS = [lambda: nn.Conv2d(3, 4, 3), lambda: nn.Conv2d(4, 4, 1), lambda: nn.BatchNorm2d(4),
           lambda: nn.Conv2d(4, 8, 3, bias=False), lambda: nn.BatchNorm2d(8), lambda: nn.Linear(8, 4)]
_layer_tree = st.recursive(
    st.tuples(st.just("leaf"), st.integers(0, len(_LAYERS) - 1)),
    lambda inner: st.tuples(st.sampled_from(["numbered", "named"]), st.lists(inner, min_size=1, max_size=4)),
    max_leaves=12,
)


def _build_layers(tree, names_for, wider_stem: bool, seen: list | None = None) -> nn.Module:
    seen = [] if seen is None else seen
    kind, *rest = tree
    if kind == "leaf":
        layer = _LAYERS[rest[0]]()
        if wider_stem and isinstance(layer, nn.Conv2d) and not any(isinstance(m, nn.Conv2d) for m in seen):
            layer = nn.Conv2d(layer.in_channels + 1, layer.out_channels, layer.kernel_size,
                              bias=layer.bias is not None)
        seen.append(layer)
        return layer
    module = nn.Module()
    for name, child in zip(names_for(kind, len(rest[0])), rest[0]):
        module.add_module(name, _build_layers(child, names_for, wider_stem, seen))
    return module


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tree=st.tuples(st.just("named"), st.lists(_layer_tree, min_size=2, max_size=4)), seed=st.integers(0, 2**16))
def test_a_wider_stem_under_other_names_is_adapted_only_from_the_right_tensor(tmp_path_factory, fmt, tree, seed):
    torch.manual_seed(seed)
    source = _build_layers(tree, _source_names, wider_stem=False)
    target = _build_layers(tree, _target_names, wider_stem=True)
    truth = dict(zip(target.state_dict(), source.state_dict()))  # the same tree in the same order
    path, state = _save(source, tmp_path_factory, fmt)
    report = transfer(path, target)
    for entry in report.entries:
        if entry.status != "new":
            assert entry.source == truth[entry.target], (entry, list(state))


# ---- a block inserted or removed ------------------------------------------------------------------------------


def _lettered_names(kind: str, n: int, depth: int = 0) -> list[str]:
    """Target names without digits: an edit renumbers containers (nn.Sequential re-indexes after a deletion), so
    digits would be false evidence here; name similarity has nothing to say and alignment alone decides."""
    return [f"m{chr(97 + i)}" for i in range(n)] if kind == "numbered" else _target_names(kind, n, depth)


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tree=st.tuples(st.just("named"), st.lists(_tree, min_size=1, max_size=4)), seed=st.integers(0, 2**16),
       edit=st.sampled_from(["remove", "insert"]), at=st.integers(0, 10),
       insert_shape=st.integers(0, len(SHAPES) - 1))
def test_with_a_block_inserted_or_removed_whatever_loads_is_right(tmp_path_factory, fmt, tree, seed, edit, at,
                                                                  insert_shape):
    """The target, every name changed, lacks one of the source's leaves or has one more (shaped like others,
    so alignment has something to get wrong); every tensor loaded must come from the same leaf of the source.
    (Removing one leaf and inserting another of the same shape in its place is a rename as far as any file can
    tell, so the two edits are not combined.)"""
    torch.manual_seed(seed)
    remove, insert = (at, -1) if edit == "remove" else (-1, at)
    (source_tree,), (target_tree,) = _edited(tree), _edited(tree, remove, insert, insert_shape)
    src_ids: dict[str, int] = {}
    tgt_ids: dict[str, int | None] = {}
    source = _build(source_tree, _source_names, src_ids)
    target = _build(target_tree, _lettered_names, tgt_ids)
    path, _ = _save(source, tmp_path_factory, fmt)
    report = transfer(path, target)
    for entry in report.entries:
        if entry.status == "new":
            continue
        expected = _expected_source(entry.target, tgt_ids, src_ids)
        assert expected is not None, entry  # the inserted leaf has no source
        assert entry.source == expected, entry
