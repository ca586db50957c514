"""The fine-tuning recipe, top to bottom: setup -> train (epoch by epoch, checkpointed) -> save -> clean up.

    finetune(config, reporter) -> RunResult

1. setup: processes (torchrun / DDP), seeds, data, the model with a classifier for the data's classes, the
   pretrained weights through the transfer engine, the freezing schedule, the optimizer;
2. train: each epoch unfreezes what is due, trains, validates, appends metrics.jsonl, writes last.ckpt
   (atomically) and model.safetensors when validation improved. One training loop serves both inputs: images
   through the model, or, for a linear probe, the frozen backbone's features (computed once) through the
   classifier;
3. save: curves.png, confusion.png, classes.txt; the best model is already on disk.

`--resume RUN_DIR` rebuilds the run from config.yaml and last.ckpt and continues after the last finished epoch.
Epochs are numbered from 1 everywhere a user sees them: metrics.jsonl, the plots, last.ckpt, `--unfreeze-at`.
Progress goes to a `Reporter` (the CLI draws bars and tables with it); the library itself prints nothing.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
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
from torchgraft.train.data import ImageList, batches, build_transforms, find_splits, preprocessing_for
from torchgraft.train.metrics import confusion_matrix, plot_confusion, plot_curves
from torchgraft.transfer import Report, transfer

__all__ = ["finetune", "Reporter", "RunResult", "build_classifier_model", "find_head", "finished_epochs",
           "read_config"]

log = logging.getLogger(__name__)

_Batch = tuple[torch.Tensor, torch.Tensor]  # (inputs, labels)

FEW_SHOT = 20  # fewer training images than this in some class: a linear probe by default

FILES = ("model.safetensors", "last.ckpt", "metrics.jsonl", "config.yaml", "classes.txt", "curves.png",
         "confusion.png")


class Reporter(Protocol):
    """What the loop tells whoever watches (the CLI's rich bars and tables); all methods are optional. Epochs are
    numbered from 1."""

    def transfer(self, report: Report) -> None: ...
    def resumed(self, finished: int, epochs: int) -> None: ...
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
        resume = _ready_to_resume(out, dist_info)

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
        # the weights only: verifying against a source model (graft transfer's job) would build a second model
        # and run both in every process before the first step
        report = transfer(load(config.weights, key=config.key), model, target_classes=classes, source_model=None)
        reporter.transfer(report)

    # -- freezing: head first, then the backbone (or the user's steps)
    steps = _unfreeze_steps(config, head)
    schedule = UnfreezeSchedule(steps)
    schedule.start(model, train_bn=config.train_bn and not config.linear_probe)
    if config.freeze:
        freeze(model, *config.freeze)
    group_kwargs = {"weight_decay": config.weight_decay, "lr_mult": config.lr_mult or None,
                    "layer_decay": config.layer_decay}

    def new_optimizer(m: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.AdamW(param_groups(m, lr=config.lr, **group_kwargs), lr=config.lr,
                                 weight_decay=config.weight_decay)

    optimizer = new_optimizer(model)

    # -- the run folder: continue the saved run, or start a new one
    if resume:
        optimizer, start_epoch, best, rows = _restore(out, config, model, schedule, new_optimizer)
        if dist_info.main:  # a resume may run longer (`--epochs`): the next resume continues from here
            _write_text(out / "config.yaml", _config_text(config))
        reporter.resumed(start_epoch, config.epochs)
    else:
        start_epoch, best, rows = 0, _Best(), []
        if dist_info.main:
            _start_run_folder(out, config, classes)

    # -- devices, loaders, and what each step trains on
    device = dist_info.device
    cuda = device.type == "cuda"
    model.to(device)
    if cuda:
        model.to(memory_format=torch.channels_last)
    train_model: nn.Module = model  # the DDP wrapper under torchrun, once built
    augment = config.augment and not config.linear_probe
    train_set = ImageList(splits.train, build_transforms(pre, train=True, augment=augment, hflip=config.hflip))
    val_set = ImageList(splits.val, build_transforms(pre, train=False, augment=False, hflip=False))
    train_loader = _loader(train_set, config, dist_info, shuffle=True)
    val_loader = _loader(val_set, config, dist_info, shuffle=False)
    use_cache = config.linear_probe and config.feature_cache and dist_info.world == 1
    cache = _FeatureCache(model, head, device) if use_cache else None
    phases = _Phases(sorted({0} | {e for e, _ in steps if e < config.epochs}), config.epochs, len(train_loader),
                     config.warmup)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    amp = _autocast(device)
    scaler = torch.amp.GradScaler("cuda") if cuda and amp.fast_dtype == torch.float16 else None

    # -- train: each epoch unfreezes what is due, trains, validates, and saves (`epoch` counts from 0 here; what
    # a user sees, `number`, from 1)
    for epoch in range(start_epoch, config.epochs):
        number = epoch + 1
        added = schedule.step(epoch, model, optimizer, lr=config.lr * config.backbone_lr_mult, **group_kwargs)
        if config.freeze and added:
            freeze(model, *config.freeze)
        if dist_info.world > 1 and (added or train_model is model):
            # DDP synchronises the parameters that train when it is built: build it again when more unfreeze.
            train_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
        _seed_data_order(train_loader, epoch, config.seed)
        phase = _phase_name(steps, epoch)
        started = time.perf_counter()
        reporter.epoch_start(number, config.epochs, len(train_loader), phase)
        if cache is not None:  # a linear probe: the classifier alone, on the frozen backbone's features
            train, val = cache.train_feed(train_loader, epoch), cache.val_feed(val_loader, amp)
        else:
            train = _Feed(train_model, _images(train_loader, device), amp, scaler)
            val = _Feed(model, _images(val_loader, device), amp)
        train_loss, train_acc, lr = _train_epoch(train, optimizer, loss_fn, functools.partial(phases.factor, epoch),
                                                 reporter, dist_info, number)
        val_loss, confusion = _validate(model, val, loss_fn, len(classes))
        val_acc = int(confusion.diag().sum()) / max(1, int(confusion.sum()))
        row = {"epoch": number, "phase": phase, "train_loss": train_loss, "train_acc": train_acc,
               "val_loss": val_loss, "val_acc": val_acc, "lr": lr, "seconds": round(time.perf_counter() - started, 3)}
        rows.append(row)
        best.update(val_acc, number)
        if dist_info.main:
            _save_epoch(out, config, model, optimizer, schedule, row, confusion, best)
        reporter.epoch_end(row)

    # -- save what the run leaves behind; the best model is already on disk
    if dist_info.main:
        plot_curves(rows, out / "curves.png", best_epoch=best.epoch)
        best_confusion = torch.tensor(json.loads((out / ".best_confusion.json").read_text()))
        plot_confusion(best_confusion, classes, out / "confusion.png",
                       title=f"confusion (validation, kept epoch {best.epoch})")

    # -- clean up
    if dist_info.world > 1:
        import torch.distributed as dist

        dist.barrier()
    return RunResult(out, best.acc, best.epoch, rows, classes, report)


def _ready_to_resume(out: Path, dist_info: _Dist) -> bool:
    """Whether there is a finished epoch to resume after; temp files a killed run left half written are removed."""
    if dist_info.main:  # never read, so never needed
        for stale in out.glob(".*.tmp"):
            stale.unlink(missing_ok=True)
    if not (out / "last.ckpt").is_file():  # killed during the first epoch: nothing to lose, start it again
        log.info("%s: no last.ckpt yet (the run stopped in its first epoch); starting it from epoch 1", out)
        return False
    return True


def _start_run_folder(out: Path, config: FinetuneConfig, classes: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    _write_text(out / "classes.txt", "\n".join(classes) + "\n")
    _write_text(out / "config.yaml", _config_text(config))
    _write_text(out / "metrics.jsonl", "")


def _config_text(config: FinetuneConfig) -> str:
    """config.yaml, with absolute paths (weights, data, out, a model file), so `--resume` works from anywhere."""
    saved = config.to_dict()
    for name in ("weights", "data", "out"):
        saved[name] = str(Path(saved[name]).absolute())
    where, sep, factory = config.model.rpartition(":")
    if where.endswith(".py") and Path(where).is_file():
        saved["model"] = f"{Path(where).absolute()}{sep}{factory}"
    return yaml.safe_dump(saved, sort_keys=False)


def finished_epochs(out: str | Path) -> int:
    """How many epochs of the run in `out` last.ckpt has kept (0 when it has none)."""
    path = Path(out) / "last.ckpt"
    return int(load_checkpoint(path)["epoch"]) if path.is_file() else 0


def _restore(out: Path, config: FinetuneConfig, model: nn.Module, schedule: UnfreezeSchedule,
             new_optimizer: Callable[[nn.Module], torch.optim.Optimizer]
             ) -> tuple[torch.optim.Optimizer, int, _Best, list[dict[str, Any]]]:
    """The run as last.ckpt saved it: model, unfreezing schedule, optimizer, random states; then the number of
    finished epochs (the index to start from), the best so far and the finished epochs' metrics."""
    state = load_checkpoint(out / "last.ckpt")
    model.load_state_dict(state["model"])
    schedule.load_state_dict(state["schedule"])
    optimizer = schedule.restore(model, new_optimizer)
    if config.freeze:
        freeze(model, *config.freeze)
    optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"])
    rows = _read_rows(out / "metrics.jsonl", upto=state["epoch"])
    return optimizer, state["epoch"], _Best(state["best_acc"], state["best_epoch"]), rows


@dataclass
class _Best:
    """The best validation accuracy so far and its epoch, counted from 1 (0 before the first epoch)."""

    acc: float = -1.0
    epoch: int = 0

    def update(self, acc: float, epoch: int) -> None:
        if acc > self.acc:
            self.acc, self.epoch = acc, epoch


def _save_epoch(out: Path, config: FinetuneConfig, model: nn.Module, optimizer: torch.optim.Optimizer,
                schedule: UnfreezeSchedule, row: dict[str, Any], confusion: torch.Tensor, best: _Best) -> None:
    """After each epoch: the model and its confusion matrix when this epoch is the best, the metrics row, then
    last.ckpt. Each file is written atomically; a resume drops a row written after the last checkpoint."""
    epoch = row["epoch"]
    if best.epoch == epoch:
        save_safetensors(model.state_dict(), out / "model.safetensors",
                         metadata={"torchgraft.model": config.model, "epoch": str(epoch)})
        _write_text(out / ".best_confusion.json", json.dumps(confusion.tolist()))
    _append_row(out / "metrics.jsonl", row)
    save_checkpoint({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "schedule": schedule.state_dict(), "epoch": epoch, "best_acc": best.acc,
                     "best_epoch": best.epoch, "rng": rng_state(), "config": config.to_dict(),
                     "param_groups": [g.get("name", "") for g in optimizer.param_groups]},
                    out / "last.ckpt")


def _unfreeze_steps(config: FinetuneConfig, head: str) -> list[tuple[int, list[str]]]:
    head_patterns = [head, f"{head}.*", *config.unfreeze]
    if config.linear_probe:
        return [(0, head_patterns)]
    if config.unfreeze_at:
        steps: dict[int, list[str]] = {0: list(head_patterns)}
        for number, pattern in config.unfreeze_steps():  # EPOCH:PATTERN counts epochs from 1, as the console does
            steps.setdefault(number - 1, []).append(pattern)
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


# ---- data ------------------------------------------------------------------------------------------------


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


def _seed_data_order(loader: torch.utils.data.DataLoader, epoch: int, seed: int) -> None:
    """The order (and augmentation seeds) depend on the epoch alone, so a resumed run repeats them."""
    if isinstance(loader.sampler, torch.utils.data.DistributedSampler):
        loader.sampler.set_epoch(epoch)
    else:
        loader.generator.manual_seed(seed + epoch)


def _to(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    batch = batch.to(device, non_blocking=True)
    return batch.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else batch


def _images(loader: torch.utils.data.DataLoader, device: torch.device) -> Iterator[_Batch]:
    """The loader's (images, labels), on the device."""
    for images, labels in batches(loader):
        yield _to(images, device), labels.to(device)


# ---- precision -------------------------------------------------------------------------------------------


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


# ---- one epoch: the same loop for images and for cached features -----------------------------------------


@dataclass
class _Feed:
    """What one pass over the data runs: `module` on `batches` of (inputs, labels) already on the device, inside
    `autocast()`; `scaler` scales float16 losses before backward."""

    module: nn.Module
    batches: Iterable[_Batch]
    autocast: Callable[[], Any]
    scaler: torch.amp.GradScaler | None = None


@dataclass
class _Tally:
    """Running sums over the samples seen: loss (weighted by batch size) and correct predictions."""

    loss: float = 0.0
    correct: float = 0.0
    seen: float = 0.0

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        n = labels.shape[0]
        self.loss += loss.item() * n
        self.correct += (logits.argmax(1) == labels).sum().item()
        self.seen += n

    def means(self) -> tuple[float, float]:
        """Mean loss and accuracy."""
        return self.loss / max(self.seen, 1), self.correct / max(self.seen, 1)

    def over_processes(self, dist_info: _Dist) -> _Tally:
        """The sums over every process."""
        return _Tally(*_all_reduce([self.loss, self.correct, self.seen], dist_info))


def _train_epoch(feed: _Feed, optimizer: torch.optim.Optimizer, loss_fn: nn.Module,
                 lr_factor: Callable[[int], float], reporter: Any, dist_info: _Dist,
                 epoch: int) -> tuple[float, float, float]:
    """The training loop: each step sets the learning rate, runs forward, checks the loss, steps the optimizer.
    Returns the mean loss and accuracy over every process, and the last learning rate."""
    tally = _Tally()
    lr = optimizer.param_groups[0]["lr"]
    feed.module.train()
    for i, (inputs, labels) in enumerate(feed.batches):
        lr = _set_lr(optimizer, lr_factor(i))
        with feed.autocast():
            logits = feed.module(inputs)
            loss = loss_fn(logits.float(), labels)
        _stop_unless_finite(loss, epoch, i)
        _backward_and_step(loss, optimizer, feed.scaler)
        tally.add(loss, logits, labels)
        reporter.step(*tally.means())
    return (*tally.over_processes(dist_info).means(), lr)


def _stop_unless_finite(loss: torch.Tensor, epoch: int, step: int) -> None:
    if not torch.isfinite(loss):
        raise GraftError(f"the training loss became {loss.item()} at epoch {epoch} step {step + 1}; stopping. The last "
                         "good checkpoint is kept; lower --lr and resume or start again.")


def _backward_and_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer,
                       scaler: torch.amp.GradScaler | None) -> None:
    """Gradients of the loss, then an optimizer step (through the grad scaler for float16)."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()


@torch.no_grad()
def _validate(model: nn.Module, feed: _Feed, loss_fn: nn.Module, num_classes: int) -> tuple[float, torch.Tensor]:
    """Mean loss and the confusion matrix. Every process validates the whole set on its own copy (the same
    numbers everywhere, no collectives); the model is in eval mode meanwhile."""
    was_training = model.training
    model.eval()
    tally = _Tally()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    for inputs, labels in feed.batches:
        with feed.autocast():
            logits = feed.module(inputs)
        tally.add(loss_fn(logits.float(), labels), logits, labels)
        confusion += confusion_matrix(labels.cpu(), logits.argmax(1).cpu(), num_classes)
    model.train(was_training)
    return tally.means()[0], confusion


class _FeatureCache:
    """For a linear probe: the classifier's inputs, computed once by the frozen backbone, reused every epoch.

    The classifier trains on them in float32; validation runs under the run's mixed precision, as for images."""

    def __init__(self, model: nn.Module, head: str, device: torch.device) -> None:
        self.model = model
        self.head = model.get_submodule(head)
        self.device = device
        self.train_features: _Batch | None = None  # (features, labels) of every image, once computed
        self.val_features: _Batch | None = None

    @torch.no_grad()
    def _features(self, loader) -> _Batch:
        captured: list[torch.Tensor] = []
        handle = self.head.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach().cpu()))
        labels = []
        was_training = self.model.training
        self.model.eval()  # the frozen backbone as it will be used: BatchNorm statistics fixed, no dropout
        try:
            for images, y in batches(loader):
                self.model(_to(images, self.device))
                labels.append(y)
        finally:
            handle.remove()
            self.model.train(was_training)
        return torch.cat(captured), torch.cat(labels)

    def train_feed(self, loader, epoch: int) -> _Feed:
        """The training features in an order seeded by the epoch, as many batches as the loader has."""
        if self.train_features is None:
            self.train_features = self._features(loader)
        order = torch.randperm(len(self.train_features[1]), generator=torch.Generator().manual_seed(epoch))
        size = loader.batch_size
        batches = (order[i * size:(i + 1) * size] for i in range(len(loader)))
        return _Feed(self.head, self._batches(self.train_features, batches), _NoCast())

    def val_feed(self, loader, autocast: Callable[[], Any]) -> _Feed:
        """The validation features in order (computed when first read)."""
        return _Feed(self.head, self._val_batches(loader), autocast)

    def _val_batches(self, loader) -> Iterator[_Batch]:
        if self.val_features is None:
            self.val_features = self._features(loader)
        size = loader.batch_size
        slices = (slice(i, i + size) for i in range(0, len(self.val_features[1]), size))
        yield from self._batches(self.val_features, slices)

    def _batches(self, cached: _Batch, indices: Iterable[Any]) -> Iterator[_Batch]:
        features, labels = cached
        for index in indices:
            yield features[index].to(self.device), labels[index].to(self.device)


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
