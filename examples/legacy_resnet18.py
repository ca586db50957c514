"""A legacy ResNet18 file with 102 keys, loaded into a current torchvision resnet18 that has 122.

Files saved before PyTorch 0.4.1 (and the original model-zoo resnet18) lack the BatchNorm counter
`num_batches_tracked`, which PyTorch 0.4.1 added to each of resnet18's 20 BatchNorm layers: 102 + 20 = 122.
A plain key comparison shows 20 "missing" keys; `graft diff` explains them, and `transfer` loads all 102 tensors and leaves the 20 counters at their default (0) as benign: they only count batches
seen in training and matter only for BatchNorm with `momentum=None`.

The file is written here in the legacy (pre-1.6, non-zip) format from a torchvision resnet18's random
initialisation, with the counters removed, since no old ImageNet file is available offline.

    python examples/legacy_resnet18.py [--out DIR]
"""

from __future__ import annotations

import contextlib
import io

import torch
import torchvision

import torchgraft as tg
from torchgraft.cli import main as graft
from torchgraft.transfer import transfer

from _common import out_dir


def main() -> None:
    out = out_dir(__doc__.splitlines()[0])
    torch.manual_seed(0)
    old = {k: v for k, v in torchvision.models.resnet18().state_dict().items()
           if not k.endswith("num_batches_tracked")}
    path = out / "resnet18-old.pth"
    torch.save(old, path, _use_new_zipfile_serialization=False)

    src = tg.load(path)
    model = torchvision.models.resnet18()
    print(f"{path.name}: {len(src)} keys ({src.format}); torchvision resnet18: {len(model.state_dict())} keys")
    assert len(src) == 102 and len(model.state_dict()) == 122

    missing = set(model.state_dict()) - set(src.keys())
    assert len(missing) == 20 and all(k.endswith("num_batches_tracked") for k in missing)

    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        assert graft(["diff", str(path), "torchvision:resnet18"]) == 0
    lines = text.getvalue().splitlines()
    notes = lines[next(i for i, line in enumerate(lines) if line.startswith("note:")):]
    print("graft diff says:", *notes, sep="\n  ")
    assert "20 keys only in B are BatchNorm `num_batches_tracked`" in notes[0], text.getvalue()

    report = transfer(src, model)
    print(report.summary())
    counts = report.counts()
    assert (counts["loaded"], counts["new"], counts["unused_source"]) == (102, 20, 0), counts
    benign = [e for e in report.by_status("new") if e.benign]
    assert len(benign) == 20 and all(e.target.endswith("num_batches_tracked") for e in benign)
    report.check_strict()            # benign counters do not fail --strict
    assert torch.equal(model.layer3[1].bn2.running_var, old["layer3.1.bn2.running_var"])
    assert int(model.bn1.num_batches_tracked) == 0
    print("legacy: 102 loaded, 20 num_batches_tracked left at 0 (benign), strict check passes")


if __name__ == "__main__":
    main()
