"""The fine-tuning recipe, top to bottom: setup -> train (epoch by epoch, checkpointed) -> save -> clean up.

    finetune(config, reporter) -> RunResult

1. setup: processes (torchrun / DDP), seeds, data, the model with a classifier for the data's classes, the
   pretrained weights through the transfer engine, the freezing schedule, the optimizer;
2. train: each epoch unfreezes what is due, trains, validates, appends metrics.jsonl, writes last.ckpt
   (atomically) and model.safetensors when validation improved; a linear probe trains on cached features;
3. save: curves.png, confusion.png, classes.txt; the best model is already on disk.

`--resume RUN_DIR` rebuilds the run from config.yaml and last.ckpt and continues after the last finished epoch.
Progress goes to a `Reporter` (the CLI draws bars and tables with it); the library itself prints nothing.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn as nn
import yaml

from torchgraft.errors import GraftError
from torchgraft.freeze import UnfreezeSchedule, freeze, param_groups
from torchgraft.io.read import load
from torchgraft.io.write import atomic_write, save_safetensors
from torchgraft.specs import build_model
from torchgraft.train.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from torchgraft.train.config import FinetuneConfig
from torchgraft.train.data import ImageList, build_transforms, find_splits, preprocessing_for
from torchgraft.train.metrics import confusion_matrix, plot_confusion, plot_curves
from torchgraft.transfer import Report, transfer

__all__ = ["finetune", "Reporter", "RunResult", "build_classifier_model", "find_head"]

log = logging.getLogger(__name__)

FEW_SHOT = 20  # fewer training images than this in some class: a linear probe by default

FILES = ("model.safetensors", "last.ckpt", "metrics.jsonl", "config.yaml", "classes.txt", "curves.png",
         "confusion.png")


class Reporter(Protocol):
    """What the loop tells whoever watches (the CLI's rich bars and tables); all methods are optional."""

    def transfer(self, report: Report) -> None: ...
    def epoch_start(self, epoch: int, epochs: int, steps: int, phase: str) -> None: ...
    def step(self, loss: float, acc: float) -> None: ...
    def epoch_end(self, row: dict[str, Any]) -> None: ...


class _Silent:
    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


@dataclass
class RunResult:
    out: Path
    best_val_acc: float
    best_epoch: int
    rows: list[dict[str, Any]] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)
    transfer_report: Report | None = None


# ---- model -----------------------------------------------------------------------------------------------


def find_head(model: nn.Module, num_classes: int) -> str:
    """The classifier's module name: timm's `get_classifier()`, else the last Linear with `num_classes` outputs."""
    getter = getattr(model, "get_classifier", None)
    if callable(getter):
        head = getter()
        for name, module in model.named_modules():
            if module is head and name:
                return name
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module.out_features == num_classes:
            last = name
    if last is None:
        raise GraftError(f"no classifier with {num_classes} outputs found in the model; expected a final "
                         "nn.Linear (pass a factory whose classifier takes num_classes).")
    return last


def build_classifier_model(spec: str, kwargs: dict[str, Any], num_classes: int) -> tuple[nn.Module, str]:
    """The model with a classifier for `num_classes`: via `num_classes=` for torchvision/timm, else by replacing
    the last Linear layer. Returns the model and the classifier's module name."""
    kwargs = dict(kwargs)
    if spec.split(":", 1)[0] in ("torchvision", "timm"):
        kwargs["num_classes"] = num_classes
        model = build_model(spec, kwargs)
        return model, find_head(model, num_classes)
    model = build_model(spec, kwargs)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise GraftError(f"{spec}: the model has no nn.Linear classifier to resize to {num_classes} classes.")
    name, last = linears[-1]
    if last.out_features != num_classes:
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        setattr(parent, name.rpartition(".")[2], nn.Linear(last.in_features, num_classes, bias=last.bias is not None))
    return model, name


