"""What a run does, derived from the data and the budget before it starts: one rule, written down once.

    plan_recipe(config, n_train, n_val, num_classes, native, budget_steps=None, world=1) -> Recipe

The budget is what the seeds' hand-written loop spends for the same `--epochs`: that many passes of training
steps of `--batch-size` (32) images over the training images, and one pass over the validation images; with
`--time-budget`, the training steps that fit in the minutes left, at the seconds a step took on this machine
(`budget_steps`, measured by the loop before it plans). Everything `graft finetune` does is counted in
training steps of 32 images (`DEFAULT_BATCH`): a step of b images costs (b + `STEP_OVERHEAD`) / (32 +
`STEP_OVERHEAD`) of one (`step_cost`; an epoch's last, partial step its own images, on both sides:
`epoch_cost`, `last_step`), a forward pass without gradients about a third of an image's share of one
(`FORWARD_COST`):

1. a linear probe first (`linear_probe` unset or true): the frozen backbone's features of the training and
   validation images, computed once, and a classifier fitted on them to convergence (`probe.fit_probe`);
   when flips are left to the data, the features of the held-out fifth of train again, mirrored and not;
   with few images per class, the features of augmented views of them too (`probe_views`);
2. a fine-tune of everything from the probed head (LP-FT, Kumar et al. 2022) with what the budget has left,
   when that is at least half an epoch and at least `MIN_FINE_TUNE_STEPS`, and there are at least
   `MIN_FINE_TUNE_PER_CLASS` training images per class; else the probe alone. Its last
   epoch may stop early, at the budget. Its batch (`batch_size`) is the given one, or 32, or on a small
   training set the one that gives an epoch `MIN_EPOCH_STEPS` steps, at least `MIN_BATCH`: BatchNorm is
   frozen after the probe, so no layer depends on the batch's size, and more, smaller steps for the same
   compute train further;
3. validation after every k-th epoch and always after the last, k as small as keeps all the validations within
   `VALIDATION_SHARE` of the training's steps (`validation_every`): after every epoch on enough images, once
   at the end of a short fine-tune on few, so a large validation set and a small training set do not spend
   the budget on measuring;
4. warmup counted in steps (10% of each phase's steps, at most 100), cosine decay to zero at the phase's end;
5. the backbone at a fifth of the classifier's learning rate after a probe (its BatchNorm frozen), half of it
   without one (`backbone_lr_mult`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torchgraft.train.config import FinetuneConfig
from torchgraft.train.data import crops_for
from torchgraft.train.probe import HELD_OUT

__all__ = ["Recipe", "plan_recipe", "batch_size", "step_cost", "epoch_cost", "last_step", "steps_cost",
           "validation_every", "forward_cost", "fine_tune_steps", "probe_views", "backbone_lr_mult", "FORWARD_COST",
           "STEP_OVERHEAD", "VALIDATION_SHARE"]

FORWARD_COST = 1 / 3
#: A training step's fixed cost, in images (the optimizer's step, the batch's augmentation, each
#: pass's fixed cost): fine-tuning MobileNetV2 at 64 px on 2 CPU threads ran 192 images/s in steps of 32 and 128
#: in steps of 9, about 32 ms a step plus 4.2 ms an image. Larger images make it a smaller share, so there it
#: overcharges small batches: the run ends sooner than its budget, not later.
STEP_OVERHEAD = 8
DEFAULT_BATCH = 32
#: The default batch after a probe: at most `DEFAULT_BATCH`, at least `MIN_BATCH`, else as many images as give
#: an epoch `MIN_EPOCH_STEPS` steps. Measured on the panel's data (graft's kept model, --epochs 10, seeds 0-2;
#: 0-1 for batches of 32 on the last two) against batches of 32: 20 digits per class 0.925 -> 0.954, 10 per class
#: 0.826 -> 0.878, 10 per class at 64 px 0.820 -> 0.846, photographs 10 per class 0.856 either way. From 745
#: training images the batch is 32.
MIN_EPOCH_STEPS = 24
MIN_BATCH = 8
#: The validations of a training together cost at most this share of its steps (`validation_every`), and it
#: validates once at least, after its last epoch.
VALIDATION_SHARE = 0.2
MAX_WARMUP = 100
#: The backbone's learning rate as a fraction of the classifier's: after a probe BatchNorm stays frozen, and
#: AdamW's first steps move every weight by about the learning rate whatever its gradient, with no batch
#: statistics to absorb the shift. At 0.5 the fine-tune fell to chance on digits (full data with --epochs 1:
#: 0.206 after its epoch, 0.824 at 0.2; 20 per class: 0.471, 0.944 at 0.2); the guide has the seven rows.
PROBED_BACKBONE_LR_MULT = 0.2
TRAINED_BN_BACKBONE_LR_MULT = 0.5
#: The shortest fine-tune worth its time: on the panel, fine-tunes of 5, 6 and 15 steps after the probe never
#: beat it (photographs 5 per class, digits 10 and 5 per class), those of 31-37 steps did on photographs
#: (0.792 -> 0.835), and 60 steps did on digits (20 per class, 0.886 -> 0.944). Below it the probe runs alone and
#: the rest of the budget is not spent.
MIN_FINE_TUNE_STEPS = 20
#: The fewest training images per class (on average) worth a fine-tune after the probe: with 5 digits per
#: class, fine-tunes of 38 steps of 8 images (about 6 epochs) never beat the probe before them (0.51-0.73
#: against 0.77-0.78, three seeds of the panel), with 10 per class they did on digits in 8 of 9 runs (at 8 and
#: 64 px, torchvision's and timm's MobileNetV2). Below it the probe runs alone.
MIN_FINE_TUNE_PER_CLASS = 10
#: Augmented views for the probe: with few images per class it overfits them, and the features of random crops
#: (and flips) of the same images are more examples of each class. The probe sees each training image and up to
#: `PROBE_VIEWS` views of it, as many as bring it to `PROBE_IMAGES_PER_CLASS` examples per class, within
#: `PROBE_VIEWS_SHARE` of the budget. Measured on the panel's data (held-out validation accuracy of the probe, no
#: views -> 3-5 views): photographs 10 per class 0.792 -> 0.835-0.865, 5 per class 0.708 -> 0.785-0.804; all
#: photographs (60 per class), 20 digits per class and all digits within 0.5 points either way. Crops that keep
#: at least `PROBE_VIEWS_CROP` of the area (images under 35 px) make views that are the image again: none then.
PROBE_VIEWS = 4
PROBE_IMAGES_PER_CLASS = 50
PROBE_VIEWS_SHARE = 1 / 3
PROBE_VIEWS_CROP = 0.9


@dataclass
class Recipe:
    probe: bool
    """Fit a linear probe on cached features before training on images."""
    steps_per_epoch: int
    """Training steps in one pass over the training images (global batches)."""
    batch: int
    """Images per training step over all processes (the global batch)."""
    total_steps: int
    """Training steps on images in the whole run (0: the probe alone)."""
    head_epochs: int
    """Epochs on images that train only the classifier before everything unfreezes."""
    validate_every: int
    """Validate after every k-th epoch on images (and after the last)."""
    views: int
    """Augmented views of each training image the probe also fits on (0: the images as they are)."""
    why: str
    """The rule's reasoning, one sentence, for the console and the guide."""

    @property
    def epochs(self) -> int:
        """Epochs that train on images; the last stops at `total_steps`."""
        return math.ceil(self.total_steps / self.steps_per_epoch) if self.total_steps else 0

    def steps_in(self, epoch: int) -> int:
        """Training steps of epoch `epoch` (counted from 1)."""
        return max(0, min(self.steps_per_epoch, self.total_steps - (epoch - 1) * self.steps_per_epoch))

    def validates(self, epoch: int) -> bool:
        return epoch == self.epochs or epoch % self.validate_every == 0


