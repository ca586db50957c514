"""Model specs: one string that names how to build a model, plus keyword arguments for its factory.

    torchvision:resnet50                  torchvision.models.get_model("resnet50", weights=None, **kwargs)
    timm:convnext_tiny                    timm.create_model("convnext_tiny", pretrained=False, **kwargs)
    transformers:BertForSequenceClassification
                                          the class built from a config: kwargs {"config": "path/or/folder"} or
                                          {"model_type": "bert", ...}; other kwargs override config fields
    package.module:factory                import the module, call factory(**kwargs)
    path/to/file.py:factory               load the file as a module, call factory(**kwargs)

Specs never download weights: pretrained weights come from a checkpoint that torchgraft reads itself.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import torch.nn as nn

from torchgraft.errors import SpecError
from torchgraft.io.read import HF_WEIGHT_FILES, folder_config

__all__ = ["build_model", "is_model_spec", "parse_kwargs", "source_spec", "torchvision_files"]

_KNOWN = ("torchvision", "timm", "transformers")
_DOTTED = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")


def is_model_spec(text: str) -> bool:
    """True when `text` reads as a model spec rather than a checkpoint path (an existing path always wins)."""
    if Path(text).exists() or ":" not in text:
        return False
    where, _, name = text.rpartition(":")
    if where in _KNOWN:
        return True
    if not _DOTTED.match(name.split(".")[0] or "-"):
        return False
    return where.endswith(".py") or bool(_DOTTED.match(where))


def parse_kwargs(text: str | dict[str, Any] | None) -> dict[str, Any]:
    """`--model-kwargs` as given on the command line: a JSON object."""
    if text is None or text == "":
        return {}
    if isinstance(text, dict):
        return dict(text)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SpecError(f"--model-kwargs {text!r} is not valid JSON ({exc.msg}); expected an object such as "
                        "'{\"num_classes\": 10}'.") from None
    if not isinstance(value, dict):
        raise SpecError(f"--model-kwargs {text!r} is a {type(value).__name__}; expected a JSON object such as "
                        "'{\"num_classes\": 10}'.")
    return value


def build_model(spec: str, kwargs: dict[str, Any] | str | None = None) -> nn.Module:
    """Build the model a spec names, with randomly initialised weights."""
    kwargs = parse_kwargs(kwargs)
    if ":" not in spec:
        raise SpecError(
            f"model spec {spec!r} has no ':'; expected torchvision:NAME, timm:NAME, transformers:CLASS, "
            "package.module:factory or path/to/file.py:factory."
        )
    where, _, name = spec.rpartition(":")
    try:
        if where == "torchvision":
            model = _torchvision(name, kwargs)
        elif where == "timm":
            model = _timm(name, kwargs)
        elif where == "transformers":
            model = _transformers(name, kwargs)
        else:
            model = _call(_resolve(where, name, spec), spec, kwargs)
    except SpecError:
        raise
    except TypeError as exc:
        raise SpecError(f"model spec {spec!r} rejected --model-kwargs {json.dumps(kwargs)}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise SpecError(f"model spec {spec!r} returned a {type(model).__name__}; expected a torch.nn.Module.")
    return model


_HUB_NAME = re.compile(r"[\w.]+-[0-9a-f]{8,64}\.pth")


@functools.lru_cache(maxsize=None)
def torchvision_files() -> dict[str, tuple[str, tuple[str, ...]]]:
    """File name of every torchvision weights URL (`mobilenet_v2-b0353104.pth`) -> (model name, categories)."""
    try:
        from torchvision.models import get_model_weights, list_models
    except ImportError:
        return {}
    found: dict[str, tuple[str, tuple[str, ...]]] = {}
    for name in list_models():
        try:
            weights = get_model_weights(name)
        except (ValueError, KeyError):
            continue
        for w in weights:
            found.setdefault(w.url.rsplit("/", 1)[-1], (name, tuple(w.meta.get("categories") or ())))
    return found


def source_spec(path: str | os.PathLike[str], metadata: dict[str, Any] | None = None) -> tuple[str, dict, str] | None:
    """The model a checkpoint says it was saved from, as `(spec, kwargs, how it was found)`, or None.

    - a Hugging Face folder whose `config.json` names its class (`"architectures": ["BertModel"]`):
      `transformers:BertModel` built from that config (also for its weights file named on its own,
      `folder/model.safetensors`);
    - a timm folder whose `config.json` names an `"architecture"` (timm's `push_to_hub` layout), with its
      `num_classes`;
    - a file named as torchvision publishes its weights (`mobilenet_v2-b0353104.pth`): that torchvision model.
    """
    p = Path(path)
    config = (metadata or {}).get("config")
    if config is None and p.name in HF_WEIGHT_FILES:  # the weights file of a folder, named instead of the folder
        config, _ = folder_config(p.parent)
    if isinstance(config, dict):
        folder = p if p.is_dir() else p.parent
        architectures = config.get("architectures")
        if isinstance(architectures, list) and architectures and isinstance(architectures[0], str):
            return (f"transformers:{architectures[0]}", {"config": str(folder)},
                    f"{folder / 'config.json'} names {architectures[0]}")
        if isinstance(config.get("architecture"), str):
            kwargs = {"num_classes": config["num_classes"]} if isinstance(config.get("num_classes"), int) else {}
            return (f"timm:{config['architecture']}", kwargs,
                    f"{folder / 'config.json'} names timm's {config['architecture']}")
    # torchvision publishes `name-<hash>.pth` files; only such a name is worth importing its model table for
    known = torchvision_files().get(p.name) if _HUB_NAME.fullmatch(p.name) else None
    if known is not None:
        return (f"torchvision:{known[0]}", {"num_classes": len(known[1])} if known[1] else {},
                f"torchvision publishes {p.name} for {known[0]}")
    return None


def _require(package: str, extra: str, spec_kind: str) -> Any:
    try:
        return importlib.import_module(package)
    except ImportError:
        raise SpecError(
            f"{spec_kind} specs need the `{package}` package, which is not installed; "
            f"run `pip install 'torchgraft[{extra}]'`."
        ) from None


def _torchvision(name: str, kwargs: dict[str, Any]) -> nn.Module:
    tv = _require("torchvision", "vision", "torchvision:")
    available = tv.models.list_models()
    if name not in available:
        raise SpecError(f"torchvision has no model {name!r}; expected one of torchvision.models.list_models() "
                        f"such as {_closest(name, available)}.")
    if kwargs.get("weights") not in (None, "None"):
        raise SpecError("torchvision specs build models without weights (no download); drop \"weights\" from "
                        "--model-kwargs and pass the weights file as the source instead.")
    kwargs = {k: v for k, v in kwargs.items() if k != "weights"}
    return tv.models.get_model(name, weights=None, **kwargs)


def _timm(name: str, kwargs: dict[str, Any]) -> nn.Module:
    timm = _require("timm", "vision", "timm:")
    base = name.split(".")[0]
    if not timm.is_model(base):
        raise SpecError(f"timm has no model {name!r}; expected a name from timm.list_models() such as "
                        f"{_closest(base, timm.list_models())}.")
    if kwargs.pop("pretrained", False):
        raise SpecError("timm specs build models without weights (no download); drop \"pretrained\" from "
                        "--model-kwargs and pass the weights file as the source instead.")
    return timm.create_model(name, pretrained=False, **kwargs)


def _transformers(name: str, kwargs: dict[str, Any]) -> nn.Module:
    transformers = _require("transformers", "hf", "transformers:")
    cls = getattr(transformers, name, None)
    if not isinstance(cls, type):
        raise SpecError(f"transformers has no class {name!r}; expected a model class such as "
                        "BertForSequenceClassification.")
    kwargs = dict(kwargs)
    config_path = kwargs.pop("config", None)
    model_type = kwargs.pop("model_type", None)
    if config_path is not None:
        path = Path(config_path)
        if not path.exists():
            raise SpecError(f"config {config_path!r} does not exist; expected a config.json or a model folder.")
        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True, **kwargs)
    elif model_type is not None:
        config = transformers.AutoConfig.for_model(model_type, **kwargs)
    else:
        raise SpecError(
            f"transformers:{name} needs a config; pass --model-kwargs '{{\"config\": \"path/to/model-folder\"}}' "
            "or '{\"model_type\": \"bert\"}' (other keys override config fields)."
        )
    return cls(config)


def _resolve(where: str, name: str, spec: str) -> Any:
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise SpecError(f"model spec {spec!r}: file {where} does not exist; expected path/to/file.py:factory.")
        module_name = f"torchgraft_user_{abs(hash(str(path.resolve())))}"
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        if module_spec is None or module_spec.loader is None:
            raise SpecError(f"model spec {spec!r}: Python has no loader for {where}; expected a Python source file "
                            "(path/to/file.py:factory). Nothing was imported.")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as exc:
            raise SpecError(f"model spec {spec!r}: cannot import {where} ({exc}); expected an importable module "
                            "(is it installed or on PYTHONPATH?).") from None
    obj: Any = module
    for part in name.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(module) if not n.startswith("_")]
            raise SpecError(f"model spec {spec!r}: {where} has no {name!r}; found {_closest(name, names)}.")
        obj = getattr(obj, part)
    return obj


def _call(obj: Any, spec: str, kwargs: dict[str, Any]) -> Any:
    if isinstance(obj, nn.Module):
        if kwargs:
            raise SpecError(f"model spec {spec!r} names a module instance; it takes no --model-kwargs.")
        return obj
    if not callable(obj):
        raise SpecError(f"model spec {spec!r} names a {type(obj).__name__}; expected a class or factory function.")
    return obj(**kwargs)


def _closest(name: str, candidates: list[str]) -> str:
    import difflib

    found = difflib.get_close_matches(name, candidates, n=3, cutoff=0.5)
    return ", ".join(found) if found else ", ".join(sorted(candidates)[:3])
