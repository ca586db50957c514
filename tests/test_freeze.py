"""freeze / unfreeze, the BatchNorm policy, trainable summaries, parameter groups and gradual unfreezing, on real
torchvision and timm models (random weights, tiny inputs, CPU)."""

from __future__ import annotations

import copy
import io

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from timm.optim import param_groups_layer_decay

import torchgraft as tg
from torchgraft.errors import GraftError
from torchgraft.freeze import (UnfreezeSchedule, freeze, freeze_bn_modules, is_held, layer_depths, param_groups,
                               unfreeze)


def resnet18() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10)


def batches(n: int, size: int = 32, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, size, size, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(n)]


def sgd_steps(model: nn.Module, steps: int = 3, params=None) -> None:
    """The seeds' loop: SGD with momentum and weight decay over every parameter, in train() mode."""
    opt = torch.optim.SGD(model.parameters() if params is None else params, lr=0.1, momentum=0.9, weight_decay=1e-2)
    model.train()
    for x, y in batches(steps):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        if loss.requires_grad:  # a fully frozen model still runs forward in train mode
            loss.backward()
        opt.step()


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def changed(before: dict[str, torch.Tensor], model: nn.Module) -> set[str]:
    return {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}


def bn_buffers(model: nn.Module, prefix: str) -> set[str]:
    return {k for k in model.state_dict() if k.startswith(prefix) and k.rsplit(".", 1)[-1] in
            ("running_mean", "running_var", "num_batches_tracked")}


# ---- freeze, and what BatchNorm does -------------------------------------------------------------------------


