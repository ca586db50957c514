"""Image folders for fine-tuning: class folders, train/val splits, transforms from the model's own metadata."""

from __future__ import annotations

import logging
import math
import os
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from PIL import Image, UnidentifiedImageError

from torchgraft.errors import GraftError

__all__ = ["ImageList", "Preprocessing", "batches", "find_splits", "list_images", "preprocessing_for",
           "build_transforms", "IMAGE_SUFFIXES", "check_splits", "DecodedImages", "decode_images", "Crops",
           "crops_for", "augment", "normalise", "pass_size", "CPU_PIXELS_PER_PASS"]

log = logging.getLogger(__name__)
FEW_IMAGES = 5  # fewer training images than this in a class: a warning

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


#: On the CPU a forward or backward pass over many large images runs out of cache, and costs more per image
#: than the same images in smaller passes. Measured on this project's 2-core machine
#: (`benchmarks/bench_cpu_passes.py`), one training step of 32 images (BatchNorm held) as one pass and in this
#: rule's passes: MobileNetV2 at 224 px 3.8 s -> 0.7 s, EfficientNet-B0 3.9 -> 1.6 s, ResNet-18 1.7 -> 1.2 s;
#: at 128 px 0.62 -> 0.24, 0.78 -> 0.42 and 0.46 -> 0.45 s; at 64 px the rule keeps one pass. A pass on the CPU
#: holds at most this many pixels per channel (4 images at 224 px, 16 at 128, 32 at 64), within 20% of the
#: best of 16, 8 and 4 on every model and size measured; on CUDA a pass is the whole batch.
CPU_PIXELS_PER_PASS = 2 ** 18


