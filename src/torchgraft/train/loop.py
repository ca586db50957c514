"""The fine-tuning recipe, top to bottom: setup -> probe -> fine-tune (epoch by epoch, checkpointed) -> save.

    finetune(config, reporter) -> RunResult

1. setup: processes (torchrun / DDP), seeds, the data (checked, every image decoded and resized once into an
   in-memory uint8 cache, before anything is written), the model with a classifier for the data's classes, the
   pretrained weights through the transfer engine, the recipe for this data and budget (`recipe.plan_recipe`);
2. probe: the frozen backbone's features of every image, once; a classifier fitted to convergence on them
   (`probe.fit_probe`; with few images per class, on augmented views of them too), which becomes the model's
   head; flips are decided here when not given;
3. fine-tune: each epoch unfreezes what is due, trains on augmented tensors, validates when due, appends
   metrics.jsonl, writes last.ckpt (atomically) and model.safetensors when validation improved;
4. save: curves.png, confusion.png; the best model is already on disk.

The probe is epoch 0 in metrics.jsonl; epochs that train on images count from 1 everywhere a user sees them:
metrics.jsonl, the plots, last.ckpt, `--unfreeze-at`. The kept model is the one with the highest validation
accuracy, ties broken by the lower validation loss. `--resume RUN_DIR` rebuilds the run from config.yaml and
last.ckpt and continues after the last saved epoch. Under torchrun every step takes the same global batch as one
process would (each process 1/N of it), so the learning rate and its schedule follow global steps.
Progress goes to a `Reporter` (the CLI draws bars and tables with it); the library itself prints nothing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

from torchgraft.errors import GraftError
from torchgraft.freeze import UnfreezeSchedule, freeze, is_held, param_groups
from torchgraft.io.read import load
from torchgraft.io.write import atomic_write, save_safetensors
from torchgraft.specs import build_model
from torchgraft.train.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from torchgraft.train.config import FinetuneConfig
from torchgraft.train.data import (Crops, DecodedImages, augment, check_splits, crops_for, decode_images,
                                   find_splits, memory_budget, normalise, pass_size, preprocessing_for)
from torchgraft.train.metrics import confusion_matrix, plot_confusion, plot_curves
from torchgraft.train.probe import Probe, fit_probe, held_out_split
from torchgraft.train.recipe import Recipe, backbone_lr_mult, batch_size, plan_recipe, warmup_steps
from torchgraft.transfer import Report, transfer

__all__ = ["finetune", "Reporter", "RunResult", "build_classifier_model", "find_head", "finished_epochs",
           "read_config", "init_head"]

log = logging.getLogger(__name__)

FILES = ("model.safetensors", "last.ckpt", "metrics.jsonl", "config.yaml", "classes.txt", "split.json",
         "curves.png", "confusion.png")


class Reporter(Protocol):
    """What the loop tells whoever watches (the CLI's rich bars and tables); all methods are optional. Epochs are
    numbered from 1; the probe is epoch 0."""

    def transfer(self, report: Report) -> None: ...
    def recipe(self, text: str) -> None: ...
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
    kept: str = ""
    """Which epoch model.safetensors holds, and why (the summary's sentence)."""
    recipe: str = ""
    """What the run did, and why (the recipe's sentences)."""
    images_per_s: float | None = None
    """Training images per second over the epochs on images (None for the probe alone)."""


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


def init_head(head: nn.Module) -> None:
    """The new classifier's initialisation, the same for every factory: weights N(0, 0.01), biases 0 (as
    torchvision does). timm scales some heads by 1/sqrt(num_classes) (EfficientNet's init): with 3 classes that
    is uniform +-0.58, logits of magnitude ~10 on ImageNet features, a saturated softmax that a few steps of
    AdamW at 1e-3 cannot move; the few-shot run stayed at chance while torchvision's reached 1.0."""
    for module in head.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.normal_(module.weight, std=0.01)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


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


def _gather_rows(local: torch.Tensor, total: int, dist_info: _Dist) -> torch.Tensor:
    """Rows computed for indices rank, rank + N, ... in each process, reassembled in index order everywhere."""
    if dist_info.world == 1:
        return local
    import torch.distributed as dist

    size = math.ceil(total / dist_info.world)
    padded = torch.zeros(size, *local.shape[1:], dtype=local.dtype, device=dist_info.device)
    padded[:len(local)] = local.to(dist_info.device)
    parts = [torch.empty_like(padded) for _ in range(dist_info.world)]
    dist.all_gather(parts, padded)
    rows = torch.stack(parts, 1).reshape(size * dist_info.world, *local.shape[1:])  # row r*N + k from rank k
    return rows[:total].cpu()


def _broadcast(tensors: list[torch.Tensor], dist_info: _Dist) -> None:
    """The first process's values in every process (the probe it fitted)."""
    if dist_info.world == 1:
        return
    import torch.distributed as dist

    for t in tensors:
        moved = t.to(dist_info.device)
        dist.broadcast(moved, 0)
        t.copy_(moved.cpu())


def _all_reduce(values: list[float], dist_info: _Dist) -> list[float]:
    if dist_info.world == 1:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=dist_info.device)
    dist.all_reduce(t)
    return t.tolist()


def _every_process(value: float, dist_info: _Dist) -> list[float]:
    """Each process's `value`, in every process."""
    return _all_reduce([value if rank == dist_info.rank else 0.0 for rank in range(dist_info.world)], dist_info)


# ---- learning rate ---------------------------------------------------------------------------------------


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warmup over `warmup` steps, then cosine decay to zero at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class _Phases:
    """Each unfreezing step starts a phase with its own warmup and cosine decay (fastai's fine_tune does too),
    counted in global steps; `starts` are epochs counted from 1."""

    starts: list[int]
    recipe: Recipe
    config: FinetuneConfig

    def factor(self, epoch: int, step: int) -> float:
        r = self.recipe
        start = max(s for s in self.starts if s <= epoch)
        end = min([s for s in self.starts if s > epoch] + [r.epochs + 1])
        first = (start - 1) * r.steps_per_epoch
        total = min((end - 1) * r.steps_per_epoch, r.total_steps) - first
        at = (epoch - 1) * r.steps_per_epoch + step - first
        return _lr_factor(at, total, warmup_steps(self.config, total))


def _set_lr(optimizer: torch.optim.Optimizer, factor: float) -> float:
    """Cosine schedule over every group, including groups added by unfreezing (each keeps its initial lr)."""
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
        group["lr"] = group["initial_lr"] * factor
    return optimizer.param_groups[0]["lr"]


# ---- the recipe ------------------------------------------------------------------------------------------


def finetune(config: FinetuneConfig, reporter: Any = None, *, resume: bool = False) -> RunResult:
    """Fine-tune `config.model` from `config.weights` on `config.data`; files go to `config.out`."""
    started = time.monotonic()
    out = Path(config.out)
    dist_info = _setup_processes(config)
    reporter = reporter if (reporter is not None and dist_info.main) else _Silent()
    if config.batch_size is not None and config.batch_size < dist_info.world:
        raise GraftError(f"--batch-size {config.batch_size} is the global batch, split over {dist_info.world} "
                         f"processes; expected at least {dist_info.world}.")
    torch.manual_seed(config.seed + dist_info.rank)
    if resume:
        resume = _ready_to_resume(out, dist_info)

    # -- data: checked, and every image decoded and resized once, before anything is written
    splits = find_splits(config.data, config.val_split, config.seed)
    check_splits(splits, config.data)
    classes = splits.classes

    # -- model: the classifier sized for the data, initialised alike for every factory; weights through transfer
    torch.manual_seed(config.seed)  # the new classifier's initialisation is the same in every process
    model, head = build_classifier_model(config.model, config.model_kwargs, len(classes))
    init_head(model.get_submodule(head))
    pre = preprocessing_for(model, config.model, config.image_size)
    budget = memory_budget(config.cache_gb)
    train_images = decode_images(splits.train, pre.image_size, budget, config.data)
    used = 0 if train_images.pixels is None else train_images.pixels.numel()
    val_images = decode_images(splits.val, pre.image_size, budget - used, config.data)
    report = None
    if not resume:
        # the weights only: verifying against a source model (graft transfer's job) would build a second model
        # and run both in every process before the first step
        report = transfer(load(config.weights, key=config.key), model, target_classes=classes, source_model=None)
        reporter.transfer(report)
    device = dist_info.device
    cuda = device.type == "cuda"
    model.to(device)
    if cuda:
        model.to(memory_format=torch.channels_last)
    amp = _autocast(device)
    run = _Run(config, dist_info, model, pre, amp, len(classes),
               batch_size(config, len(train_images), dist_info.world))
    budget_steps = None
    if config.time_budget is not None:
        budget_steps = (_saved_budget(out) if resume else
                        _budget_steps(config.time_budget * 60 - (time.monotonic() - started), run, train_images))
    recipe = plan_recipe(config, len(train_images), len(val_images), len(classes), train_images.native,
                         budget_steps, dist_info.world)
    reporter.recipe(recipe.why)

    # -- freezing: the classifier first (or only), then the backbone (or the user's steps)
    steps = _unfreeze_steps(config, head, recipe)
    schedule = UnfreezeSchedule(steps)
    schedule.start(model, train_bn=config.train_bn)
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
        optimizer, start_epoch, best, rows = _restore(out, config, model, schedule, new_optimizer, run.batch)
        if dist_info.main:  # a resume may run longer (`--epochs`): the next resume continues from here
            _write_text(out / "config.yaml", _config_text(config))
        reporter.resumed(start_epoch, recipe.epochs)
    else:
        start_epoch, best, rows = -1, _Best(), []
        if dist_info.main:
            _start_run_folder(out, config, classes, splits)
            if budget_steps is not None:
                _write_text(out / BUDGET_FILE, json.dumps({"minutes": config.time_budget, "steps": budget_steps}))

    hflip = config.hflip if config.hflip is not None else _saved_flip(rows)

    # -- probe (epoch 0): features once, a converged classifier; the flips decided when not given
    if recipe.probe and start_epoch < 0:
        started = time.perf_counter()
        reporter.epoch_start(0, recipe.epochs, 1, "probe")
        row, confusion, flips = _probe(run, head, train_images, val_images, recipe.views, config.hflip,
                                       decide_flip=config.hflip is None and config.augment
                                       and (recipe.total_steps > 0 or recipe.views > 0))
        hflip = flips if config.hflip is None else hflip
        row["seconds"] = round(time.perf_counter() - started, 3)
        seen = len(train_images) * (1 + recipe.views) + len(val_images)
        row["images_per_s"] = round(seen / max(row["seconds"], 1e-9), 1)
        rows.append(row)
        best.update(row, 0)
        if dist_info.main:
            _save_epoch(out, config, model, optimizer, schedule, row, confusion, best, checkpoint=True,
                        batch=run.batch)
        reporter.epoch_end(row)
        start_epoch = 0
    start_epoch = max(start_epoch, 0)

    # -- fine-tune: each epoch unfreezes what is due, trains, validates when due, and saves
    crops = _training_crops(train_images, hflip)
    phases = _Phases(sorted({1} | {e for e, _ in steps if e >= 1}), recipe, config)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    scaler = torch.amp.GradScaler("cuda") if cuda and amp.fast_dtype == torch.float16 else None
    train_model: nn.Module = model  # the DDP wrapper under torchrun, once built
    saved_at = time.monotonic()
    for number in range(start_epoch + 1, recipe.epochs + 1):
        added = schedule.step(number, model, optimizer, lr=config.lr * backbone_lr_mult(config), **group_kwargs)
        if config.freeze and added:
            freeze(model, *config.freeze)
        if recipe.probe:  # every epoch: a resumed run unfreezes through its schedule, not through `added`
            _keep_norms_as_probed(model)
        if dist_info.world > 1 and (added or train_model is model):
            # DDP synchronises the parameters that train when it is built: build it again when more unfreeze.
            train_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
        phase = _phase_name(steps, number)
        started = time.perf_counter()
        reporter.epoch_start(number, recipe.epochs, recipe.steps_in(number), phase)
        train_loss, train_acc, lr, seen = run.train_epoch(
            train_model, optimizer, loss_fn, scaler, train_images, number, recipe,
            crops if config.augment else None, lambda step, e=number: phases.factor(e, step), reporter)
        train_seconds = time.perf_counter() - started
        row = {"epoch": number, "phase": phase, "train_loss": train_loss, "train_acc": train_acc,
               "val_loss": None, "val_acc": None, "lr": lr, "steps": recipe.steps_in(number),
               "images_per_s": round(seen / max(train_seconds, 1e-9), 1)}
        confusion = None
        if recipe.validates(number):
            row["val_loss"], confusion = run.validate(val_images)
            row["val_acc"] = _accuracy(confusion)
            best.update(row, number)
        row["seconds"] = round(time.perf_counter() - started, 3)
        rows.append(row)
        checkpoint = (confusion is not None or number == recipe.epochs
                      or time.monotonic() - saved_at >= config.checkpoint_every)
        if dist_info.main:
            _save_epoch(out, config, model, optimizer, schedule, row, confusion, best, checkpoint, batch=run.batch)
        if checkpoint:
            saved_at = time.monotonic()
        reporter.epoch_end(row)

    # -- save what the run leaves behind; the best model is already on disk
    kept = _kept(rows, best)
    if dist_info.main:
        plot_curves(rows, out / "curves.png", best_epoch=best.epoch)
        best_confusion = torch.tensor(json.loads((out / ".best_confusion.json").read_text()))
        plot_confusion(best_confusion, classes, out / "confusion.png",
                       title=f"confusion (validation, kept epoch {best.epoch})")

    # -- clean up
    if dist_info.world > 1:
        import torch.distributed as dist

        dist.barrier()
    on_images = [r for r in rows if r["epoch"] >= 1]
    speed = (sum(r["images_per_s"] * r["steps"] for r in on_images) / sum(r["steps"] for r in on_images)
             if on_images else None)
    text = recipe.why + "".join(f"; {r['note']}" for r in rows if r["epoch"] == 0 and r.get("note"))
    return RunResult(out, best.acc, best.epoch, rows, classes, report, kept, text, speed)


#: Where a --time-budget run keeps its budget in steps, so that a resume plans the same run.
BUDGET_FILE = "time_budget.json"
#: Seconds a --time-budget run keeps for what follows its last step: the plots and the last files.
END_SECONDS = 3.0


def _budget_steps(seconds: float, run: _Run, images: DecodedImages) -> float:
    """--time-budget: the training steps that fit in `seconds` (less `END_SECONDS`), at the seconds one step
    takes here: a batch of training images, forward and backward in the passes training will use (BatchNorm
    held in eval all the same, so nothing is learned; the gradients are dropped), the fastest of two timed
    after one untimed (the first pays one-time allocations); under torchrun, the fewest of every process's."""
    model, batch = run.model, run.batch
    norms = [(m, m.training) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    grads = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    model.train()
    for m, _ in norms:
        m.eval()
    for p, _ in grads:
        p.requires_grad_(True)
    index = run._local(torch.arange(min(batch, len(images))))
    pixels = next(iter(images.batches([index], 0)))
    inputs = run._input(pixels, _uniforms(len(index), 0), _training_crops(images, True))
    labels = images.labels[index].to(run.dist_info.device)
    # BatchNorm trains with --no-linear-probe, and a step is then one pass
    passes = len(index) if run.config.linear_probe is False else run._pass(len(index))
    times = []
    cuda = run.dist_info.device.type == "cuda"
    try:
        # dropout draws from the global generators: the run finds them as they were
        with torch.random.fork_rng(devices=[run.dist_info.device] if cuda else []):
            for _ in range(3):
                start = time.perf_counter()
                _gradients(model, nn.CrossEntropyLoss(), None, run.autocast, inputs, labels, passes)
                if cuda:
                    torch.cuda.synchronize(run.dist_info.device)
                times.append(time.perf_counter() - start)
    finally:
        for p, requires in grads:
            p.grad = None
            p.requires_grad_(requires)
        for m, training in norms:
            m.train(training)
        model.train(was_training)
    # every process plans the same run: the fewest steps any of them has time for
    return min(_every_process(max(0.0, seconds - END_SECONDS) / max(min(times[1:]), 1e-9), run.dist_info))


def _saved_budget(out: Path) -> float:
    """The budget in steps a --time-budget run measured when it started (a resume plans the same run)."""
    path = out / BUDGET_FILE
    if not path.is_file():
        raise GraftError(f"{out}: no {BUDGET_FILE}; expected the budget a --time-budget run saves when it starts. "
                         "Start the run again with --out.")
    return float(json.loads(path.read_text())["steps"])


def _keep_norms_as_probed(model: nn.Module) -> None:
    """After a probe, BatchNorm layers stay frozen (statistics and affine), so the backbone's features start
    where the probed classifier was fitted, and move only as far as its weights move them (LP-FT's premise). In
    train mode they would switch to batch statistics: on digits at 64 px the probe's 0.947 fell to 0.869 after
    the first epoch and ended at 0.964, against 0.992 frozen (3 epochs)."""
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        freeze(model, types=nn.modules.batchnorm._BatchNorm)


def _accuracy(confusion: torch.Tensor) -> float:
    return int(confusion.diag().sum()) / max(1, int(confusion.sum()))


def _saved_flip(rows: list[dict[str, Any]]) -> bool | None:
    """The flip decision a resumed run's probe made (its metrics row)."""
    return next((r.get("hflip") for r in rows if r["epoch"] == 0), None)


@dataclass
class _Run:
    """What every pass over images needs: the model, its preprocessing and precision, the processes."""

    config: FinetuneConfig
    dist_info: _Dist
    model: nn.Module
    pre: Any
    autocast: Callable[[], Any]
    num_classes: int
    batch: int
    """Images per training step over all processes (`recipe.batch_size`)."""

    def _input(self, pixels: torch.Tensor, u: torch.Tensor | None = None, crops: Crops | None = None) -> torch.Tensor:
        x = pixels.to(self.dist_info.device, non_blocking=True)
        x = augment(x, crops, u) if crops is not None else x.float() / 255
        x = normalise(x, self.pre)
        return x.contiguous(memory_format=torch.channels_last) if self.dist_info.device.type == "cuda" else x

    def _local(self, index: torch.Tensor) -> torch.Tensor:
        """This process's share of a global batch."""
        return index[self.dist_info.rank::self.dist_info.world]

    @torch.no_grad()
    def features(self, head: nn.Module, images: DecodedImages, index: torch.Tensor, flip: bool = False,
                 crops: Crops | None = None, view: int = 0) -> torch.Tensor:
        """The classifier's inputs for images[index] (eval mode: the pretrained BatchNorm statistics, no dropout),
        computed across processes: the images as they are, mirrored (`flip`), or their augmented view number
        `view` (`crops`; drawn per global index, so any number of processes sees the same views). Measured on
        digits, the data's own statistics (AdaBN) make a worse probe: 0.83 against 0.95 (full data), 0.62
        against 0.82 (10 per class)."""
        captured: list[torch.Tensor] = []
        handle = head.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach().float().cpu()))
        was_training = self.model.training
        self.model.eval()
        uniforms = None if crops is None else _uniforms(len(index), self.config.seed * 104_729 + view)
        local, u = self._local(index), None if uniforms is None else self._local(uniforms)
        keep = len(local)
        if not keep and len(index):  # fewer images than processes: one image's features, for their shape, kept none
            local, u = index[:1], None if uniforms is None else uniforms[:1]
        size = self._eval_pass()
        try:
            chunks = [local[i:i + size] for i in range(0, len(local), size)]
            for i, pixels in enumerate(images.batches(chunks, self._workers())):
                x = self._input(pixels, None if u is None else u[i * size:(i + 1) * size], crops)
                with self.autocast():
                    self.model(x.flip(3) if flip else x)
        finally:
            handle.remove()
            self.model.train(was_training)
        mine = torch.cat(captured).flatten(1)[:keep] if captured else torch.zeros(0, 1)
        return _gather_rows(mine, len(index), self.dist_info)

    def _pass(self, n: int) -> int:
        """Images per forward pass out of `n` (all on CUDA; on the CPU, `data.pass_size`)."""
        return pass_size(self.dist_info.device, self.pre.image_size, n)

    def _eval_pass(self) -> int:
        """Images per forward pass without gradients (features, validation): a batch, at least 64, within the
        CPU's pass."""
        return self._pass(max(self.batch, 64))

    def _workers(self) -> int:
        return self.config.workers if self.config.workers is not None else (
            2 if self.dist_info.device.type == "cuda" else 0)

    def train_epoch(self, module: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: nn.Module,
                    scaler: torch.amp.GradScaler | None, images: DecodedImages, epoch: int, recipe: Recipe,
                    crops: Crops | None, lr_factor: Callable[[int], float], reporter: Any
                    ) -> tuple[float, float, float, int]:
        """One epoch on images: global batches in an order seeded by the epoch (the same in every process and on
        resume), each process taking its share; each step sets the learning rate, runs forward, checks the loss,
        steps the optimizer. Returns the mean loss and accuracy over every process, the last learning rate and
        the images seen."""
        seed, size = self.config.seed, self.batch
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        steps = recipe.steps_in(epoch)
        tally = _Tally()
        lr = optimizer.param_groups[0]["lr"]
        module.train()
        # one pass per step unless no layer depends on the batch (BatchNorm frozen, as after a probe, or none):
        # then the CPU's passes are smaller, and their gradients add up to the step's
        mixes = _batch_dependent(self.model)
        passes = size if mixes else self._pass(size)
        least = 2 if mixes else 1
        global_batches = [_even_shares(order[i * size:(i + 1) * size], order, self.dist_info.world, least)
                          for i in range(steps)]
        pixel_batches = images.batches([self._local(b) for b in global_batches], self._workers())
        for i, (pixels, index) in enumerate(zip(pixel_batches, global_batches)):
            step = (epoch - 1) * recipe.steps_per_epoch + i
            u = _uniforms(len(index), seed * 1_000_003 + step)
            inputs = self._input(pixels, self._local(u), crops)
            labels = images.labels[self._local(index)].to(self.dist_info.device)
            lr = _set_lr(optimizer, lr_factor(i))
            optimizer.zero_grad(set_to_none=True)
            logits, loss = _gradients(module, loss_fn, scaler, self.autocast, inputs, labels, passes, epoch, i)
            _step(optimizer, scaler)
            tally.add(loss, logits, labels)
            reporter.step(*tally.means())
        total = tally.over_processes(self.dist_info)
        return (*total.means(), lr, int(total.seen))

    @torch.no_grad()
    def validate(self, images: DecodedImages) -> tuple[float, torch.Tensor]:
        """Mean cross-entropy (no label smoothing: the same measure as the probe's) and the confusion matrix.
        Every process validates the whole set on its own copy (the same numbers everywhere, no collectives)."""
        was_training = self.model.training
        self.model.eval()
        size = self._eval_pass()
        chunks = [torch.arange(i, min(i + size, len(images))) for i in range(0, len(images), size)]
        loss, confusion = 0.0, torch.zeros(self.num_classes, self.num_classes, dtype=torch.long)
        for pixels, index in zip(images.batches(chunks, self._workers()), chunks):
            with self.autocast():
                logits = self.model(self._input(pixels)).float()
            labels = images.labels[index].to(logits.device)
            loss += float(F.cross_entropy(logits, labels, reduction="sum"))
            confusion += confusion_matrix(labels.cpu(), logits.argmax(1).cpu(), self.num_classes)
        self.model.train(was_training)
        return loss / max(1, len(images)), confusion


