"""Cats versus dogs in one command: `graft finetune` on an image folder, starting from ImageNet MobileNetV2.

Your data is one folder per class — `pets/train/cat/*.jpg`, `pets/train/dog/*.jpg` and `pets/val/...` (or just
`pets/cat/`, `pets/dog/` with `--val-split`). Offline there are no cat photos, so two classes of
scikit-learn's real handwritten digit scans stand in: the 0s become "cat" and the 1s "dog". The weights are
torchvision's real ImageNet MobileNetV2 file. Epochs, images and image size are tiny so this runs on a CPU in
seconds; drop `--epochs`, `--image-size` and `--workers` for a real run.

The equivalent shell commands:

    graft finetune --model torchvision:mobilenet_v2 --weights mobilenet_v2-b0353104.pth \\
        --data pets/ --out runs/pets
    graft predict --model torchvision:mobilenet_v2 --weights runs/pets/model.safetensors photo.jpg

    python examples/finetune_folder.py [--out DIR]
"""

from __future__ import annotations

import json
import shutil

from torchgraft.cli import main as graft
from torchgraft.cli.demo import find_mobilenet_v2
from torchgraft.train.digits import write_digits

from _common import out_dir


def main() -> None:
    out = out_dir(__doc__.splitlines()[0])
    data = out / "pets"
    if data.exists():
        shutil.rmtree(data)
    write_digits(data, size=48, train_per_class=24, val_per_class=8)
    for split in ("train", "val"):
        for digit in (split_dir := data / split).iterdir():
            if digit.name not in ("0", "1"):
                shutil.rmtree(digit)
        (split_dir / "0").rename(split_dir / "cat")
        (split_dir / "1").rename(split_dir / "dog")

    run = out / "run"
    if run.exists():
        shutil.rmtree(run)
    weights = find_mobilenet_v2()
    code = graft(["finetune", "--model", "torchvision:mobilenet_v2", "--weights", str(weights),
                  "--data", str(data), "--out", str(run),
                  "--epochs", "10", "--image-size", "48", "--batch-size", "16", "--workers", "0", "--no-hflip"])
    assert code == 0, code

    for name in ("model.safetensors", "classes.txt", "metrics.jsonl", "config.yaml", "last.ckpt"):
        assert (run / name).is_file(), name
    assert (run / "classes.txt").read_text().split() == ["cat", "dog"]
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert len(epochs) >= 2 and epochs[0]["phase"] == "probe"   # the probe, then a fine-tune from it
    best = max(e["val_acc"] for e in epochs if e["val_acc"] is not None)
    assert best > 0.5, epochs                                              # better than chance on 2 classes

    photo = next((data / "val" / "dog").iterdir())
    code = graft(["predict", "--model", "torchvision:mobilenet_v2", "--weights", str(run / "model.safetensors"),
                  "--json", str(photo)])
    assert code == 0, code
    print(f"finetune: cat-vs-dog run in {run} (model.safetensors, classes.txt, {len(epochs)} epochs, "
          f"best val acc {best:.2f})")


if __name__ == "__main__":
    main()