def backbone_lr_mult(config: FinetuneConfig) -> float:
    """--backbone-lr-mult, or the rule: `PROBED_BACKBONE_LR_MULT` after a linear probe (BatchNorm frozen),
    `TRAINED_BN_BACKBONE_LR_MULT` without one."""
    if config.backbone_lr_mult is not None:
        return config.backbone_lr_mult
    return TRAINED_BN_BACKBONE_LR_MULT if config.linear_probe is False else PROBED_BACKBONE_LR_MULT


def batch_size(config: FinetuneConfig, n_train: int, world: int = 1) -> int:
    """--batch-size, or the rule (see `MIN_EPOCH_STEPS`): `DEFAULT_BATCH`, or after a probe on few images the
    batch that gives an epoch `MIN_EPOCH_STEPS` steps, at least `MIN_BATCH`; rounded up to a multiple of the
    `world` processes, so that every process takes an equal share of each step."""
    if config.batch_size is not None:
        return config.batch_size
    if config.linear_probe is False:  # BatchNorm trains on batch statistics: the seeds' batch
        return max(DEFAULT_BATCH, world)
    batch = max(MIN_BATCH, min(DEFAULT_BATCH, math.ceil(n_train / MIN_EPOCH_STEPS)))
    return math.ceil(batch / world) * world