def test_resnet18_layers_1_to_3_frozen_bit_identical():
    model = resnet18()
    names = freeze(model, "layer1", "layer2.*", "layer3")
    assert names == [n for n, _ in model.named_parameters() if n.split(".")[0] in ("layer1", "layer2", "layer3")]
    model.eval()
    model.train()  # must not undo the hold
    before = snapshot(model)
    sgd_steps(model)
    moved = changed(before, model)
    frozen_region = {k for k in before if k.split(".")[0] in ("layer1", "layer2", "layer3")}
    assert not moved & frozen_region  # weights and running statistics, bit for bit
    assert all(model.state_dict()[k].item() == 0 for k in frozen_region if k.endswith("num_batches_tracked"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable <= moved  # every trainable parameter moved
    assert bn_buffers(model, "layer4") <= moved and bn_buffers(model, "bn1") <= moved
    assert model.state_dict()["layer4.0.bn1.num_batches_tracked"].item() == 3
    held = [n for n, m in model.named_modules() if is_held(m)]
    assert len(held) == 14 and all(n.split(".")[0] in ("layer1", "layer2", "layer3") for n in held)


def test_seeds_recipe_drifts_where_freeze_does_not():
    model = resnet18()
    for name, p in model.named_parameters():  # what the seeds do
        if not name.startswith("fc."):
            p.requires_grad = False
    before = snapshot(model)
    sgd_steps(model, params=filter(lambda p: p.requires_grad, model.parameters()))
    assert bn_buffers(model, "layer1") <= changed(before, model)  # "frozen", yet the statistics moved

    model = resnet18()
    freeze(model)
    unfreeze(model, "fc")
    before = snapshot(model)
    sgd_steps(model, params=tg.param_groups(model, lr=0.1))
    assert changed(before, model) == {"fc.weight", "fc.bias"}


def test_timm_mobilenetv2_first_n():
    torch.manual_seed(0)
    model = timm.create_model("mobilenetv2_100", num_classes=10)
    ordered = [n for n, _ in model.named_parameters()]
    names = freeze(model, first=101)
    assert names == ordered[:101] and ordered[100] == "blocks.4.1.bn1.weight"  # that BN is half frozen
    before = snapshot(model)
    sgd_steps(model)
    moved = changed(before, model)
    assert not moved & set(ordered[:101])
    assert set(ordered[101:]) <= moved
    held = {n for n, m in model.named_modules() if is_held(m)}
    assert "blocks.4.0.bn3" in held and "blocks.4.1.bn1" not in held
    for name in held:
        assert not bn_buffers(model, name + ".") & moved
    assert bn_buffers(model, "blocks.4.1.bn1.") <= moved  # a layer with a trainable parameter keeps training


def test_types_selection():
    model = resnet18()
    names = freeze(model, types=(nn.Conv2d,))
    assert names == [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) for n in [n + ".weight"]]
    assert not any(is_held(m) for m in model.modules())  # BN parameters still train, so BN keeps training
    before = snapshot(model)
    sgd_steps(model)
    assert not changed(before, model) & set(names)
    assert bn_buffers(model, "layer1") <= changed(before, model)

    model = resnet18()
    freeze(model, types=nn.BatchNorm2d)
    assert sum(is_held(m) for m in model.modules()) == 20
    before = snapshot(model)
    sgd_steps(model)
    assert not changed(before, model) & bn_buffers(model, "")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {n for n, p in model.named_parameters() if "bn" not in n and "downsample.1" not in n}


def test_train_bn_keeps_norm_affine_trainable():
    model = resnet18()
    names = freeze(model, "layer1", train_bn=True)
    bn_params = {n for n in dict(model.named_parameters()) if n.startswith("layer1") and ".bn" in n}
    assert names == [n for n, _ in model.named_parameters() if n.startswith("layer1.") and n not in bn_params]
    assert all(p.requires_grad for n, p in model.named_parameters() if n in bn_params)
    assert not any(is_held(m) for m in model.modules())
    before = snapshot(model)
    sgd_steps(model)
    moved = changed(before, model)
    assert bn_params <= moved and bn_buffers(model, "layer1") <= moved and not moved & set(names)


def test_bn_train_opts_out_and_releases():
    model = resnet18()
    freeze(model, "layer1")
    freeze(model, "layer1", bn="train")
    assert not any(is_held(m) for m in model.modules())
    before = snapshot(model)
    sgd_steps(model)
    assert bn_buffers(model, "layer1") <= changed(before, model)
    assert not changed(before, model) & {n for n, p in model.named_parameters() if not p.requires_grad}


def test_unfreeze_restores_training_mode():
    model = resnet18()
    tg.freeze(model)
    before = snapshot(model)
    sgd_steps(model)
    assert changed(before, model) == set()

    names = tg.unfreeze(model, "layer4.*", "fc")
    assert names == [n for n, _ in model.named_parameters() if n.split(".")[0] in ("layer4", "fc")]
    model.train()
    assert all(m.training for n, m in model.named_modules() if n.startswith("layer4"))
    before = snapshot(model)
    sgd_steps(model)
    moved = changed(before, model)
    assert bn_buffers(model, "layer4") <= moved and not moved & bn_buffers(model, "layer3")

    tg.unfreeze(model)
    assert not any(is_held(m) for m in model.modules())
    before = snapshot(model)
    sgd_steps(model)
    assert set(before) - changed(before, model) == set()  # everything moves again, statistics included


def test_parameterless_norm_follows_its_parent_and_sync_batchnorm_is_held():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, affine=False)),
                          nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))
    freeze(model, "0.0.weight")  # the parent still trains its conv bias: the BN keeps training
    assert not is_held(model[0][1])
    freeze(model, "0")
    assert is_held(model[0][1]) and not is_held(model[2])
    before = snapshot(model)
    model.train()
    model(torch.randn(2, 3, 8, 8))
    assert changed(before, model) == bn_buffers(model, "2.")

    model = nn.SyncBatchNorm.convert_sync_batchnorm(resnet18())
    freeze(model, "layer1")
    assert sum(is_held(m) for m in model.modules()) == 4
    before = snapshot(model)
    sgd_steps(model, steps=1)
    assert not changed(before, model) & bn_buffers(model, "layer1")


