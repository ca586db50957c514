"""Look inside a model, save it two ways, edit its layers AlexNet-style, and reload what still fits.

1. Inspect modules and parameters: `describe_model` is what `graft inspect --model torchvision:alexnet` shows,
   `trainable_summary` counts trainable and frozen parameters per module.
2. Save a state_dict (tensors only: the recommended way) and the whole model (`torch.save(model)`: a pickle
   that names the model's classes). `tg.load` reads both without running code from the file: for the pickle it
   records the module classes instead of importing them.
3. Delete, replace and add layers in `classifier`, then `transfer` the saved weights into the edited model:
   every layer that still fits is loaded, and the report names the ones that do not.

Uses torchvision's AlexNet architecture with its random initialisation (no weights are downloaded).

    python examples/model_surgery.py [--out DIR]
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torchvision

import torchgraft as tg
from torchgraft.summary import describe_model
from torchgraft.transfer import transfer

from _common import out_dir


def main() -> None:
    out = out_dir(__doc__.splitlines()[0])
    torch.manual_seed(0)
    model = torchvision.models.alexnet()

    # 1. What is it made of?
    info = describe_model(model, "torchvision:alexnet")
    print(f"alexnet: {info['num_params']:,} parameters in {len(info['parameters'])} tensors, "
          f"{info['num_buffers']} buffers")
    for m in info["modules"]:
        if m["name"].startswith("classifier.") and m["params"]:
            print(f"  {m['name']:<14} {m['type']:<8} {m['params']:>12,}")
    assert info["num_params"] == sum(p.numel() for p in model.parameters())
    assert [p["key"] for p in info["parameters"]][-2:] == ["classifier.6.weight", "classifier.6.bias"]
    tg.freeze(model, "features.*")
    summary = tg.trainable_summary(model)
    print(summary.summary())
    assert summary.frozen == sum(p.numel() for p in model.features.parameters())
    tg.unfreeze(model)

    # 2. Two ways to save; torchgraft reads both safely.
    torch.save(model.state_dict(), out / "alexnet_state_dict.pth")
    torch.save(model, out / "alexnet_model.pth")
    tensors = tg.load(out / "alexnet_state_dict.pth")
    pickled = tg.load(out / "alexnet_model.pth")
    print(f"state_dict file: {len(tensors)} tensors ({tensors.format}); whole-model file: {len(pickled)} tensors "
          f"({pickled.format}), classes recorded, not imported: {sorted(set(pickled.modules.values()))[:3]} ...")
    assert tensors.keys() == pickled.keys() == list(model.state_dict())
    assert torch.equal(pickled["classifier.6.weight"], model.classifier[6].weight)
    assert any(v.endswith("AlexNet") for v in pickled.modules.values())

    # 3. Edit the classifier: delete the last layer, replace the middle one, add a new 10-class output.
    edited = torchvision.models.alexnet()
    layers = list(edited.classifier.children())
    del layers[6]                                   # delete Linear(4096, 1000)
    layers[4] = nn.Linear(4096, 1024)               # replace Linear(4096, 4096) with a narrower one
    layers += [nn.Linear(1024, 10)]                 # add a 10-class output
    edited.classifier = nn.Sequential(*layers)
    report = transfer(out / "alexnet_model.pth", edited)   # the whole-model pickle is a fine source too
    print(report.summary())

    assert all(report.entry(k).status == "loaded" for k in edited.state_dict() if k.startswith("features."))
    assert report.entry("classifier.1.weight").status == "loaded"
    assert torch.equal(edited.classifier[1].weight, model.classifier[1].weight)
    new = sorted(e.target for e in report.by_status("new"))
    assert new == ["classifier.4.bias", "classifier.4.weight", "classifier.6.bias", "classifier.6.weight"], new
    assert {u["source"] for u in report.unused_source} == {"classifier.4.weight", "classifier.4.bias",
                                                        "classifier.6.weight", "classifier.6.bias"}
    assert edited(torch.randn(1, 3, 64, 64)).shape == (1, 10)
    print(f"surgery: features + classifier.1 reloaded, {len(new)} tensors new, output (1, 10)")


if __name__ == "__main__":
    main()
