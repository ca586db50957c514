"""The fine-tuning tests' shared folder: real digit scans (scikit-learn's) written as image files."""

from __future__ import annotations

from pathlib import Path

import pytest

from torchgraft.train.digits import write_digits


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    """10 classes of 12 training and 6 validation scans at 32 px, written once per test module (a module's
    tests may add files to it without reaching another module's)."""
    return write_digits(tmp_path_factory.mktemp("digits"), size=32, train_per_class=12, val_per_class=6)