def test_hold_survives_deepcopy_and_pickling():
    model = resnet18()
    freeze(model, "layer1")
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for clone in (copy.deepcopy(model), torch.load(buffer, weights_only=False)):
        before = snapshot(clone)
        sgd_steps(clone)
        assert not changed(before, clone) & bn_buffers(clone, "layer1")
        unfreeze(clone)
        assert not any(is_held(m) for m in clone.modules())
    assert sum(is_held(m) for m in model.modules()) == 4  # the original keeps its own hooks


def test_freeze_bn_modules_converts_held_layers():
    from torchvision.ops import FrozenBatchNorm2d

    model = resnet18()
    sgd_steps(model)  # non-trivial statistics
    freeze(model, "layer1", "layer2")
    model.eval()
    x = batches(1)[0][0]
    expected = model(x)
    assert freeze_bn_modules(model) == 9
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in model.modules()) == 9
    assert isinstance(model.layer2[0].downsample[1], FrozenBatchNorm2d)
    torch.testing.assert_close(model(x), expected)


def test_pattern_errors_name_closest_and_change_nothing():
    model = resnet18()
    with pytest.raises(GraftError, match=r"^freeze pattern 'layr4\.\*' matches no parameter or module; closest: "
                                         r"layer4, layer4\.0, layer4\.1\. Nothing was changed\. Patterns are fnmatch "
                                         r"globs over module names \('conv1', 'conv1\.\*'\)"):
        freeze(model, "fc", "layr4.*")
    assert all(p.requires_grad for p in model.parameters()) and not any(is_held(m) for m in model.modules())
    with pytest.raises(GraftError, match=r"^unfreeze pattern 'fc\.wieght' matches no parameter or module; "
                                         r"closest: fc\.weight, conv1\.weight, bn1\.weight\."):
        unfreeze(model, "fc.wieght")
    with pytest.raises(GraftError, match=r"^freeze pattern 'avgpool' matches only modules without parameters "
                                         r"\(avgpool\)"):
        freeze(model, "avgpool")
    with pytest.raises(GraftError, match=r"^freeze types=\(Conv3d\) match no module with parameters; the model's "
                                         r"module types with parameters are BatchNorm2d, Conv2d, Linear"):
        freeze(model, types=(nn.Conv3d,))
    with pytest.raises(GraftError, match=r"^freeze first=0: expected a count from 1 to 62"):
        freeze(model, first=0)
    with pytest.raises(GraftError, match=r"^bn='frozen': expected 'eval'"):
        freeze(model, bn="frozen")
    with pytest.raises(GraftError, match=r"^lr_mult pattern 'layer5\.\*' matches no parameter or module"):
        param_groups(model, lr=0.1, lr_mult={"layer5.*": 0.1})
    assert all(p.requires_grad for p in model.parameters())


# ---- trainable summary ------------------------------------------------------------------------------------


def test_trainable_summary_counts():
    model = resnet18()
    freeze(model, "layer[1-3]")
    s = tg.trainable_summary(model)
    frozen = sum(p.numel() for n, p in model.named_parameters() if n[:6] in ("layer1", "layer2", "layer3"))
    assert s.frozen == frozen and s.total == sum(p.numel() for p in model.parameters())
    assert (s.trainable_tensors, s.frozen_tensors, s.norm_layers, s.held_in_eval) == (20, 42, 20, 14)
    rows = {r.name: r for r in s.modules}
    assert [r.name for r in s.modules][:4] == ["conv1", "bn1", "layer1", "layer1.0"]
    assert (rows["layer2"].state, rows["layer2"].held_in_eval, rows["layer2"].norm_layers) == ("frozen", 5, 5)
    assert (rows["layer4.1"].state, rows["layer4.1"].held_in_eval, rows["layer4.1"].depth) == ("trainable", 0, 2)
    d = s.to_dict()
    assert d["held_in_eval"] == 14 and d["modules"][2] == {
        "name": "layer1", "type": "Sequential", "depth": 1, "trainable": 0, "frozen": rows["layer1"].frozen,
        "norm_layers": 4, "held_in_eval": 4, "state": "frozen"}
    assert s.summary().startswith(f"trainable {s.trainable:,} (")
    assert s.summary().endswith("14 of 20 norm layers with running statistics held in eval")