def pass_size(device: torch.device, image_size: int, n: int) -> int:
    """Images per forward pass over `n` images of `image_size` px on `device` (see `CPU_PIXELS_PER_PASS`):
    all of them on CUDA; on the CPU the largest power of two within the pixel limit, at least 1, at most `n`."""
    if device.type != "cpu":
        return max(1, n)
    fits = max(1, CPU_PIXELS_PER_PASS // max(1, image_size * image_size))
    return max(1, min(n, 1 << (fits.bit_length() - 1)))


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


# ---- checks, the in-memory cache, augmentation on tensors ------------------------------------------------


def check_splits(splits: Splits, data: str | Path) -> None:
    """At least two classes, each with training images, and some validation images; a warning (logged) for
    classes with fewer than FEW_IMAGES training images."""
    classes = splits.classes
    if len(classes) < 2:
        raise GraftError(f"{data}: found {len(classes)} class ({', '.join(classes)}); expected at least two class "
                         "folders to tell apart (DIR/<class>/*); add a folder of images for another class.")
    counts = [0] * len(classes)
    for _, y in splits.train:
        counts[y] += 1
    empty = [c for c, n in zip(classes, counts) if n == 0]
    if empty:
        raise GraftError(f"{data}: classes {empty[:5]} have no training images; expected images in every class "
                         "folder; add some or remove the empty folders.")
    if not splits.val:
        raise GraftError(f"{data}: no validation images; add DIR/val/<class>/* or more images per class.")
    few = [f"{c} ({n})" for c, n in zip(classes, counts) if n < FEW_IMAGES]
    if few:
        log.warning("%d classes have fewer than %d training images: %s%s; their validation scores will be noisy",
                    len(few), FEW_IMAGES, ", ".join(few[:5]), f" and {len(few) - 5} more" if len(few) > 5 else "")


def _pixels(size: int):
    """PIL image -> uint8 (3, size, size): the evaluation resize of `build_transforms`, without normalising."""
    from torchvision.transforms import v2

    return v2.Compose([v2.Resize((size, size), antialias=True), v2.PILToTensor()])


class _Unreadable(GraftError):
    def __init__(self, path: str, why: str) -> None:
        super().__init__(f"{path}: cannot read the image ({why}); remove or replace the file.")
        self.path, self.why = path, why


def _read(path: str, to_pixels) -> tuple[torch.Tensor, int]:
    """(uint8 pixels, the file's shorter side); a GraftError for a file that does not decode."""
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise _Unreadable(path, str(exc)) from None
    return to_pixels(img), min(img.size)


class _Files(torch.utils.data.Dataset):
    """The images of a split decoded from their files, each as uint8 (3, S, S): for sets too big to hold."""

    def __init__(self, samples: Sequence[tuple[str, int]], size: int) -> None:
        self.samples, self.to_pixels = list(samples), _pixels(size)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> torch.Tensor:
        return _read(self.samples[index][0], self.to_pixels)[0]


@dataclass
class DecodedImages:
    """A split's images resized to `size`: in memory as one uint8 tensor when they fit (`pixels`), else decoded
    from the files for each batch. `native` is the median shorter side of the files, before resizing."""

    samples: list[tuple[str, int]]
    labels: torch.Tensor
    size: int
    native: int
    pixels: torch.Tensor | None

    def __len__(self) -> int:
        return len(self.samples)

    def batches(self, index_batches: list[torch.Tensor], workers: int = 0) -> Iterable[torch.Tensor]:
        """uint8 (n, 3, S, S) for each list of indices, in order."""
        if self.pixels is not None:
            return (self.pixels[index] for index in index_batches)
        loader = torch.utils.data.DataLoader(_Files(self.samples, self.size), batch_sampler=index_batches,
                                             num_workers=workers)
        return batches(loader)


def memory_budget(gigabytes: float) -> int:
    """Bytes the in-memory cache may take: `gigabytes`, and never more than a quarter of the machine's memory."""
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        physical = 16 << 30
    return int(min(gigabytes * (1 << 30), physical / 4))


def decode_images(samples: Sequence[tuple[str, int]], size: int, budget: int, root: str | Path = "") -> DecodedImages:
    """Decode every image once (the check that each file reads, before anything is written) and keep the
    resized pixels when `len * 3 * size * size` bytes fit in `budget`. One GraftError names the first bad file
    and how many there are."""
    samples = list(samples)
    keep = len(samples) * 3 * size * size <= budget
    to_pixels = _pixels(size)
    pixels = torch.empty(len(samples), 3, size, size, dtype=torch.uint8) if keep else None
    sides, bad = [], []
    for i, (path, _) in enumerate(samples):
        try:
            image, side = _read(path, to_pixels)
        except _Unreadable as exc:
            bad.append((exc.path, exc.why))
            continue
        sides.append(side)
        if pixels is not None:
            pixels[i] = image
    if bad:
        path, why = bad[0]
        raise GraftError(f"{root or Path(path).parent}: {len(bad)} of {len(samples)} images cannot be read, the "
                         f"first {path} ({why}); expected every file with an image suffix to decode; remove or "
                         "replace them. Nothing was written.")
    if not keep:
        log.info("%d images at %d px exceed the in-memory cache (%.1f GiB); decoding them every epoch",
                 len(samples), size, budget / (1 << 30))
    native = sorted(sides)[len(sides) // 2] if sides else size
    return DecodedImages(samples, torch.tensor([y for _, y in samples], dtype=torch.long), size, native, pixels)


def normalise(pixels: torch.Tensor, pre: Preprocessing) -> torch.Tensor:
    """uint8 or [0, 1] float (n, 3, H, W) -> the model's normalised float input."""
    x = pixels.float() / 255 if pixels.dtype == torch.uint8 else pixels
    mean = torch.tensor(pre.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(pre.std, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


@dataclass
class Crops:
    """Random crops (zoom in only) and flips: the kept area is in [min_area, 1], the aspect ratio within
    exp(+-max_log_ratio), mirrored with probability 1/2 when `hflip`."""

    min_area: float
    max_log_ratio: float
    hflip: bool

    def describe(self) -> str:
        flips = "flips" if self.hflip else "no flips"
        if self.min_area >= 0.999:
            return f"no crops, {flips}"
        return f"crops keeping {self.min_area:.0%}-100% of the area, {flips}"


def crops_for(native: int, hflip: bool) -> Crops:
    """Augmentation strength from the images' native size (their files' median shorter side): the smaller the
    image, the less of it a crop may drop, since every pixel of an 8 px digit is part of the stroke, while a
    224 px photo keeps its object in a 35% crop. min_area = 1 - 0.65 * min(1, native / 224); aspect jitter
    up to 4:3 scaled the same way."""
    strength = min(1.0, native / 224)
    return Crops(1 - 0.65 * strength, math.log(4 / 3) * strength, hflip)


def augment(pixels: torch.Tensor, crops: Crops, u: torch.Tensor) -> torch.Tensor:
    """Random resized crops and flips of a batch on tensors (one affine grid, one bilinear sample), in [0, 1].
    `u` holds five uniform numbers per image (area, ratio, x, y, flip): drawn by the caller, so that a global
    batch split over processes is augmented as one process would."""
    x = pixels.float() / 255 if pixels.dtype == torch.uint8 else pixels
    n = x.shape[0]
    area = crops.min_area + (1 - crops.min_area) * u[:, 0]
    log_ratio = crops.max_log_ratio * (2 * u[:, 1] - 1)
    w = (area * log_ratio.exp()).sqrt().clamp(max=1)
    h = (area / log_ratio.exp()).sqrt().clamp(max=1)
    tx, ty = (1 - w) * (2 * u[:, 2] - 1), (1 - h) * (2 * u[:, 3] - 1)
    flip = torch.where((u[:, 4] < 0.5) & crops.hflip, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w * flip, tx, h, ty
    grid = torch.nn.functional.affine_grid(theta.to(x.device), list(x.shape), align_corners=False)
    return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
