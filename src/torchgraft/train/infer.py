"""Using a fine-tuned model: evaluate it on a folder, predict classes for images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import yaml

from torchgraft.classes import read_class_names
from torchgraft.errors import GraftError
from torchgraft.io.read import load
from torchgraft.specs import parse_kwargs
from torchgraft.train.data import ImageList, batches, build_transforms, list_images, preprocessing_for
from torchgraft.train.metrics import classification_report, confusion_matrix

__all__ = ["evaluate", "predict", "load_finetuned"]


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


@torch.no_grad()
def evaluate(spec: str, model_kwargs: Any, weights: str, data: str, *, classes_file: str | None = None,
             image_size: int | None = None, batch_size: int = 64) -> dict[str, Any]:
    """The evaluate JSON: accuracy, num_samples, per_class precision/recall/support, confusion."""
    model, classes, transform = load_finetuned(spec, model_kwargs, weights, classes_file, image_size)
    root = Path(data)
    folder = root / "val" if (root / "val").is_dir() else root
    folder_classes, samples = list_images(folder)
    unknown = [c for c in folder_classes if c not in classes]
    if unknown:
        raise GraftError(f"{folder}: classes {unknown[:5]} are not among the model's {len(classes)} classes; "
                         "expected the class folders the model was trained on.")
    remap = {i: classes.index(c) for i, c in enumerate(folder_classes)}
    samples = [(p, remap[y]) for p, y in samples]
    loader = torch.utils.data.DataLoader(ImageList(samples, transform), batch_size=batch_size, num_workers=2)
    confusion = torch.zeros(len(classes), len(classes), dtype=torch.long)
    for images, labels in batches(loader):
        confusion += confusion_matrix(labels, model(images).argmax(1), len(classes))
    return classification_report(confusion, classes)


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
        probs = nn.functional.softmax(model(batch), dim=1)
        values, indices = probs.topk(k, dim=1)
        for row, (v, ix) in enumerate(zip(values, indices)):
            out.append({"image": images[start + row],
                        "top": [{"class": classes[i], "probability": round(float(p), 6)} for p, i in zip(v, ix)]})
    return out