# ---- processes -------------------------------------------------------------------------------------------


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def _setup_processes(config: FinetuneConfig) -> _Dist:
    cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    if config.device == "cuda" and not torch.cuda.is_available():
        raise GraftError("--device cuda: no CUDA device is available; use --device cpu or auto.")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return _Dist(0, 1, torch.device("cuda" if cuda else "cpu"))
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(local)
    return _Dist(dist.get_rank(), world, torch.device(f"cuda:{local}" if cuda else "cpu"))


def _all_reduce(values: list[float], dist_info: _Dist) -> list[float]:
    if dist_info.world == 1:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=dist_info.device)
    dist.all_reduce(t)
    return t.tolist()


# ---- learning rate ---------------------------------------------------------------------------------------


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warmup over `warmup` steps, then cosine decay to zero at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class _Phases:
    """Each unfreezing step starts a phase with its own warmup and cosine decay (fastai's fine_tune does too)."""

    starts: list[int]
    epochs: int
    steps_per_epoch: int
    warmup: float

    def factor(self, epoch: int, step: int) -> float:
        start = max(s for s in self.starts if s <= epoch)
        end = min([s for s in self.starts if s > epoch] + [self.epochs])
        total = (end - start) * self.steps_per_epoch
        return _lr_factor((epoch - start) * self.steps_per_epoch + step, total, int(self.warmup * total))


def _set_lr(optimizer: torch.optim.Optimizer, factor: float) -> float:
    """Cosine schedule over every group, including groups added by unfreezing (each keeps its initial lr)."""
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
        group["lr"] = group["initial_lr"] * factor
    return optimizer.param_groups[0]["lr"]


# ---- the recipe ------------------------------------------------------------------------------------------