def _training_crops(images: DecodedImages, hflip: bool | None) -> Crops:
    """The crops training uses (and the probe's augmented views): strength from the images' native size, flips
    on unless given or decided off."""
    return crops_for(images.native, True if hflip is None else hflip)


def _even_shares(batch: torch.Tensor, order: torch.Tensor, world: int, least: int = 1) -> torch.Tensor:
    """A global batch whose images split evenly over `world` processes, at least `least` each: an epoch's last,
    partial batch takes the first images of the epoch's order again as it needs (as torch's DistributedSampler
    pads an epoch), so no process is left without images, every process's loss weighs its images alike under
    DDP's mean, and BatchNorm that trains on the batch (`least` 2) never sees a batch of one image."""
    short = max(least * world - len(batch), -len(batch) % world)
    return torch.cat([batch, order[:short]]) if short else batch


def _uniforms(n: int, seed: int) -> torch.Tensor:
    """The five uniform numbers per image `augment` takes, from their own seeded generator: the same in every
    process and on resume."""
    return torch.rand(n, 5, generator=torch.Generator().manual_seed(seed))


def _probe(run: _Run, head_name: str, train: DecodedImages, val: DecodedImages, views: int, hflip: bool | None,
           decide_flip: bool) -> tuple[dict[str, Any], torch.Tensor, bool | None]:
    """Epoch 0: features of every image through the frozen backbone, a converged classifier fitted on them and
    loaded into the head; validated like any epoch. With `decide_flip`, the fit on the training part also
    classifies the held-out part mirrored: flips stay on when that keeps 90% of its accuracy above chance. With
    `views`, the classifier is fitted again on the training images and that many augmented views of each, with
    the crops (and the flips, as given or decided) that training would use."""
    head = run.model.get_submodule(head_name)
    if not isinstance(head, nn.Linear):
        raise GraftError(f"the classifier {head_name} is a {type(head).__name__}; the linear probe needs an "
                         "nn.Linear classifier; pass --no-linear-probe to train it on images instead.")
    every = torch.arange(len(train))
    train_x = run.features(head, train, every)
    val_x = run.features(head, val, torch.arange(len(val)))
    probe = None
    if decide_flip or not views:  # with views coming, the fit on the training part is enough for the flip test
        probe = fit_probe(train_x, train.labels, run.num_classes, run.config.seed, refit=not views)
    flips, why = None, []
    if decide_flip and probe.part is not None:
        flips, said = _flip_test(run, head, train, probe)
        why.append(said)
    if views:
        crops = _training_crops(train, hflip if hflip is not None else flips)
        extra = [run.features(head, train, every, crops=crops, view=v) for v in range(1, views + 1)]
        probe = fit_probe(train_x, train.labels, run.num_classes, run.config.seed, views=extra)
        why.append(f"it also fitted {views} augmented view(s) of each training image ({crops.describe()})")
    _broadcast([probe.weight, probe.bias], run.dist_info)
    with torch.no_grad():
        head.weight.copy_(probe.weight.to(head.weight))
        head.bias.copy_(probe.bias.to(head.bias)) if head.bias is not None else None
    val_logits = probe.logits(val_x)
    confusion = confusion_matrix(val.labels, val_logits.argmax(1), run.num_classes)
    train_logits = probe.logits(train_x)
    note = "; ".join([f"the probe's L2 {probe.l2:g} was chosen on {probe.held_out} held-out training images"
                      if probe.held_out else f"the probe's L2 {probe.l2:g} (too few images to hold some out)", *why])
    row = {"epoch": 0, "phase": "probe", "train_loss": float(F.cross_entropy(train_logits, train.labels)),
           "train_acc": float((train_logits.argmax(1) == train.labels).float().mean()),
           "val_loss": float(F.cross_entropy(val_logits, val.labels)), "val_acc": _accuracy(confusion),
           "lr": None, "steps": 0, "l2": probe.l2, "hflip": flips, "note": note}
    return row, confusion, flips