def step_cost(batch: int) -> float:
    """A training step of `batch` images, in training steps of `DEFAULT_BATCH` images (the recipe's unit)."""
    return (batch + STEP_OVERHEAD) / (DEFAULT_BATCH + STEP_OVERHEAD)


def epoch_cost(n_train: int, batch: int) -> float:
    """One pass over `n_train` images in steps of `batch`, in the recipe's unit: whole steps, and the last,
    partial one at its own images (`last_step`; 100 images in steps of 32: 3.3 steps, not 4)."""
    return (math.ceil(n_train / batch) - 1 + last_step(n_train, batch)) * step_cost(batch)


def forward_cost(images: float) -> float:
    """Forward passes without gradients over `images` images, in the recipe's unit (`FORWARD_COST`)."""
    return images * FORWARD_COST / DEFAULT_BATCH


def warmup_steps(config: FinetuneConfig, phase_steps: int) -> int:
    if config.warmup_steps is not None:
        return min(config.warmup_steps, max(phase_steps - 1, 0))
    return min(MAX_WARMUP, max(1, round(0.1 * phase_steps)))


def probe_views(config: FinetuneConfig, n_train: int, num_classes: int, native: int, budget: float) -> int:
    """Augmented views of each training image for the probe (see `PROBE_VIEWS`): none without augmentation, or
    when crops of `native`-px images keep nearly all of them, or with enough images per class."""
    if not config.augment or crops_for(native, False).min_area >= PROBE_VIEWS_CROP:
        return 0
    wanted = math.ceil(PROBE_IMAGES_PER_CLASS * num_classes / max(n_train, 1)) - 1
    cost = forward_cost(n_train)  # a view of every image
    return max(0, min(PROBE_VIEWS, wanted, math.floor(PROBE_VIEWS_SHARE * budget / max(cost, 1e-9))))


def fine_tune_steps(available: float, per_epoch: int, val_steps: float, every: int,
                    last: float = 1.0) -> tuple[int, int]:
    """The most training steps, and the validations they bring (after every `every`-th epoch and the last),
    that fit in `available` steps together: (0, 0) when not even one step does. An epoch's last step costs
    `last` of a step (a partial batch: `last_step`)."""
    cheaper = 1 - last  # what each finished epoch saves on its last step
    for epochs in range(max(1, math.ceil(available / (per_epoch - cheaper))), 0, -1):
        validations = math.ceil(epochs / every)
        room = available - validations * val_steps + (epochs - 1) * cheaper  # the finished epochs' last steps
        whole = epochs * per_epoch
        steps = whole if room >= whole - cheaper - 1e-9 else min(whole - 1, math.floor(room))
        if steps > (epochs - 1) * per_epoch:
            return steps, validations
    return 0, 0


def validation_every(available: float, per_epoch: int, val_steps: float) -> int:
    """Validate after every k-th epoch (and the last) of a training of `available` steps: as often as keeps the
    validations within `VALIDATION_SHARE` of those steps, and once at least."""
    epochs = max(1, math.ceil(available / per_epoch))
    validations = max(1, math.floor(VALIDATION_SHARE * max(available, 0) / max(val_steps, 1e-9)))
    return max(1, math.ceil(epochs / validations))