# ---- parameter groups -------------------------------------------------------------------------------------


def test_param_groups_hold_exactly_the_trainable_parameters():
    model = resnet18()
    freeze(model, "layer[1-3]")
    groups = param_groups(model, lr=0.1, weight_decay=1e-4, lr_mult={"layer4.*": 0.1, "layer*": 0.5})
    flat = [p for g in groups for p in g["params"]]
    assert len(flat) == len({id(p) for p in flat})
    assert {id(p) for p in flat} == {id(p) for p in model.parameters() if p.requires_grad}
    assert [g["name"] for g in groups] == ["decay", "no_decay", "lr_mult[layer4.*]/decay",
                                           "lr_mult[layer4.*]/no_decay"]
    by_name = {g["name"]: g for g in groups}
    assert by_name["lr_mult[layer4.*]/decay"]["lr"] == 0.1 * 0.1  # first matching pattern wins
    assert by_name["decay"]["lr"] == 0.1 and by_name["decay"]["weight_decay"] == 1e-4
    no_decay = [n for g in groups if g["weight_decay"] == 0.0 for n in g["param_names"]]
    assert no_decay == [n for n in no_decay if ("bn" in n or "downsample.1" in n or n.endswith(".bias"))]
    assert set(no_decay) == {n for n, p in model.named_parameters() if p.requires_grad and p.ndim == 1}
    assert all(g["weight_decay"] == 0.0 for g in groups if g["name"].endswith("no_decay"))
    again = param_groups(model, lr=0.1, weight_decay=1e-4, lr_mult={"layer4.*": 0.1, "layer*": 0.5})
    assert [g["param_names"] for g in again] == [g["param_names"] for g in groups]
    torch.optim.SGD(groups, lr=0.1, momentum=0.9)  # torch accepts them as they are
    assert [g["name"] for g in param_groups(model, lr=0.1, no_decay=())] == ["decay"]


def test_layer_decay_matches_timm_on_vit():
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=10)
    lr = 1e-3
    ours = param_groups(vit, lr=lr, weight_decay=0.05, layer_decay=0.75)
    reference = param_groups_layer_decay(vit, weight_decay=0.05, layer_decay=0.75,
                                         no_weight_decay_list=vit.no_weight_decay())
    ref_of = {id(p): (g["lr_scale"], g["weight_decay"]) for g in reference for p in g["params"]}
    seen = [id(p) for g in ours for p in g["params"]]
    assert sorted(seen) == sorted(ref_of) and len(seen) == len(set(seen))
    for g in ours:
        for p in g["params"]:
            scale, wd = ref_of[id(p)]
            assert (g["lr_scale"], g["lr"], g["weight_decay"]) == (scale, lr * scale, wd)
    by_param = {n: g for g in ours for n in g["param_names"]}
    assert by_param["head.weight"]["lr"] == lr
    assert by_param["cls_token"]["lr"] == lr * 0.75 ** 13 and by_param["cls_token"]["weight_decay"] == 0.0
    assert by_param["pos_embed"]["weight_decay"] == 0.0  # declared by the model's no_weight_decay()
    assert by_param["blocks.0.attn.qkv.weight"]["lr"] == lr * 0.75 ** 12
    assert by_param["blocks.0.attn.qkv.weight"]["name"] == "layer_1/decay"

    freeze(vit, "blocks.[0-5]", "patch_embed", "cls_token", "pos_embed")  # the factors do not depend on freezing
    partial = {n: g["lr"] for g in param_groups(vit, lr=lr, weight_decay=0.05, layer_decay=0.75)
               for n in g["param_names"]}
    assert partial == {n: by_param[n]["lr"] for n in partial} and "blocks.6.norm1.weight" in partial


def test_layer_depths_without_group_matcher():
    depths = layer_depths(resnet18())
    assert depths["conv1.weight"] == 0 and depths["bn1.bias"] == 1
    assert depths["layer1.0.conv1.weight"] == 2 and depths["layer1.1.bn2.weight"] == 3
    assert depths["layer4.1.conv2.weight"] == 9 and depths["fc.bias"] == 10