def _flip_test(run: _Run, head: nn.Module, train: DecodedImages, probe: Probe) -> tuple[bool, str]:
    _, held = held_out_split(train.labels, run.config.seed)
    plain = probe.part.accuracy(run.features(head, train, held), train.labels[held])
    mirrored = probe.part.accuracy(run.features(head, train, held, flip=True), train.labels[held])
    chance = 1 / run.num_classes
    keep = mirrored - chance >= 0.9 * (plain - chance)
    return keep, (f"flips {'on' if keep else 'off'}: held-out accuracy {plain:.3f}, mirrored {mirrored:.3f}")


def _ready_to_resume(out: Path, dist_info: _Dist) -> bool:
    """Whether there is a finished epoch to resume after; temp files a killed run left half written are removed."""
    if dist_info.main:  # never read, so never needed
        for stale in out.glob(".*.tmp"):
            stale.unlink(missing_ok=True)
    if not (out / "last.ckpt").is_file():  # killed during the first epoch: nothing to lose, start it again
        log.info("%s: no last.ckpt yet (the run stopped before its first checkpoint); starting it again", out)
        return False
    return True


def _start_run_folder(out: Path, config: FinetuneConfig, classes: list[str], splits) -> None:
    """config.yaml, classes.txt, an empty metrics.jsonl, and split.json: which images trained and which
    validated (absolute paths), so `graft evaluate` scores the run's own validation images."""
    out.mkdir(parents=True, exist_ok=True)
    _write_text(out / "classes.txt", "\n".join(classes) + "\n")
    split = {"data": str(Path(config.data).absolute()),
             **{name: [[str(Path(p).absolute()), classes[y]] for p, y in getattr(splits, name)]
                for name in ("train", "val")}}
    _write_text(out / "split.json", json.dumps(split))
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
             new_optimizer: Callable[[nn.Module], torch.optim.Optimizer], batch: int
             ) -> tuple[torch.optim.Optimizer, int, _Best, list[dict[str, Any]]]:
    """The run as last.ckpt saved it: model, unfreezing schedule, optimizer, random states; then the number of
    finished epochs (the index to start from), the best so far and the finished epochs' metrics. The batch the
    rule gives now (`batch`) must be the one the run trained in: its steps and schedule are counted in it."""
    state = load_checkpoint(out / "last.ckpt")
    if state.get("batch", batch) != batch:
        raise GraftError(f"{out} trained in batches of {state['batch']} images, and the batch rule gives {batch} "
                         "for this resume (another number of processes); expected the same batch. Resume with "
                         "the number of processes the run started with.")
    model.load_state_dict(state["model"])
    schedule.load_state_dict(state["schedule"])
    optimizer = schedule.restore(model, new_optimizer)
    if config.freeze:
        freeze(model, *config.freeze)
    optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"])
    rows = _read_rows(out / "metrics.jsonl", upto=state["epoch"])
    best = _Best(state["best_acc"], state.get("best_loss", math.inf), state["best_epoch"])
    return optimizer, state["epoch"], best, rows


