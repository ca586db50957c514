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
    choice = best_prefixes(source, target)
    assert (choice.source, choice.target, choice.hits, choice.rivals) == ("module.backbone.", "encoder.", len(state), [])


def test_two_copies_of_one_network_are_ambiguous():
    """MoCo keeps a query and a key encoder with the same shapes: which one a plain model wants is the user's
    call (a rule), not a coin toss."""
    state = torchvision.models.resnet18().state_dict()
    source = {**_shapes(state, "encoder_q."), **_shapes(state, "encoder_k."), "queue": (128, 65536)}
    choice = best_prefixes(source, _shapes(state))
    assert (choice.source, choice.target, choice.hits) == ("", "", 0)
    assert sorted(choice.rivals) == [("encoder_k.", ""), ("encoder_q.", "")]
    del_k = {k: v for k, v in source.items() if not k.startswith("encoder_k.")}  # one copy: no doubt left
    choice = best_prefixes(del_k, _shapes(state))
    assert (choice.source, choice.target, choice.rivals) == ("encoder_q.", "", [])


def test_a_prefix_must_leave_a_module_path():
    """Stripping `head.fc.` and `blocks.3.` leaves only `weight`: that says nothing about which module it was."""
    source = {"head.fc.weight": (4, 4), "head.fc.bias": (4,), "stem.weight": (8, 3)}
    target = {"blocks.3.weight": (4, 4), "blocks.3.bias": (4,), "conv.weight": (8, 3)}
    assert best_prefixes(source, target).hits == 0


def test_a_prefix_renames_only_its_own_subtree():
    keys = ["proj.weight", "norm.proj.weight", "norm.norm.weight"]
    assert under_prefix(keys, "norm.") == {"proj.weight": "norm.proj.weight", "norm.weight": "norm.norm.weight"}
    assert under_prefix(keys, "") == {k: k for k in keys}


def test_moco_checkpoint_says_which_rule_to_add(tmp_path):
    """Into a plain ResNet, a MoCo checkpoint loads nothing by itself and says so; the rule it suggests loads
    the query encoder."""
    import torch

    from torchgraft.transfer import transfer

    torch.manual_seed(0)
    q, k = torchvision.models.resnet18().state_dict(), torchvision.models.resnet18().state_dict()
    torch.save({**{f"encoder_q.{n}": v for n, v in q.items()}, **{f"encoder_k.{n}": v for n, v in k.items()},
                "queue": torch.randn(128, 64)}, tmp_path / "moco.pth")
    report = transfer(tmp_path / "moco.pth", torchvision.models.resnet18())
    assert not report.by_status("loaded")
    hint = next(w for w in report.warnings if "fit equally well" in w)
    assert "'encoder_q.'" in hint and "'encoder_k.'" in hint
    model = torchvision.models.resnet18()
    report = transfer(tmp_path / "moco.pth", model, rules={"rename": {"re:^encoder_q\\.": ""}})
    assert len(report.by_status("loaded")) == len(q)
    assert all(torch.equal(model.state_dict()[n], v) for n, v in q.items())