# ---- gradual unfreezing -----------------------------------------------------------------------------------


STEPS = [(0, "fc"), (1, ["layer4.1", "layer4.0.bn*"]), (2, "*")]
GROUP_KWARGS = {"lr": 1e-3, "weight_decay": 0.05, "lr_mult": {"layer4.*": 0.5}}


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(param_groups(model, **GROUP_KWARGS))


def run_epochs(model, optimizer, schedule, epochs) -> None:
    for epoch in epochs:
        schedule.step(epoch, model, optimizer, **GROUP_KWARGS)
        model.train()
        for x, y in batches(2, seed=epoch):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()


def test_schedule_resume_is_identical():
    model = resnet18()
    schedule = UnfreezeSchedule(STEPS)
    assert schedule.start(model) == ["fc.weight", "fc.bias"]
    optimizer = make_optimizer(model)
    run_epochs(model, optimizer, schedule, [0, 1])
    assert [g["name"] for g in optimizer.param_groups] == [
        "decay", "no_decay", "lr_mult[layer4.*]/no_decay@step1", "lr_mult[layer4.*]/decay@step1"]
    assert optimizer.param_groups[2]["param_names"][0] == "layer4.0.bn1.weight"
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict()}, buffer)
    run_epochs(model, optimizer, schedule, [2])  # the uninterrupted run

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    fresh = resnet18()
    fresh.load_state_dict(saved["model"])
    naive = make_optimizer(fresh)  # every parameter of a fresh model trains: not the checkpoint's groups
    with pytest.raises(ValueError, match="parameter group"):
        naive.load_state_dict(saved["optimizer"])
    resumed = UnfreezeSchedule(STEPS)
    resumed.load_state_dict(saved["schedule"])
    fresh_opt = resumed.restore(fresh, make_optimizer)
    fresh_opt.load_state_dict(saved["optimizer"])
    held = [n for n, m in fresh.named_modules() if is_held(m)]  # all but the 4 BatchNorms step 1 unfroze
    assert len(held) == 16 and "layer4.0.downsample.1" in held and "layer4.1.bn1" not in held
    run_epochs(fresh, fresh_opt, resumed, [2])

    assert [g["name"] for g in fresh_opt.param_groups] == [g["name"] for g in optimizer.param_groups]
    for key, value in model.state_dict().items():
        assert torch.equal(value, fresh.state_dict()[key]), key
    state, fresh_state = optimizer.state_dict()["state"], fresh_opt.state_dict()["state"]
    assert state.keys() == fresh_state.keys()
    for i in state:
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(state[i][k], fresh_state[i][k]), (i, k)


def test_schedule_restore_by_epoch_and_errors():
    model = resnet18()
    schedule = UnfreezeSchedule([(0, "fc"), (1, "layer4")])
    optimizer = schedule.restore(model, make_optimizer, epoch=1, **GROUP_KWARGS)  # no saved state: epoch says
    assert [g["name"] for g in optimizer.param_groups][2:] == ["lr_mult[layer4.*]/decay@step1",
                                                               "lr_mult[layer4.*]/no_decay@step1"]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {n for n, _ in model.named_parameters() if n[:6] in ("layer4", "fc.wei", "fc.bia")}

    with pytest.raises(GraftError, match=r"^unfreeze schedule: expected steps at increasing epochs, got epochs "
                                         r"\[0, 2, 1\]"):
        UnfreezeSchedule([(0, "fc"), (2, "layer4"), (1, "layer3")])
    bad = UnfreezeSchedule([(0, "fc"), (1, "layr4")])
    with pytest.raises(GraftError, match=r"^unfreeze schedule pattern 'layr4' matches no parameter or module; "
                                         r"closest: layer4"):
        bad.start(resnet18())
    other = UnfreezeSchedule([(0, "fc"), (3, "layer4")])
    with pytest.raises(GraftError, match=r"^unfreeze schedule: the checkpoint was trained with steps"):
        other.load_state_dict(schedule.state_dict())