@dataclass
class _Best:
    """The kept epoch so far: the highest validation accuracy, ties broken by the lower validation loss (the
    probe is epoch 0; -1 before any)."""

    acc: float = -1.0
    loss: float = math.inf
    epoch: int = -1

    def update(self, row: dict[str, Any], epoch: int) -> None:
        acc, loss = row["val_acc"], row["val_loss"]
        if acc > self.acc + 1e-12 or (abs(acc - self.acc) <= 1e-12 and loss < self.loss):
            self.acc, self.loss, self.epoch = acc, loss, epoch


def _name(epoch: int) -> str:
    return "epoch 0 (the linear probe)" if epoch == 0 else f"epoch {epoch}"


def _kept(rows: list[dict[str, Any]], best: _Best) -> str:
    """Which epoch model.safetensors holds, and why, in one sentence."""
    scored = [r for r in rows if r.get("val_acc") is not None]
    ties = [r["epoch"] for r in scored if abs(r["val_acc"] - best.acc) <= 1e-12 and r["epoch"] != best.epoch]
    text = f"kept {_name(best.epoch)}: the highest val acc, {best.acc:.4f}"
    if ties:
        others = ", ".join(_name(e) for e in ties)
        text += f", shared with {others}; its val loss {best.loss:.4f} is the lowest of them"
    else:
        text += f" (val loss {best.loss:.4f})"
    skipped = [r["epoch"] for r in rows if r["epoch"] >= 1 and r.get("val_acc") is None]
    if skipped:
        which = (f"epoch {skipped[0]} was" if len(skipped) == 1 else
                 f"epochs {', '.join(map(str, skipped))} were")
        text += f"; {which} not validated (validation every few epochs)"
    return text


