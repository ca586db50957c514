"""`load_state_dict(strict=False)` versus `transfer`, a whole-model pickle whose class is gone, freezing by
name, and when `detach()` is the right tool instead of freezing.

1. An old model (encoder -> mid -> out) is saved whole with `torch.save(model)`; then its class's module is
   deleted, as happens when code moves on. `torch.load` can no longer read the file; `tg.load` can, without
   importing anything, and records which classes the file names.
2. The new model drops `mid` and adds an `aux` head. `load_state_dict(strict=False)` "works": it loads what
   has the same name, returns the missing and unexpected keys, and nothing tells you unless you look.
   `transfer` does the same loading and its report names exactly what stayed new and what went unused.
3. `tg.freeze(model, "encoder.*")` freezes by name and returns what it froze.
4. `detach()` (or `torch.no_grad()`) is the right tool when a fixed feature extractor runs *before* the
   trainable part: no graph is kept through it. Freezing is the tool when frozen layers sit *between* trainable
   ones: gradients still flow through them to the layers before; `detach()` there would starve those layers.

    python examples/strict_false_vs_transfer.py [--out DIR]
"""

from __future__ import annotations

import importlib
import sys

import torch
import torch.nn as nn

import torchgraft as tg
from torchgraft.transfer import transfer

from _common import out_dir

OLD_MODULE = "old_project_models"
OLD_SOURCE = '''
import torch.nn as nn

class OldNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(3, 8)
        self.mid = nn.Linear(8, 8)
        self.out = nn.Linear(8, 1)
'''


class NewNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(3, 8)   # kept
        self.out = nn.Linear(8, 1)       # kept; `mid` removed
        self.aux = nn.Linear(8, 3)       # added

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.relu(self.encoder(x))
        return self.out(h), self.aux(h)


def save_whole_model_then_lose_its_class(folder) -> tuple[object, dict[str, torch.Tensor]]:
    (folder / f"{OLD_MODULE}.py").write_text(OLD_SOURCE)
    sys.path.insert(0, str(folder))
    try:
        old = importlib.import_module(OLD_MODULE).OldNet()
        torch.save(old, folder / "old_model.pth")
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop(OLD_MODULE, None)
    (folder / f"{OLD_MODULE}.py").unlink()
    return folder / "old_model.pth", {k: v.clone() for k, v in old.state_dict().items()}


def main() -> None:
    out = out_dir(__doc__.splitlines()[0])
    torch.manual_seed(0)

    # 1. A whole-model pickle whose class no longer exists.
    path, old_state = save_whole_model_then_lose_its_class(out)
    try:
        torch.load(path, weights_only=False)
        raise AssertionError("torch.load imported a class that no longer exists")
    except (ModuleNotFoundError, AttributeError) as exc:
        print(f"torch.load: {type(exc).__name__}: {exc}")
    src = tg.load(path)
    print(f"tg.load: {len(src)} tensors; classes named in the file: {sorted(set(src.modules.values()))}")
    assert src.keys() == list(old_state) and f"{OLD_MODULE}.OldNet" in src.modules.values()

    # 2. strict=False: loads by name, and the leftovers are only in a return value nobody has to read.
    quiet = NewNet()
    aux_before = quiet.aux.weight.clone()
    result = quiet.load_state_dict(src.state_dict(), strict=False)
    assert torch.equal(quiet.encoder.weight, old_state["encoder.weight"])
    assert torch.equal(quiet.aux.weight, aux_before)                  # still random; nothing said so
    assert sorted(result.missing_keys) == ["aux.bias", "aux.weight"]
    assert sorted(result.unexpected_keys) == ["mid.bias", "mid.weight"]
    print("strict=False: no error, no message; aux stays random, mid is dropped")

    # ... and a changed shape is not skipped at all: strict=False still raises.
    wider = NewNet()
    wider.out = nn.Linear(8, 2)
    try:
        wider.load_state_dict(src.state_dict(), strict=False)
        raise AssertionError("strict=False loaded a (1, 8) weight into a (2, 8) layer")
    except RuntimeError as exc:
        assert "size mismatch" in str(exc)

    # transfer: the same loading, with every decision in the report.
    model = NewNet()
    report = transfer(src, model)
    print(report.summary())
    assert report.entry("encoder.weight").status == "loaded" and report.entry("out.bias").method == "exact"
    assert sorted(e.target for e in report.by_status("new")) == ["aux.bias", "aux.weight"]
    assert sorted(u["source"] for u in report.unused_source) == ["mid.bias", "mid.weight"]
    assert torch.equal(model.out.weight, old_state["out.weight"])
    report = transfer(src, wider)                                     # a changed shape stays new, not an error
    assert report.entry("out.weight").status == "new"

    # 3. Freezing by name.
    frozen = tg.freeze(model, "encoder.*")
    assert frozen == ["encoder.weight", "encoder.bias"] and not model.encoder.weight.requires_grad
    print(f"froze by name: {frozen}")

    # 4a. A fixed feature extractor in front: detach its output; no gradient or graph reaches it.
    backbone, head = nn.Linear(3, 8), nn.Linear(8, 2)
    x = torch.randn(4, 3)
    features = torch.relu(backbone(x)).detach()
    head(features).sum().backward()
    assert backbone.weight.grad is None and head.weight.grad is not None
    assert backbone.weight.requires_grad        # nothing to undo when you later fine-tune it

    # 4b. A frozen layer between trainable ones: freezing keeps gradients flowing to the layers before it.
    first, middle, last = nn.Linear(3, 8), nn.Linear(8, 8), nn.Linear(8, 2)
    net = nn.Sequential(first, nn.ReLU(), middle, nn.ReLU(), last)
    tg.freeze(net, "2.*")
    net(x).sum().backward()
    assert middle.weight.grad is None and first.weight.grad is not None
    # ... whereas detaching after the middle layer would leave `first` without gradients:
    first.weight.grad = None
    last(torch.relu(middle(torch.relu(first(x)))).detach()).sum().backward()
    assert first.weight.grad is None
    print("detach: right for a fixed extractor in front; freeze: right for fixed layers in between")


if __name__ == "__main__":
    main()
