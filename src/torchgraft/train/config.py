"""The fine-tuning configuration: one dataclass, a docstring per field, checked as a whole before anything runs."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from torchgraft.errors import GraftError, UsageError

__all__ = ["FinetuneConfig"]


@dataclass
class FinetuneConfig:
    """What `graft finetune` does; every field is also a command-line flag (`batch_size` -> `--batch-size`)."""

    model: str = ""
    """Model spec, e.g. `torchvision:mobilenet_v2` or `timm:resnet50`; its classifier is resized to the data."""
    weights: str = ""
    """Pretrained checkpoint to start from (any format `graft inspect` reads)."""
    data: str = ""
    """Image folder: DIR/train/<class>/* and DIR/val/<class>/*, or DIR/<class>/* split by `val_split`."""
    out: str = ""
    """Run folder for model.safetensors, last.ckpt, metrics.jsonl, config.yaml, classes.txt and plots."""
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for the model factory (num_classes is set from the data)."""
    epochs: int = 5
    """The budget: what a plain training loop spends in this many epochs (passes of training steps over the
    training images, then one validation). The linear probe and validation are paid from it; the fine-tune gets
    the rest."""
    time_budget: float | None = None
    """The budget in minutes of wall time instead of --epochs: graft times a training step on this machine once
    the images are decoded, and plans the recipe for the steps that fit in the minutes left (the probe,
    validations and the final files paid from them, as with --epochs). A plan, not a deadline: the run is not cut
    off if it turns out slower than its measured step."""
    head_epochs: int | None = None
    """Epochs on images that train only the classifier (backbone frozen; see train_bn) before everything
    unfreezes. Default: none after a linear probe (it fitted the classifier already); a fifth of --epochs with
    --no-linear-probe."""
    batch_size: int | None = None
    """Images per step over all processes (the global batch): under torchrun each of N processes takes 1/N.
    Default: 32, or after a linear probe on a small training set the batch that gives an epoch 24 steps, at
    least 8 and a multiple of the processes (the recipe's rule, `recipe.batch_size`)."""
    lr: float = 1e-3
    """AdamW learning rate of the classifier; the backbone gets lr * backbone_lr_mult once unfrozen."""
    backbone_lr_mult: float | None = None
    """Discriminative learning rate: the backbone's lr as a fraction of the classifier's. Default: 0.2 after a
    linear probe (its BatchNorm layers stay frozen, so nothing re-normalises what the weights' steps move), 0.5
    with --no-linear-probe (BatchNorm trains)."""
    layer_decay: float | None = None
    """Layer-wise learning-rate decay once the backbone trains (timm-style): each block closer to the input gets
    this factor more; the classifier keeps lr (e.g. 0.9; off by default)."""
    weight_decay: float = 0.05
    """AdamW weight decay; norm layers and biases get none."""
    label_smoothing: float = 0.1
    """Cross-entropy label smoothing."""
    warmup_steps: int | None = None
    """Linear warmup steps at the start of each phase on images, then cosine decay to zero; each unfreezing
    starts a phase. Default: 10% of the phase's steps, at most 100."""
    image_size: int | None = None
    """Input size; default from the model's metadata (timm pretrained_cfg, torchvision weights)."""
    val_split: float | None = None
    """Fraction of each class held out for validation when DATA has no train/ and val/ (default 0.2)."""
    augment: bool = True
    """Random crops on tensors while fine-tuning, their strength from the images' native size (an 8 px scan
    is barely cropped, a 224 px photo down to 35% of its area), and flips (see hflip)."""
    hflip: bool | None = None
    """Random horizontal flips when augmenting. Default: decided by the data: on when the linear probe
    classifies mirrored held-out training images nearly as well as the originals (photos), off when mirroring
    hurts (digits, text, anything with a handedness)."""
    linear_probe: bool | None = None
    """Default: a linear probe first (the frozen backbone's features computed once, a classifier fitted to
    convergence by L-BFGS, its L2 strength chosen on a held-out fifth of train), then everything fine-tunes
    from the probed head with the rest of the budget when at least half an epoch and 20 steps are left (LP-FT).
    `--linear-probe`: the probe alone. `--no-linear-probe`: no probe; the classifier trains on images,
    --head-epochs first, then everything."""
    cache_gb: float = 4.0
    """Memory for the decoded images, resized to the input size, as uint8 (never more than a quarter of the
    machine's); a larger folder is decoded from its files for every batch."""
    checkpoint_every: float = 60.0
    """Seconds between last.ckpt writes at least (one is also written after every validation and after the
    last epoch); 0 writes one after every epoch."""
    freeze: list[str] = field(default_factory=list)
    """Extra parameter/module globs kept frozen for the whole run (e.g. `features.0.*`)."""
    unfreeze: list[str] = field(default_factory=list)
    """Globs that train from the first epoch together with the classifier (e.g. `layer4.*`)."""
    unfreeze_at: list[str] = field(default_factory=list)
    """Gradual unfreezing steps EPOCH:PATTERN, epochs counted from 1 as on the console: `2:layer4.*` unfreezes
    layer4 when epoch 2 starts, `3:*` everything at epoch 3; replaces the default two phases."""
    train_bn: bool = True
    """While the backbone is frozen, keep its norm layers training (affine parameters and statistics), as fastai
    does: the features then do not jump when the backbone unfreezes. A linear probe always holds them in eval."""
    lr_mult: dict[str, float] = field(default_factory=dict)
    """Extra learning-rate factors by glob: `--lr-mult 'layer4.*=0.5' 'layer3.*=0.25'`, or a JSON object
    `'{"layer4.*": 0.5}'`; in a config file, a list such as `["layer4.*=0.5"]`."""
    seed: int = 0
    """Seed for data order, augmentation and the new classifier's initialisation."""
    workers: int | None = None
    """Data loader worker processes; default 2 on CUDA, 0 on the CPU, where the math already keeps every core
    busy and loader processes would compete with it."""
    device: str = "auto"
    """`auto` (CUDA when present), `cpu` or `cuda`."""
    key: str | None = None
    """Entry of a training checkpoint to take the weights from (e.g. `ema`)."""

    def __post_init__(self) -> None:
        problems = []
        missing = [f"--{name}" for name in ("model", "weights", "data", "out") if not getattr(self, name)]
        if missing:
            problems.append(f"missing required {', '.join(missing)}")
        if self.epochs < 1:
            problems.append(f"`--epochs {self.epochs}` must be at least 1")
        if self.time_budget is not None and not self.time_budget > 0:
            problems.append(f"`--time-budget {self.time_budget}` must be a positive number of minutes")
        if self.time_budget is not None and self.unfreeze_at:
            problems.append("`--unfreeze-at` names epochs, which --time-budget does not know before the run has "
                            "timed a step; use --epochs with --unfreeze-at")
        if self.head_epochs is not None and self.time_budget is None and not 0 <= self.head_epochs <= self.epochs:
            problems.append(f"`--head-epochs {self.head_epochs}` must be between 0 and --epochs ({self.epochs})")
        if self.batch_size is not None and self.batch_size < 1:
            problems.append(f"`--batch-size {self.batch_size}` must be at least 1")
        if not self.lr > 0:
            problems.append(f"`--lr {self.lr}` must be positive")
        if self.backbone_lr_mult is not None and not self.backbone_lr_mult > 0:
            problems.append(f"`--backbone-lr-mult {self.backbone_lr_mult}` must be positive")
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            problems.append(f"`--layer-decay {self.layer_decay}` must be in (0, 1]")
        if self.workers is not None and self.workers < 0:
            problems.append(f"`--workers {self.workers}` must be 0 or more")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            problems.append(f"`--warmup-steps {self.warmup_steps}` must be 0 or more")
        if not self.cache_gb >= 0:
            problems.append(f"`--cache-gb {self.cache_gb}` must be 0 or more")
        if not self.checkpoint_every >= 0:
            problems.append(f"`--checkpoint-every {self.checkpoint_every}` must be 0 or more seconds")
        if self.image_size is not None and self.image_size < 8:
            problems.append(f"`--image-size {self.image_size}` must be at least 8")
        if self.val_split is not None and not 0 < self.val_split < 1:
            problems.append(f"`--val-split {self.val_split}` must be between 0 and 1")
        if self.device not in ("auto", "cpu", "cuda"):
            problems.append(f"`--device {self.device}` must be auto, cpu or cuda")
        if self.linear_probe and self.unfreeze_at:
            problems.append("`--linear-probe` keeps the backbone frozen; it cannot be combined with `--unfreeze-at`")
        for step in self.unfreeze_at:
            epoch, sep, pattern = step.partition(":")
            if not sep or not epoch.isdigit() or not pattern:
                problems.append(f"`--unfreeze-at {step}` must read EPOCH:PATTERN, e.g. 2:layer4.*")
            elif not 1 <= int(epoch) <= self.epochs:
                problems.append(f"`--unfreeze-at {step}`: epochs count from 1, as on the console; expected an "
                                f"epoch from 1 to --epochs ({self.epochs})")
        if problems:
            raise UsageError("; ".join(problems) + ".")

    def unfreeze_steps(self) -> list[tuple[int, str]]:
        """(epoch counted from 1, pattern) for each `--unfreeze-at` step."""
        return [(int(e), p) for e, _, p in (s.partition(":") for s in self.unfreeze_at)]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FinetuneConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise GraftError(f"config has unknown keys {unknown}; expected keys among {sorted(known)}.")
        return cls(**data)