def _save_epoch(out: Path, config: FinetuneConfig, model: nn.Module, optimizer: torch.optim.Optimizer,
                schedule: UnfreezeSchedule, row: dict[str, Any], confusion: torch.Tensor | None, best: _Best,
                checkpoint: bool, batch: int) -> None:
    """After each epoch: the model and its confusion matrix when this epoch is the best, the metrics row, then
    last.ckpt when `checkpoint`. Each file is written atomically; a resume drops rows written after the last
    checkpoint."""
    epoch = row["epoch"]
    if best.epoch == epoch and confusion is not None:
        save_safetensors(model.state_dict(), out / "model.safetensors",
                         metadata={"torchgraft.model": config.model, "epoch": str(epoch)})
        _write_text(out / ".best_confusion.json", json.dumps(confusion.tolist()))
    _append_row(out / "metrics.jsonl", row)
    if not checkpoint:
        return
    save_checkpoint({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "schedule": schedule.state_dict(), "epoch": epoch, "best_acc": best.acc,
                     "best_loss": best.loss, "best_epoch": best.epoch, "rng": rng_state(), "config": config.to_dict(),
                     "param_groups": [g.get("name", "") for g in optimizer.param_groups], "batch": batch},
                    out / "last.ckpt")


def _unfreeze_steps(config: FinetuneConfig, head: str, recipe: Recipe) -> list[tuple[int, list[str]]]:
    """(epoch, patterns) for the unfreezing schedule, epochs counted from 1 as on the console; step 0 is what
    trains first (the classifier and `--unfreeze`)."""
    head_patterns = [head, f"{head}.*", *config.unfreeze]
    if recipe.total_steps == 0:
        return [(0, head_patterns)]
    if config.unfreeze_at:
        steps: dict[int, list[str]] = {0: list(head_patterns)}
        for number, pattern in config.unfreeze_steps():  # EPOCH:PATTERN: unfreezes when that epoch starts
            steps.setdefault(number, []).append(pattern)
        return sorted(steps.items())
    return [(0, head_patterns), (recipe.head_epochs + 1, ["*"])]


