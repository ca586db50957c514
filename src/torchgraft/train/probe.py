"""A linear probe trained to convergence: multinomial logistic regression on a frozen backbone's features.

    fit_probe(features, labels, num_classes, seed, views=()) -> Probe

Full-batch L-BFGS on centred features scaled to unit variance overall, an L2 penalty chosen from `L2_GRID` by the cross-entropy on a held-out
fifth of the training images (stratified), then refitted on all of them. `views` are the features of augmented
views of the same images (row i of each is image i): they join the fit as more examples of their image's class,
those of held-out images stay out of it, and the held-out images are scored as they are. The result is expressed on the raw
features, so it is the model's classifier as it is: `head.weight = probe.weight`, `head.bias = probe.bias`.
It costs a few seconds at most; what it replaces, epochs of a classifier trained by SGD on cached features, stops
wherever the step count runs out (few images: a handful of steps).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from torchgraft.errors import GraftError

__all__ = ["Probe", "fit_probe", "held_out_split", "L2_GRID"]

#: L2 strengths tried (on standardised features, added to the mean cross-entropy as l2 / 2 * |W|^2).
L2_GRID = (1e-3, 1e-2, 1e-1, 1.0)
HELD_OUT = 0.2


@dataclass
class Probe:
    """The fitted classifier on raw features, the L2 strength chosen, and the held-out evidence for it."""

    weight: torch.Tensor
    bias: torch.Tensor
    l2: float
    held_out_loss: dict[float, float] = field(default_factory=dict)  # l2 -> held-out cross-entropy
    held_out: int = 0  # images held out to choose l2 (0: too few, the middle of the grid was used)
    part: "Probe | None" = None  # the fit on the training part alone, chosen l2 (for checks on the held-out part)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return features.float() @ self.weight.T + self.bias

    def accuracy(self, features: torch.Tensor, labels: torch.Tensor) -> float:
        return float((self.logits(features).argmax(1) == labels).float().mean()) if len(labels) else 0.0


def held_out_split(labels: torch.Tensor, seed: int, fraction: float = HELD_OUT) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit indices, held-out indices): `fraction` of each class with at least two images, at least one of each."""
    generator = torch.Generator().manual_seed(seed)
    fit, held = [], []
    for c in labels.unique().tolist():
        index = (labels == c).nonzero().flatten()
        index = index[torch.randperm(len(index), generator=generator)]
        cut = max(1, int(len(index) * fraction)) if len(index) >= 2 else 0
        held.append(index[:cut])
        fit.append(index[cut:])
    return torch.cat(fit).sort().values, torch.cat(held).sort().values


def _standardise(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean feature vector and one scale for all of them (not one per feature: a per-feature scale would
    give nearly constant features huge weights, which blow up once fine-tuning moves those features)."""
    mean = features.mean(0)
    scale = (features - mean).pow(2).mean().sqrt().clamp(min=1e-6)
    return mean, scale


def _lbfgs(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float,
           start: tuple[torch.Tensor, torch.Tensor] | None = None, iterations: int = 100
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimise mean cross-entropy + l2/2 |W|^2 over (W, b) on standardised `x`, full batch."""
    w = torch.zeros(num_classes, x.shape[1]) if start is None else start[0].clone()
    b = torch.zeros(num_classes) if start is None else start[1].clone()
    w.requires_grad_(True)
    b.requires_grad_(True)
    optimizer = torch.optim.LBFGS([w, b], lr=1, max_iter=iterations, history_size=10, tolerance_grad=1e-5,
                                  tolerance_change=1e-9, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ w.T + b, y) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return w.detach(), b.detach()


def _on_raw(w: torch.Tensor, b: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, b) on scaled features as the same classifier on raw ones: W/scale, b - W/scale . mean."""
    raw = w / std
    return raw, b - raw @ mean


def _with_views(features: torch.Tensor, views: Sequence[torch.Tensor], labels: torch.Tensor,
                index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows `index` of the features and of each view, stacked, with their labels."""
    return torch.cat([x[index] for x in [features, *views]]), labels[index].repeat(1 + len(views))


def fit_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int, seed: int = 0,
              views: Sequence[torch.Tensor] = (), refit: bool = True) -> Probe:
    """The converged probe; L2 chosen on a held-out fifth of (features, labels) when every class can spare one.
    `refit=False` stops before the fit on all of them: the result is the fit on the training part (`part`),
    for a check on the held-out part before another fit (with too few images to hold some out, there is no
    part, and the fit on all of them is the result)."""
    features = features.float()
    views = [v.float() for v in views]
    if not all(torch.isfinite(x).all() for x in [features, *views]):
        raise GraftError("the backbone's features hold NaN or infinite values, so no classifier can be fitted on "
                         "them; expected finite features. Check the weights (a NaN in them spreads to every "
                         "feature) and --image-size; nothing was trained.")
    fit, held = held_out_split(labels, seed)
    scores: dict[float, float] = {}
    part = None
    chosen = L2_GRID[len(L2_GRID) // 2]
    if len(held) >= 2 and len(fit) >= 2:
        xf, yf = _with_views(features, views, labels, fit)
        mean, std = _standardise(xf)
        xf, xh = (xf - mean) / std, (features[held] - mean) / std
        start, fits = None, {}
        for l2 in sorted(L2_GRID, reverse=True):  # strongest first, each fit warm-starting the next
            start = _lbfgs(xf, yf, num_classes, l2, start, iterations=40)  # enough to rank them
            fits[l2] = start
            scores[l2] = float(F.cross_entropy(xh @ start[0].T + start[1], labels[held]))
        chosen = min(scores, key=lambda l2: (scores[l2], -l2))
        part = Probe(*_on_raw(*fits[chosen], mean, std), chosen)
        if not refit:
            return Probe(part.weight, part.bias, chosen, scores, len(held), part)
    x, y = _with_views(features, views, labels, torch.arange(len(labels)))
    mean, std = _standardise(x)
    w, b = _lbfgs((x - mean) / std, y, num_classes, chosen)
    return Probe(*_on_raw(w, b, mean, std), chosen, scores, len(held), part)
