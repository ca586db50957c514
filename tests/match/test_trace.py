"""Execution order by one forward pass on the meta device: what registration order gets wrong, and fallbacks."""

from __future__ import annotations

import pytest
import torch.nn as nn

from torchgraft.match.trace import execution_order, reorder

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")


def test_hugging_face_vit_norms_come_before_what_they_normalise():
    model = transformers.ViTModel(transformers.ViTConfig(num_hidden_layers=1, hidden_size=64, num_attention_heads=2,
                                                         intermediate_size=128, image_size=32, patch_size=8))
    registered = list(model.state_dict())
    assert registered.index("layers.0.layernorm_before.weight") > registered.index(
        "layers.0.attention.q_proj.weight")  # registered after the attention it feeds
    trace = execution_order(model)
    assert trace.ok and "traced on the meta device with input (1, 3, 32, 32)" in trace.note
    order = trace.order
    assert sorted(order) == sorted(registered)
    assert order.index("layers.0.layernorm_before.weight") < order.index(
        "layers.0.attention.q_proj.weight") < order.index("layers.0.layernorm_after.weight")
    assert order.index("embeddings.patch_embeddings.projection.weight") < order.index("embeddings.cls_token")
    assert all(not p.is_meta for p in model.parameters()) and model.training  # the model itself is untouched


def test_hugging_face_resnet_shortcut_runs_after_the_main_path():
    model = transformers.ResNetModel(transformers.ResNetConfig(depths=[1, 1], hidden_sizes=[16, 32],
                                                               embedding_size=8, layer_type="basic"))
    registered = list(model.state_dict())
    shortcut = "encoder.stages.0.layers.0.shortcut.convolution.weight"
    main = "encoder.stages.0.layers.0.layer.1.convolution.weight"
    assert registered.index(shortcut) < registered.index(main)
    order = execution_order(model).order
    assert order.index(main) < order.index(shortcut)


def test_parameters_of_a_container_and_unused_tensors_keep_their_place():
    model = timm.create_model("vit_tiny_patch16_224", depth=1, img_size=32)
    order = execution_order(model).order
    assert order.index("patch_embed.proj.weight") < order.index("cls_token") < order.index("blocks.0.norm1.weight")
    bn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    order = execution_order(bn, (1, 3, 8, 8)).order
    assert order.index("1.running_var") + 1 == order.index("1.num_batches_tracked")  # unused in eval, kept beside
    assert reorder(["a", "b", "c", "d"], ["c", "a"]) == ["c", "d", "a", "b"]  # b after a, d after c


def test_a_forward_that_reads_values_falls_back_and_says_why():
    class ReadsAValue(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x) * float(self.fc.weight.sum())

    trace = execution_order(ReadsAValue())
    assert trace.order is None
    assert trace.note.startswith("not traced: the forward pass does not run on the meta device with input (1, 4)")
    assert "registration order" in trace.note


def test_a_hand_written_text_model_is_traced_with_token_ids():
    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.tokens = nn.Embedding(50, 16)
            self.out = nn.Linear(16, 3)
            self.mix = nn.Linear(16, 16)

        def forward(self, ids):
            return self.out(self.mix(self.tokens(ids)))

    trace = execution_order(Tagger())
    assert trace.ok, trace.note
    assert trace.order.index("mix.weight") < trace.order.index("out.weight")  # run order, not registration
    assert "(1, 8)" in trace.note


def test_the_trace_records_which_module_feeds_which():
    import torchvision

    flow = execution_order(torchvision.models.resnet18()).flow
    assert flow["layer2.0.conv1"] == {"layer2.0.bn1"}
    # a block's input reaches its main path and its shortcut; both reach the next block, through the addition
    assert {"layer2.0.conv1", "layer2.0.downsample.0"} <= flow["layer1.1.bn2"]
    assert "layer2.1.conv1" in flow["layer2.0.bn2"] and "layer2.1.conv1" in flow["layer2.0.downsample.1"]
    assert "layer2.0.conv1" not in flow.get("layer2.0.downsample.0", set())
