"""`graft evaluate` and `graft predict` find the run's class names before building anything."""

from __future__ import annotations

import pytest

from torchgraft.errors import GraftError
from torchgraft.train.infer import load_finetuned


def test_class_names_missing_or_empty(tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"never read")
    with pytest.raises(GraftError, match=r"classes\.txt: no class names; expected classes\.txt beside the weights "
                       r"\(graft finetune writes it\) or --classes FILE with one name per line\."):
        load_finetuned("torchvision:mobilenet_v2", None, str(weights))
    (tmp_path / "names.txt").write_text("\n\n")
    with pytest.raises(GraftError, match=r"names\.txt: the class list is empty; expected one class name per line\."):
        load_finetuned("torchvision:mobilenet_v2", None, str(weights), classes_file=str(tmp_path / "names.txt"))