def finetune(config: FinetuneConfig, reporter: Any = None, *, resume: bool = False) -> RunResult:
    """Fine-tune `config.model` from `config.weights` on `config.data`; files go to `config.out`."""
    out = Path(config.out)
    dist_info = _setup_processes(config)
    reporter = reporter if (reporter is not None and dist_info.main) else _Silent()
    torch.manual_seed(config.seed + dist_info.rank)
    if resume:
        if dist_info.main:  # temp files of writes a killed run left half done: never read, removed
            for stale in out.glob(".*.tmp"):
                stale.unlink(missing_ok=True)
        if not (out / "last.ckpt").is_file():  # killed during the first epoch: nothing to lose, start it again
            log.info("%s: no last.ckpt yet (the run stopped in its first epoch); starting it from epoch 0", out)
            resume = False

    # -- data
    splits = find_splits(config.data, config.val_split, config.seed)
    classes = splits.classes
    if config.linear_probe is None:
        fewest = min(sum(1 for _, y in splits.train if y == i) for i in range(len(classes)))
        config.linear_probe = fewest < FEW_SHOT
        log.info("linear probe: %s (the smallest class has %d training images)", config.linear_probe, fewest)
    if not splits.val:
        raise GraftError(f"{config.data}: no validation images; add DIR/val/<class>/* or more images per class.")

    # -- model: the classifier sized for the data; weights through the transfer engine
    torch.manual_seed(config.seed)  # the new classifier's initialisation is the same in every process
    model, head = build_classifier_model(config.model, config.model_kwargs, len(classes))
    pre = preprocessing_for(model, config.model, config.image_size)
    report = None
    if not resume:
        report = transfer(load(config.weights, key=config.key), model, target_classes=classes)
        reporter.transfer(report)

    # -- freezing: head first, then the backbone (or the user's steps)
    steps = _unfreeze_steps(config, head)
    schedule = UnfreezeSchedule(steps)
    schedule.start(model, train_bn=config.train_bn and not config.linear_probe)
    if config.freeze:
        freeze(model, *config.freeze)
    group_kwargs = {"weight_decay": config.weight_decay, "lr_mult": config.lr_mult or None,
                    "layer_decay": config.layer_decay}
    optimizer = torch.optim.AdamW(param_groups(model, lr=config.lr, **group_kwargs), lr=config.lr,
                                  weight_decay=config.weight_decay)

    start_epoch, best_acc, best_epoch, rows = 0, -1.0, -1, []
    if resume:
        state = load_checkpoint(out / "last.ckpt")
        model.load_state_dict(state["model"])
        schedule.load_state_dict(state["schedule"])
        optimizer = schedule.restore(model, lambda m: torch.optim.AdamW(
            param_groups(m, lr=config.lr, **group_kwargs), lr=config.lr, weight_decay=config.weight_decay))
        if config.freeze:
            freeze(model, *config.freeze)
        optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        start_epoch, best_acc, best_epoch = state["epoch"] + 1, state["best_acc"], state["best_epoch"]
        rows = _read_rows(out / "metrics.jsonl", upto=state["epoch"])
    elif dist_info.main:
        out.mkdir(parents=True, exist_ok=True)
        _write_text(out / "classes.txt", "\n".join(classes) + "\n")
        _write_text(out / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))
        _write_text(out / "metrics.jsonl", "")

    model.to(dist_info.device)
    cuda = dist_info.device.type == "cuda"
    if cuda:
        model.to(memory_format=torch.channels_last)
    train_model: nn.Module = model

    # -- loaders
    augment = config.augment and not config.linear_probe
    train_set = ImageList(splits.train, build_transforms(pre, train=True, augment=augment, hflip=config.hflip))
    val_set = ImageList(splits.val, build_transforms(pre, train=False, augment=False, hflip=False))
    train_loader = _loader(train_set, config, dist_info, shuffle=True)
    val_loader = _loader(val_set, config, dist_info, shuffle=False)
    use_cache = config.linear_probe and config.feature_cache and dist_info.world == 1
    cache = _FeatureCache(model, head) if use_cache else None

    phases = _Phases(sorted({0} | {e for e, _ in steps if e < config.epochs}), config.epochs, len(train_loader),
                     config.warmup)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    amp = _autocast(dist_info.device)
    scaler = torch.amp.GradScaler("cuda") if cuda and amp.fast_dtype == torch.float16 else None

    # -- train
    for epoch in range(start_epoch, config.epochs):
        added = schedule.step(epoch, model, optimizer, lr=config.lr * config.backbone_lr_mult, **group_kwargs)
        if config.freeze and added:
            freeze(model, *config.freeze)
        if dist_info.world > 1 and (added or train_model is model):
            # DDP synchronises the parameters that train when it is built: build it again when more unfreeze.
            train_model = nn.parallel.DistributedDataParallel(model, device_ids=[dist_info.device.index] if cuda
                                                              else None)
        phase = _phase_name(steps, epoch)
        if isinstance(train_loader.sampler, torch.utils.data.DistributedSampler):
            train_loader.sampler.set_epoch(epoch)
        else:  # the order (and augmentation seeds) depend on the epoch alone, so a resumed run repeats them
            train_loader.generator.manual_seed(config.seed + epoch)
        started = time.perf_counter()
        reporter.epoch_start(epoch, config.epochs, len(train_loader), phase)
        train_model.train()
        if cache is not None:
            train_loss, train_acc, lr = cache.train_epoch(train_loader, optimizer, loss_fn, epoch, phases,
                                                          reporter, dist_info.device)
        else:
            train_loss, train_acc, lr = _train_epoch(train_model, train_loader, optimizer, loss_fn, epoch, phases,
                                                     reporter, dist_info, amp, scaler)
        val_loss, confusion = _validate(model, val_loader, loss_fn, len(classes), dist_info, amp,
                                        cache)
        val_acc = int(confusion.diag().sum()) / max(1, int(confusion.sum()))
        row = {"epoch": epoch, "phase": phase, "train_loss": train_loss, "train_acc": train_acc,
               "val_loss": val_loss, "val_acc": val_acc, "lr": lr, "seconds": round(time.perf_counter() - started, 3)}
        rows.append(row)
        improved = val_acc > best_acc
        if improved:
            best_acc, best_epoch = val_acc, epoch
        if dist_info.main:
            if improved:
                save_safetensors(model.state_dict(), out / "model.safetensors",
                                 metadata={"torchgraft.model": config.model, "epoch": str(epoch)})
                _write_text(out / ".best_confusion.json", json.dumps(confusion.tolist()))
            _append_row(out / "metrics.jsonl", row)
            save_checkpoint({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                             "schedule": schedule.state_dict(), "epoch": epoch, "best_acc": best_acc,
                             "best_epoch": best_epoch, "rng": rng_state(), "config": config.to_dict(),
                             "param_groups": [g.get("name", "") for g in optimizer.param_groups]},
                            out / "last.ckpt")
        reporter.epoch_end(row)

    # -- save what the run leaves behind
    if dist_info.main:
        plot_curves(rows, out / "curves.png")
        best_confusion = torch.tensor(json.loads((out / ".best_confusion.json").read_text()))
        plot_confusion(best_confusion, classes, out / "confusion.png")
    if dist_info.world > 1:
        import torch.distributed as dist

        dist.barrier()
    return RunResult(out, best_acc, best_epoch, rows, classes, report)