def _phase_name(steps: list[tuple[int, list[str]]], epoch: int) -> str:
    """"head" until the first unfreezing step, "all" once everything trains, else the patterns that thawed last."""
    active = [patterns for at, patterns in steps if at <= epoch]
    if len(active) == 1:
        return "head"
    return "all" if "*" in active[-1] else "+" + ",".join(active[-1])


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


def _stop_unless_finite(loss: torch.Tensor, epoch: int, step: int) -> None:
    if not torch.isfinite(loss):
        raise GraftError(f"the training loss became {loss.item()} at epoch {epoch} step {step + 1}; stopping. The last "
                         "good checkpoint is kept; lower --lr and resume or start again.")


def _gradients(module: nn.Module, loss_fn: nn.Module, scaler: torch.amp.GradScaler | None, autocast: Any,
               inputs: torch.Tensor, labels: torch.Tensor, passes: int, epoch: int = 0, step: int = 0
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Add to the parameters' gradients those of the mean loss over this process's batch, computed in forward
    and backward passes of at most `passes` images, each weighted by its share of the batch; under DDP the
    gradients are averaged over the processes once, with the last pass. Returns the logits and the mean loss."""
    n = len(labels)
    parts = [slice(i, i + passes) for i in range(0, n, passes)] or [slice(0, 0)]
    all_logits, total = [], torch.zeros(())
    ddp = isinstance(module, nn.parallel.DistributedDataParallel)
    for k, part in enumerate(parts):
        last = k == len(parts) - 1
        with module.no_sync() if ddp and not last else contextlib.nullcontext():
            with autocast():
                logits = module(inputs[part])
                loss = loss_fn(logits.float(), labels[part])
            _stop_unless_finite(loss, epoch, step)
            share = loss * (len(labels[part]) / n) if len(parts) > 1 else loss
            (scaler.scale(share) if scaler is not None else share).backward()
        all_logits.append(logits.detach())
        total = total + share.detach().float().cpu()
    return torch.cat(all_logits), total


def _step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None) -> None:
    """An optimizer step on the gradients (through the grad scaler for float16)."""
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()


def _batch_dependent(model: nn.Module) -> bool:
    """Whether a forward pass in training mode mixes the images of a batch: a BatchNorm layer that uses the
    batch's statistics (training and not held in eval by `freeze`, or without running statistics)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm)
               and ((m.training and not is_held(m)) or m.running_mean is None) for m in model.modules())


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
