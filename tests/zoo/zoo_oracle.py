"""The zoo's oracle: which source tensor each target tensor should hold, found without torchgraft's matcher.

Both models run once on the same input under a `TorchFunctionMode` that records the first use of every
tensor; the modules, in that order, are zipped one to one, and within a module pair tensors of equal size pair
in order of size. The oracle is trusted only when loading by it makes the two models compute the same output
(checked by `oracle`), so a wrong oracle can never excuse a misplaced tensor.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode


class _Uses(TorchFunctionMode):
    def __init__(self, names: dict[int, str]) -> None:
        super().__init__()
        self.names, self.order, self.seen = names, [], set()

    def _visit(self, x) -> None:
        if isinstance(x, torch.Tensor):
            k = self.names.get(id(x))
            if k is not None and k not in self.seen:
                self.seen.add(k)
                self.order.append(k)
        elif isinstance(x, (list, tuple)):
            for y in x:
                self._visit(y)
        elif isinstance(x, dict):
            for y in x.values():
                self._visit(y)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self._visit(args)
        self._visit(kwargs)
        return func(*args, **kwargs)


def first_use(model: nn.Module, inputs: dict) -> list[str]:
    state = model.state_dict(keep_vars=True)
    names: dict[int, str] = {}
    for k, t in state.items():
        names.setdefault(id(t), k)
    mode = _Uses(names)
    with torch.no_grad(), mode:
        model(**inputs)
    return mode.order


def output(model: nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        y = model(**inputs)
    for attr in ("logits", "last_hidden_state"):
        if getattr(y, attr, None) is not None:
            return getattr(y, attr)
    return y[0] if isinstance(y, tuple) else y


def load_by(mapping: dict[str, str], source: dict[str, torch.Tensor], model: nn.Module) -> None:
    state = model.state_dict()
    with torch.no_grad():
        for t_key, s_key in mapping.items():
            state[t_key].copy_(source[s_key].reshape(state[t_key].shape))


def oracle(a: nn.Module, b: nn.Module, inputs: dict) -> dict[str, str] | None:
    """target key -> source key, or None when the two models are not the same computation module by module."""
    sa, sb = a.state_dict(), b.state_dict()

    def modules(order: list[str]) -> list[str]:
        return list(dict.fromkeys(k.rpartition(".")[0] for k in order))

    ma, mb = modules(first_use(a, inputs)), modules(first_use(b, inputs))
    if len(ma) != len(mb):
        return None
    mapping: dict[str, str] = {}
    for mod_a, mod_b in zip(ma, mb):
        ka = sorted((k for k in sa if k.rpartition(".")[0] == mod_a), key=lambda k: (-sa[k].numel(), k))
        kb = sorted((k for k in sb if k.rpartition(".")[0] == mod_b), key=lambda k: (-sb[k].numel(), k))
        if len(ka) != len(kb) or any(sa[x].numel() != sb[y].numel() for x, y in zip(ka, kb)):
            return None
        if len({sa[x].numel() for x in ka}) < len(ka) - sum(x.endswith("num_batches_tracked") for x in ka):
            # several tensors of one size in a module (a BatchNorm's four): pair them by local name
            by_local = {x.rpartition(".")[2]: x for x in ka}
            pairs = [(by_local.get(y.rpartition(".")[2]), y) for y in kb]
            if any(x is None for x, _ in pairs):
                return None
        else:
            pairs = list(zip(ka, kb))
        mapping.update({y: x for x, y in pairs})
    return mapping