def steps_cost(steps: int, per_epoch: int, last: float = 1.0) -> float:
    """What `steps` training steps cost, in steps, when each epoch's last one costs `last` of one."""
    return steps - (steps // per_epoch) * (1 - last)


def last_step(n_train: int, batch: int) -> float:
    """An epoch's last step, of the images left over, as a share of a whole step of `batch` (1: none left over)."""
    return step_cost(n_train - (math.ceil(n_train / batch) - 1) * batch) / step_cost(batch)


def plan_recipe(config: FinetuneConfig, n_train: int, n_val: int, num_classes: int, native: int,
                budget_steps: float | None = None, world: int = 1) -> Recipe:
    """The recipe for `config` on `n_train` training and `n_val` validation images of `num_classes` classes,
    `native` px in their files, over `world` processes (see the module's rule); `budget_steps`: the budget of
    `--time-budget`, in training steps of `batch_size(config, n_train, world)` images, instead of `--epochs`.
    Costs are in steps of `DEFAULT_BATCH` images (`step_cost`) until they become steps of the run's batch."""
    batch = batch_size(config, n_train, world)
    step = step_cost(batch)
    per_epoch = math.ceil(n_train / batch)
    last = last_step(n_train, batch)
    val_cost = forward_cost(n_val)
    if budget_steps is None:
        epochs = config.epochs
        loop_batch = config.batch_size or DEFAULT_BATCH
        loop_steps = epochs * math.ceil(n_train / loop_batch)
        budget = epochs * epoch_cost(n_train, loop_batch) + val_cost  # the seeds' loop: its epochs, a validation
        on_images = epochs * per_epoch  # without a probe (the loop's batch)
        every = validation_every(on_images, per_epoch, val_cost / step)
        spent = f"the budget of {epochs} epoch(s) ({loop_steps} steps of {loop_batch} images)"
    else:
        budget = budget_steps * step
        every = validation_every(budget / step, per_epoch, val_cost / step)
        on_images = max(1, fine_tune_steps(budget / step, per_epoch, val_cost / step, every, last)[0])  # one at least
        epochs = math.ceil(on_images / per_epoch)
        spent = (f"the budget of {config.time_budget:g} minute(s) ({math.floor(budget_steps)} steps of {batch} "
                 "images at the seconds this machine took for one)")
    views = probe_views(config, n_train, num_classes, native, budget) if config.linear_probe is not False else 0
    seen = (f"; the probe also sees {views} augmented view(s) of each training image ({n_train} images of "
            f"{num_classes} classes)" if views else "")
    if config.linear_probe:
        return Recipe(True, per_epoch, batch, 0, 0, every, views, "--linear-probe: the probe alone" + seen)
    if config.linear_probe is False:
        head = config.head_epochs if config.head_epochs is not None else min(epochs - 1, epochs // 5)
        head = min(head, epochs - 1) if budget_steps is not None else head
        return Recipe(False, per_epoch, batch, on_images, head, every, 0,
                      f"--no-linear-probe: {epochs} epochs on images ({on_images} steps), the first {head} for "
                      "the classifier alone" + ("" if budget_steps is None else f"; {spent}"))
    probe_cost = forward_cost(n_train * (1 + views) + n_val)
    if config.hflip is None and config.augment:  # the flip test: the held-out fifth, as it is and mirrored
        probe_cost += forward_cost(2 * HELD_OUT * n_train)
    available = (budget - probe_cost) / step
    every = validation_every(available, per_epoch, val_cost / step)
    left, validations = fine_tune_steps(available, per_epoch, val_cost / step, every, last)
    head = config.head_epochs or 0
    if n_train < MIN_FINE_TUNE_PER_CLASS * num_classes:
        return Recipe(True, per_epoch, batch, 0, 0, every, views,
                      f"{n_train} training images of {num_classes} classes, under {MIN_FINE_TUNE_PER_CLASS} per "
                      "class, are too few for a fine-tune to beat the probe: the probe alone" + seen)
    if left < max(MIN_FINE_TUNE_STEPS, per_epoch / 2):
        return Recipe(True, per_epoch, batch, 0, 0, every, views,
                      f"{spent} leaves {max(left, 0)} training steps after the probe, under half an epoch "
                      f"({per_epoch} steps) or under {MIN_FINE_TUNE_STEPS}: the probe alone" + seen)
    batched = "" if config.batch_size is not None or batch == DEFAULT_BATCH else (
        f" in batches of {batch} images (an epoch of {per_epoch} steps: {n_train} training images)")
    return Recipe(True, per_epoch, batch, left, head, every, views,
                  f"{spent} leaves {left} steps{batched} ({left / per_epoch:.1f} epochs) after the probe and "
                  f"{validations} validation(s): the probe, then everything fine-tunes from the probed head" + seen)
