"""Model specs build real models from torchvision, timm, transformers, modules and files — never downloading."""

from __future__ import annotations

import pytest
import torch.nn as nn

from torchgraft.errors import SpecError
from torchgraft.specs import build_model, is_model_spec, parse_kwargs


def test_torchvision_and_timm_with_kwargs():
    model = build_model("torchvision:resnet18", '{"num_classes": 21}')
    assert model.fc.out_features == 21
    model = build_model("timm:resnet10t", {"num_classes": 5, "in_chans": 4})
    assert model.fc.out_features == 5 and model.conv1[0].in_channels == 4


def test_transformers_class_from_a_local_config(minilm_dir):
    model = build_model("transformers:BertForSequenceClassification",
                        {"config": str(minilm_dir), "num_labels": 3})
    assert model.classifier.out_features == 3
    assert model.config.hidden_size == 384
    model = build_model("transformers:BertModel", {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 1,
                                                  "num_attention_heads": 2, "intermediate_size": 64})
    assert model.config.hidden_size == 32


def test_module_and_file_factories(tmp_path):
    assert isinstance(build_model("torch.nn:Linear", {"in_features": 3, "out_features": 2}), nn.Linear)
    path = tmp_path / "my_net.py"
    path.write_text("import torch.nn as nn\n"
                    "def build(width=4):\n"
                    "    return nn.Sequential(nn.Linear(2, width), nn.ReLU(), nn.Linear(width, 1))\n")
    model = build_model(f"{path}:build", {"width": 7})
    assert model[0].out_features == 7


@pytest.mark.parametrize("spec, kwargs, match", [
    ("resnet18", None, r"has no ':'"),
    ("torchvision:resnet_nope", None, r"torchvision has no model 'resnet_nope'.*resnet"),
    ("timm:not_a_model", None, r"timm has no model 'not_a_model'"),
    ("torchvision:resnet18", '{"weights": "IMAGENET1K_V1"}', r"without weights \(no download\)"),
    ("timm:resnet10t", '{"pretrained": true}', r"without weights \(no download\)"),
    ("transformers:BertModel", None, r"needs a config"),
    ("transformers:NoSuchModel", None, r"transformers has no class 'NoSuchModel'"),
    ("no_such_package.sub:fn", None, r"cannot import no_such_package.sub"),
    ("torch.nn:NoSuchThing", None, r"torch.nn has no 'NoSuchThing'"),
    ("torch.nn:Linear", '{"bogus": 1}', r"rejected --model-kwargs"),
    ("torch:float32", None, r"names a dtype; expected a class or factory|returned|names a"),
    ("missing_file.py:build", None, r"file missing_file.py does not exist"),
])
def test_errors_say_what_to_do(spec, kwargs, match):
    with pytest.raises(SpecError, match=match):
        build_model(spec, kwargs)


def test_a_file_python_cannot_load_is_a_spec_error(tmp_path, monkeypatch):
    """Where the import system finds no loader for a .py file, the spec says so (a real check, not an assert)."""
    import importlib.util

    path = tmp_path / "my_net.py"
    path.write_text("def build():\n    raise AssertionError('never imported')\n")
    monkeypatch.setattr(importlib.util, "spec_from_file_location", lambda *args, **kwargs: None)
    with pytest.raises(SpecError, match=r"my_net\.py:build': Python has no loader for .*my_net\.py; expected a "
                       r"Python source file \(path/to/file\.py:factory\)\. Nothing was imported\."):
        build_model(f"{path}:build")


def test_kwargs_must_be_a_json_object():
    assert parse_kwargs('{"a": 1}') == {"a": 1}
    with pytest.raises(SpecError, match=r"not valid JSON"):
        parse_kwargs("{a: 1}")
    with pytest.raises(SpecError, match=r"is a list; expected a JSON object"):
        parse_kwargs("[1]")


def test_spec_or_path(tmp_path):
    assert is_model_spec("torchvision:resnet18")
    assert is_model_spec("my_pkg.models:build")
    assert is_model_spec("net.py:build")
    assert not is_model_spec("weights.pth")
    existing = tmp_path / "a:b"
    existing.write_bytes(b"x")
    assert not is_model_spec(str(existing))


def test_the_weights_file_of_a_hugging_face_folder_names_its_model(minilm_dir):
    from torchgraft.specs import source_spec

    found = source_spec(minilm_dir / "model.safetensors")
    assert found is not None and found[0] == "transformers:BertModel", found
    assert "config.json" in found[2]
