"""Class names of a checkpoint's classifier, when they are known: torchvision's weights metadata, or a file.

`read_class_names(path)` is the one reader of class-name files (one name per line): `classes.txt` beside a
checkpoint or a fine-tuned model, and the files given with `--source-classes`, `--target-classes`, `--classes`.
"""

from __future__ import annotations

from pathlib import Path

from torchgraft.errors import GraftError

__all__ = ["known_classes", "read_class_names"]


def read_class_names(path: str | Path) -> list[str]:
    """The class names in a text file, one per line, in order; blank lines and surrounding spaces are ignored.

    Raises `GraftError` when the file is missing, is not text, or names no class."""
    p = Path(path)
    if not p.is_file():
        raise GraftError(f"{path}: class list not found; expected a text file with one class name per line.")
    names = _names_in(p)
    if not names:
        raise GraftError(f"{path}: the class list is empty; expected one class name per line.")
    return names


def _names_in(p: Path) -> list[str]:
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise GraftError(f"{p}: the class list is not readable text ({type(exc).__name__}); expected a text file "
                         "with one class name per line.") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def known_classes(path: str | Path) -> list[str] | None:
    """Class names for a checkpoint: `classes.txt` beside it, or torchvision's metadata for its file name."""
    p = Path(path)
    beside = (p if p.is_dir() else p.parent) / "classes.txt"
    if beside.is_file():
        names = _names_in(beside)  # an empty classes.txt names nothing: torchvision's metadata may still
        if names:
            return names
    from torchgraft.specs import torchvision_files

    known = torchvision_files().get(p.name)
    return list(known[1]) if known and known[1] else None
