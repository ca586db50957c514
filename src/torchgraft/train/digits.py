"""scikit-learn's handwritten digit scans written as an image folder: real data for demos, tests, benchmarks."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
from PIL import Image

from torchgraft.errors import GraftError

__all__ = ["write_digits"]


def write_digits(folder: str | Path, *, size: int = 64, val_fraction: float = 0.2, seed: int = 0,
                 train_per_class: int | None = None, val_per_class: int | None = None) -> Path:
    """Write DIR/train/<digit>/*.png and DIR/val/<digit>/*.png from the 1,797 8x8 scans, upscaled to `size`.

    The split is stratified and seeded; `train_per_class` keeps only that many training images per digit
    (few-shot), the validation set unchanged; `val_per_class` likewise trims validation (for quick tests).
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise GraftError("the digits data needs scikit-learn; run `pip install scikit-learn`.") from None
    digits = load_digits()
    root = Path(folder)
    rng = random.Random(seed)
    for label in range(10):
        index = [i for i, y in enumerate(digits.target) if y == label]
        rng.shuffle(index)
        cut = round(len(index) * val_fraction)
        parts = {"val": index[:cut], "train": index[cut:]}
        if train_per_class is not None:
            parts["train"] = parts["train"][:train_per_class]
        if val_per_class is not None:
            parts["val"] = parts["val"][:val_per_class]
        for split, items in parts.items():
            target = root / split / str(label)
            target.mkdir(parents=True, exist_ok=True)
            for i in items:
                pixels = (digits.images[i] * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
                Image.fromarray(pixels, mode="L").resize((size, size), Image.BILINEAR).save(target / f"{i:04d}.png")
    return root
