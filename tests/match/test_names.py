"""Prefix analysis: wrappers are found on both sides, and a prefix is used only when it pairs tensors one way."""

from __future__ import annotations

import torchvision

from torchgraft.match.names import best_prefixes, under_prefix


def _shapes(state, prefix=""):
    return {prefix + k: tuple(v.shape) for k, v in state.items()}


def test_wrapper_prefixes_are_found_on_both_sides():
    state = torchvision.models.resnet18().state_dict()
    source = _shapes(state, "module.backbone.")
    target = _shapes(state, "encoder.")
    sp, tp, hits = best_prefixes(source, target)
    assert (sp, tp, hits) == ("module.backbone.", "encoder.", len(state))


def test_two_copies_of_one_network_are_ambiguous():
    """MoCo keeps a query and a key encoder with the same shapes: which one a plain model wants is the user's
    call (a rule), not a coin toss."""
    state = torchvision.models.resnet18().state_dict()
    source = {**_shapes(state, "encoder_q."), **_shapes(state, "encoder_k."), "queue": (128, 65536)}
    assert best_prefixes(source, _shapes(state)) == ("", "", 0)
    del_k = {k: v for k, v in source.items() if not k.startswith("encoder_k.")}  # one copy: no doubt left
    assert best_prefixes(del_k, _shapes(state))[:2] == ("encoder_q.", "")


def test_a_prefix_must_leave_a_module_path():
    """Stripping `head.fc.` and `blocks.3.` leaves only `weight`: that says nothing about which module it was."""
    source = {"head.fc.weight": (4, 4), "head.fc.bias": (4,), "stem.weight": (8, 3)}
    target = {"blocks.3.weight": (4, 4), "blocks.3.bias": (4,), "conv.weight": (8, 3)}
    assert best_prefixes(source, target)[2] == 0


def test_a_prefix_renames_only_its_own_subtree():
    keys = ["proj.weight", "norm.proj.weight", "norm.norm.weight"]
    assert under_prefix(keys, "norm.") == {"proj.weight": "norm.proj.weight", "norm.weight": "norm.norm.weight"}
    assert under_prefix(keys, "") == {k: k for k in keys}
