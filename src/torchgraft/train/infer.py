"""Using a fine-tuned model: evaluate it on a folder, predict classes for images."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import yaml

from torchgraft.classes import read_class_names
from torchgraft.errors import GraftError
from torchgraft.io.read import load
from torchgraft.specs import parse_kwargs
from torchgraft.train.data import ImageList, batches, build_transforms, list_images, pass_size, preprocessing_for
from torchgraft.train.metrics import classification_report, confusion_matrix

__all__ = ["evaluate", "predict", "load_finetuned", "images_to_score"]


def _classes(weights: Path, classes_file: str | None) -> list[str]:
    path = Path(classes_file) if classes_file else weights.parent / "classes.txt"
    if not path.is_file():  # this message knows where the names were looked for and how else to give them
        raise GraftError(f"{path}: no class names; expected classes.txt beside the weights (graft finetune writes "
                         "it) or --classes FILE with one name per line.")
    return read_class_names(path)


def _run_config(weights: Path) -> dict[str, Any]:
    """The config.yaml of the run the weights come from ({} when there is none)."""
    config = weights.parent / "config.yaml"
    if config.is_file():
        try:
            found = yaml.safe_load(config.read_text())
            return found if isinstance(found, dict) else {}
        except yaml.YAMLError:
            return {}
    return {}


def _run_image_size(weights: Path) -> int | None:
    return _run_config(weights).get("image_size")


def _trained_with(weights: Path) -> str:
    model = _run_config(weights).get("model")
    return f"; the run beside them used --model {model}" if model else ""


def load_finetuned(spec: str, model_kwargs: Any, weights: str, classes_file: str | None = None,
                   image_size: int | None = None):
    """(model in eval mode, class names, evaluation transform) for weights written by `graft finetune`."""
    from torchgraft.train.loop import build_classifier_model

    path = Path(weights)
    if not path.exists():
        raise GraftError(f"{weights}: no such file; expected the weights graft finetune wrote (RUN/model.safetensors).")
    classes = _classes(path, classes_file)
    model, _ = build_classifier_model(spec, parse_kwargs(model_kwargs), len(classes))
    state = load(path).state_dict()
    expected = model.state_dict()
    fits = sum(1 for k, v in state.items() if k in expected and tuple(v.shape) == tuple(expected[k].shape))
    if fits != len(expected) or len(state) != len(expected):
        raise GraftError(f"{weights}: these weights are for another model ({fits} of {len(expected)} tensors of "
                         f"{spec} with {len(classes)} classes match); expected weights graft finetune wrote for this "
                         f"--model{_trained_with(path)}.")
    model.load_state_dict(state, strict=True)
    model.eval()
    pre = preprocessing_for(model, spec, image_size or _run_image_size(path))
    return model, classes, build_transforms(pre, train=False, augment=False, hflip=False)


def _run_split(weights: Path) -> dict[str, Any] | None:
    """split.json of the run the weights come from: {"data", "train": [[path, class]], "val": [...]}, or None."""
    path = weights.parent / "split.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise GraftError(f"{path}: not valid JSON; expected the split.json graft finetune wrote. Pass --data with "
                         "held-out images instead.") from None


def images_to_score(weights: str | Path, data: str | None, classes: list[str]
                    ) -> tuple[list[tuple[str, int]], str]:
    """(path, class index) to evaluate on, and which images they are, in words.

    Without --data: the run's validation split (split.json beside the weights). With --data: its class folders
    (DIR/val when there is one), unless they hold images the run trained on; then the run's validation split
    instead, since scoring training images says nothing about new ones."""
    weights = Path(weights)
    split = _run_split(weights)
    where = weights.parent / "split.json"
    if data is None:
        if split is None:
            raise GraftError(f"{where}: no split.json beside the weights, so the run's validation images are "
                             "unknown; pass --data DIR with held-out images (class folders).")
        return _named(split["val"], classes, where), f"the run's validation split ({where})"
    root = Path(data)
    folder = root / "val" if (root / "val").is_dir() else root
    folder_classes, samples = list_images(folder)
    unknown = [c for c in folder_classes if c not in classes]
    if unknown:
        raise GraftError(f"{folder}: classes {unknown[:5]} are not among the model's {len(classes)} classes; "
                         "expected the class folders the model was trained on.")
    remap = {i: classes.index(c) for i, c in enumerate(folder_classes)}
    samples = [(p, remap[y]) for p, y in samples]
    if split is not None:
        trained = {str(Path(p).resolve()) for p, _ in split["train"]}
        seen = sum(1 for p, _ in samples if str(Path(p).resolve()) in trained)
        if seen:
            return (_named(split["val"], classes, where),
                    f"the run's validation split ({where}): {folder} holds {seen} of the images the run trained on")
    return samples, str(folder)


def _named(pairs: list[list[str]], classes: list[str], where: Path) -> list[tuple[str, int]]:
    unknown = sorted({c for _, c in pairs} - set(classes))
    if unknown:
        raise GraftError(f"{where}: classes {unknown[:5]} are not among the model's {len(classes)} classes; "
                         "expected the split.json of the run that wrote these weights.")
    return [(p, classes.index(c)) for p, c in pairs]


def _logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The model's logits for a batch of images on the CPU, in passes that fit its cache (`data.pass_size`)."""
    size = pass_size(torch.device("cpu"), images.shape[-1], len(images))
    return torch.cat([model(part) for part in images.split(size)])


@torch.no_grad()
def evaluate(spec: str, model_kwargs: Any, weights: str, data: str | None = None, *,
             classes_file: str | None = None, image_size: int | None = None, batch_size: int = 64) -> dict[str, Any]:
    """The evaluate JSON: accuracy, num_samples, per_class precision/recall/support, confusion, and `scored`
    (which images: a folder, or the run's validation split; see `images_to_score`)."""
    model, classes, transform = load_finetuned(spec, model_kwargs, weights, classes_file, image_size)
    samples, scored = images_to_score(weights, data, classes)
    loader = torch.utils.data.DataLoader(ImageList(samples, transform), batch_size=batch_size, num_workers=2)
    confusion = torch.zeros(len(classes), len(classes), dtype=torch.long)
    for images, labels in batches(loader):
        confusion += confusion_matrix(labels, _logits(model, images).argmax(1), len(classes))
    return {**classification_report(confusion, classes), "scored": scored}


@torch.no_grad()
def predict(spec: str, model_kwargs: Any, weights: str, images: list[str], *, classes_file: str | None = None,
            image_size: int | None = None, topk: int = 5, batch_size: int = 64) -> list[dict[str, Any]]:
    model, classes, transform = load_finetuned(spec, model_kwargs, weights, classes_file, image_size)
    for image in images:
        if not Path(image).is_file():
            raise GraftError(f"{image}: no such image file; expected paths to images.")
    dataset = ImageList([(p, 0) for p in images], transform)
    k = max(1, min(topk, len(classes)))
    out = []
    for start in range(0, len(dataset), batch_size):
        batch = torch.stack([dataset[i][0] for i in range(start, min(start + batch_size, len(dataset)))])
        probs = nn.functional.softmax(_logits(model, batch), dim=1)
        values, indices = probs.topk(k, dim=1)
        for row, (v, ix) in enumerate(zip(values, indices)):
            out.append({"image": images[start + row],
                        "top": [{"class": classes[i], "probability": round(float(p), 6)} for p, i in zip(v, ix)]})
    return out
