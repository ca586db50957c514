"""Class names of a checkpoint's classifier, when they are known: torchvision's weights metadata, or a file."""

from __future__ import annotations

import functools
from pathlib import Path

__all__ = ["known_classes"]


@functools.lru_cache(maxsize=None)
def _torchvision_categories() -> dict[str, tuple[str, ...]]:
    """File name of every torchvision weights URL -> its categories."""
    try:
        from torchvision.models import get_model_weights, list_models
    except ImportError:
        return {}
    found: dict[str, tuple[str, ...]] = {}
    for name in list_models():
        try:
            weights = get_model_weights(name)
        except (ValueError, KeyError):
            continue
        for w in weights:
            categories = w.meta.get("categories")
            if categories:
                found[w.url.rsplit("/", 1)[-1]] = tuple(categories)
    return found


def known_classes(path: str | Path) -> list[str] | None:
    """Class names for a checkpoint: `classes.txt` beside it, or torchvision's metadata for its file name."""
    p = Path(path)
    beside = (p if p.is_dir() else p.parent) / "classes.txt"
    if beside.is_file():
        names = [line.strip() for line in beside.read_text().splitlines() if line.strip()]
        if names:
            return names
    categories = _torchvision_categories().get(p.name)
    return list(categories) if categories else None
