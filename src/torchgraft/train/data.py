"""Image folders for fine-tuning: class folders, train/val splits, transforms from the model's own metadata."""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from PIL import Image, UnidentifiedImageError

from torchgraft.errors import GraftError

__all__ = ["ImageList", "Preprocessing", "batches", "find_splits", "list_images", "preprocessing_for",
           "build_transforms", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def list_images(folder: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """Class names (sorted subfolder names) and (path, class index) for every image below them."""
    if not folder.is_dir():
        raise GraftError(f"{folder}: not a folder; expected a folder of class subfolders (DIR/<class>/*.jpg).")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise GraftError(f"{folder}: no class subfolders; expected DIR/<class>/*.jpg (or DIR/train and DIR/val).")
    samples = []
    for index, name in enumerate(classes):
        files = sorted(p for p in (folder / name).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        samples.extend((str(p), index) for p in files)
    if not samples:
        raise GraftError(f"{folder}: the class folders hold no images ({', '.join(IMAGE_SUFFIXES[:4])} ...).")
    return classes, samples


@dataclass
class Splits:
    """Class names, and (path, class index) for the training and the validation images."""

    classes: list[str]
    train: list[tuple[str, int]]
    val: list[tuple[str, int]]


def find_splits(data: str | Path, val_split: float | None, seed: int) -> Splits:
    """`DIR/train` + `DIR/val`, or one folder of classes split per class with `val_split`."""
    root = Path(data)
    if (root / "train").is_dir():
        classes, train = list_images(root / "train")
        if (root / "val").is_dir():
            val_classes, val = list_images(root / "val")
            if val_classes != classes:
                missing = sorted(set(classes) ^ set(val_classes))
                raise GraftError(f"{root}: train and val have different classes ({missing[:5]}); expected the "
                                 "same class folders in both.")
            return Splits(classes, train, val)
        root_classes, samples = classes, train
    else:
        root_classes, samples = list_images(root)
    fraction = 0.2 if val_split is None else val_split
    if not 0 < fraction < 1:
        raise GraftError(f"--val-split {fraction}: expected a fraction between 0 and 1, such as 0.2.")
    rng = random.Random(seed)
    train, val = [], []
    for index in range(len(root_classes)):
        items = [s for s in samples if s[1] == index]
        rng.shuffle(items)
        cut = max(1, round(len(items) * fraction)) if len(items) > 1 else 0
        val.extend(items[:cut])
        train.extend(items[cut:])
    return Splits(root_classes, sorted(train), sorted(val))


class ImageList(torch.utils.data.Dataset):
    """(path, label) pairs read with PIL and converted to RGB (grayscale, palette and RGBA included)."""

    def __init__(self, samples: Sequence[tuple[str, int]], transform=None) -> None:
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
        except (UnidentifiedImageError, OSError) as exc:
            raise GraftError(f"{path}: cannot read the image ({exc}); remove or replace the file.") from None
        return (self.transform(img) if self.transform else img), label


def batches(loader: Iterable):
    """Iterate a DataLoader. An unreadable image in a worker process comes back as its own one-line GraftError,
    not torch's wrapper ("Caught GraftError in DataLoader worker process 0. Original Traceback ...")."""
    try:
        yield from loader
    except GraftError as exc:
        text = str(exc)
        if "Original Traceback" not in text:
            raise
        last = text.strip().splitlines()[-1]
        raise GraftError(last.partition("GraftError: ")[2] or last) from None


@dataclass
class Preprocessing:
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    source: str  # where the numbers came from


def preprocessing_for(model: nn.Module, spec: str, image_size: int | None) -> Preprocessing:
    """Input size and normalisation from timm's pretrained_cfg or torchvision's weights metadata."""
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and cfg.get("mean"):
        size = image_size or int(cfg.get("input_size", (3, 224, 224))[-1])
        return Preprocessing(size, tuple(cfg["mean"]), tuple(cfg["std"]), "timm pretrained_cfg")
    if spec.startswith("torchvision:"):
        try:
            from torchvision.models import get_model_weights

            weights = next(iter(get_model_weights(spec.split(":", 1)[1])))
            t = weights.transforms()
            return Preprocessing(image_size or int(t.crop_size[0]), tuple(t.mean), tuple(t.std),
                                 f"torchvision {weights}")
        except (ValueError, StopIteration, AttributeError, TypeError):
            pass
    return Preprocessing(image_size or 224, IMAGENET_MEAN, IMAGENET_STD, "ImageNet defaults")


def build_transforms(pre: Preprocessing, train: bool, augment: bool, hflip: bool):
    """torchvision transforms v2: a light random crop (and flip) for training, a resize for evaluation."""
    from torchvision.transforms import v2

    size = pre.image_size
    steps = []
    if train and augment:
        steps.append(v2.RandomResizedCrop(size, scale=(0.7, 1.0), ratio=(0.85, 1.18), antialias=True))
        if hflip:
            steps.append(v2.RandomHorizontalFlip())
    else:
        steps.append(v2.Resize((size, size), antialias=True))
    steps += [v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(pre.mean, pre.std)]
    return v2.Compose(steps)