def _unfreeze_steps(config: FinetuneConfig, head: str) -> list[tuple[int, list[str]]]:
    head_patterns = [head, f"{head}.*", *config.unfreeze]
    if config.linear_probe:
        return [(0, head_patterns)]
    if config.unfreeze_at:
        steps: dict[int, list[str]] = {0: list(head_patterns)}
        for epoch, pattern in config.unfreeze_steps():
            steps.setdefault(epoch, []).append(pattern)
        return sorted(steps.items())
    if config.head_epochs == 0:
        return [(0, ["*"])]
    return [(0, head_patterns), (config.head_epochs, ["*"])]


def _phase_name(steps: list[tuple[int, list[str]]], epoch: int) -> str:
    """"head" until the first unfreezing step, "all" once everything trains, else the patterns that thawed last."""
    active = [patterns for at, patterns in steps if at <= epoch]
    if len(active) == 1:
        return "head"
    return "all" if "*" in active[-1] else "+" + ",".join(active[-1])


def _loader(dataset, config: FinetuneConfig, dist_info: _Dist, shuffle: bool) -> torch.utils.data.DataLoader:
    sampler = None
    if dist_info.world > 1 and shuffle:
        sampler = torch.utils.data.DistributedSampler(dataset, dist_info.world, dist_info.rank, shuffle=True,
                                                      seed=config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    workers = config.workers if config.workers is not None else (2 if dist_info.device.type == "cuda" else 0)
    return torch.utils.data.DataLoader(
        dataset, batch_size=config.batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
        num_workers=workers, persistent_workers=workers > 0, generator=generator,
        pin_memory=dist_info.device.type == "cuda", drop_last=False)


class _NoCast:
    fast_dtype = None

    def __call__(self):
        return torch.autocast("cpu", enabled=False)


class _CudaCast:
    def __init__(self) -> None:
        self.fast_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    def __call__(self):
        return torch.autocast("cuda", dtype=self.fast_dtype)


def _autocast(device: torch.device):
    """Mixed precision on CUDA (bfloat16 where supported, else float16 with a grad scaler); none on the CPU."""
    return _CudaCast() if device.type == "cuda" else _NoCast()


def _to(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    batch = batch.to(device, non_blocking=True)
    return batch.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else batch


def _train_epoch(model, loader, optimizer, loss_fn, epoch, phases, reporter, dist_info, amp, scaler):
    loss_sum = correct = seen = 0.0
    lr = optimizer.param_groups[0]["lr"]
    for i, (images, labels) in enumerate(loader):
        lr = _set_lr(optimizer, phases.factor(epoch, i))
        images, labels = _to(images, dist_info.device), labels.to(dist_info.device)
        with amp():
            logits = model(images)
            loss = loss_fn(logits.float(), labels)
        if not torch.isfinite(loss):
            raise GraftError(f"the training loss became {loss.item()} at epoch {epoch} step {i}; stopping. The last "
                             "good checkpoint is kept; lower --lr and resume or start again.")
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        n = labels.shape[0]
        loss_sum += loss.item() * n
        correct += (logits.argmax(1) == labels).sum().item()
        seen += n
        reporter.step(loss_sum / seen, correct / seen)
    loss_sum, correct, seen = _all_reduce([loss_sum, correct, seen], dist_info)
    return loss_sum / max(seen, 1), correct / max(seen, 1), lr


@torch.no_grad()
def _validate(model, loader, loss_fn, num_classes, dist_info, amp, cache=None):
    """Every process validates the whole set on its own copy (the same numbers everywhere, no collectives)."""
    was_training = model.training
    model.eval()
    loss_sum, seen = 0.0, 0
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    batches = cache.val_batches(loader) if cache is not None else loader
    for inputs, labels in batches:
        labels = labels.to(dist_info.device)
        with amp():
            if cache is not None:
                logits = cache.head(inputs.to(dist_info.device))
            else:
                logits = model(_to(inputs, dist_info.device))
        loss_sum += loss_fn(logits.float(), labels).item() * labels.shape[0]
        seen += labels.shape[0]
        confusion += confusion_matrix(labels.cpu(), logits.argmax(1).cpu(), num_classes)
    model.train(was_training)
    return loss_sum / max(seen, 1), confusion


class _FeatureCache:
    """For a linear probe: the classifier's inputs, computed once by the frozen backbone, reused every epoch."""

    def __init__(self, model: nn.Module, head: str) -> None:
        self.model = model
        self.head = model.get_submodule(head)
        self.train: tuple[torch.Tensor, torch.Tensor] | None = None
        self.val: tuple[torch.Tensor, torch.Tensor] | None = None

    @torch.no_grad()
    def _features(self, loader, device) -> tuple[torch.Tensor, torch.Tensor]:
        captured: list[torch.Tensor] = []
        handle = self.head.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach().cpu()))
        labels = []
        was_training = self.model.training
        self.model.eval()  # the frozen backbone as it will be used: BatchNorm statistics fixed, no dropout
        try:
            for images, y in loader:
                self.model(_to(images, device))
                labels.append(y)
        finally:
            handle.remove()
            self.model.train(was_training)
        return torch.cat(captured), torch.cat(labels)

    def train_epoch(self, loader, optimizer, loss_fn, epoch, phases, reporter, device):
        if self.train is None:
            self.train = self._features(loader, device)
        features, labels = self.train
        generator = torch.Generator().manual_seed(epoch)
        order = torch.randperm(len(labels), generator=generator)
        batch = loader.batch_size
        steps = len(loader)
        loss_sum = correct = seen = 0.0
        lr = optimizer.param_groups[0]["lr"]
        self.head.train()
        for i in range(steps):
            index = order[i * batch:(i + 1) * batch]
            x, y = features[index].to(device), labels[index].to(device)
            lr = _set_lr(optimizer, phases.factor(epoch, i))
            logits = self.head(x)
            loss = loss_fn(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(y)
            reporter.step(loss_sum / seen, correct / seen)
        return loss_sum / max(seen, 1), correct / max(seen, 1), lr

    def val_batches(self, loader):
        if self.val is None:
            self.val = self._features(loader, next(self.head.parameters()).device)
        features, labels = self.val
        batch = loader.batch_size
        for i in range(0, len(labels), batch):
            yield features[i:i + batch], labels[i:i + batch]


# ---- files -----------------------------------------------------------------------------------------------


def _write_text(path: Path, text: str) -> None:
    with atomic_write(path, "w") as f:
        f.write(text)


def _append_row(path: Path, row: dict[str, Any]) -> None:
    existing = path.read_text() if path.exists() else ""
    _write_text(path, existing + json.dumps(row) + "\n")


def _read_rows(path: Path, upto: int) -> list[dict[str, Any]]:
    """Metrics of the finished epochs; rows an interrupted epoch may have left are dropped (and rewritten)."""
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                if row["epoch"] <= upto:
                    rows.append(row)
    _write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    return rows


def read_config(run_dir: str | Path) -> FinetuneConfig:
    """The configuration a run was started with (its config.yaml)."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise GraftError(f"{run_dir}: no config.yaml; expected a run folder written by graft finetune --out.")
    return FinetuneConfig.from_dict(yaml.safe_load(path.read_text()) or {})
