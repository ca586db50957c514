"""Structure matching: pair a checkpoint's modules with a target model's modules when their names differ.

A *group* is one module's own tensors (`Group`). Two groups are *compatible* when their signatures are equal:
the same local tensor names, each with the same shape (BatchNorm buffers included; `num_batches_tracked` is
optional because old files lack it), and the same module class when the class is known on both sides.
`align(source, target)` pairs target groups with source groups and never guesses:

1. **unique-signature**: a signature that occurs exactly once among the groups of each side is a match,
   wherever the two groups sit (a head registered before the backbone still matches).
2. The unique matches that keep both orders (the longest chain of them increasing in both) cut the two
   sequences into regions; a region is aligned with gaps for inserted or removed modules, maximising the
   number of compatible pairs:
   - **aligned**: a pair that occurs in *every* optimal alignment (two identical signature sequences are
     paired position by position);
   - **aligned+names**: the pair occurs in every optimal alignment that also has the most alike module paths
     (summed over its pairs: the longest common subsequence of the paths' tokens, split on `.`, `_` and
     letter/digit boundaries, digits included), so every alternative for this group is strictly worse on names;
   - **ambiguous**: the target group fits several sources equally well (or one source and no source at all);
     `candidates` lists them and nothing is loaded.
3. Groups with different signatures are never paired; anything left is **unmatched**.

Each region's alignment is an exact dynamic programme restricted to the band of diagonals that optimal
alignments can reach, so a long region that differs by a few modules costs O(length x differences). A region
whose band would exceed `MAX_DP_CELLS` cells is not aligned: its groups are reported ambiguous with every
compatible source of the region as candidates (or unmatched when there is none).

Order matters: source order is the checkpoint's tensor order, target order is `named_modules` order. A
safetensors file stores its keys sorted as strings (`blocks.10` before `blocks.2`, `bias` before `weight`), so
its module order is lost; `natural_order` restores numeric order, and the target should then be put in the
same canonical order (`groups_from_keys(natural_order(sorted(target_keys)))`) before aligning.

Within a matched pair, load tensors by local name (`tensor_pairs`), not by position: the names are equal by
construction, while their order is not (a sorted file stores `bias` before `weight`).
"""

from __future__ import annotations

import re
from bisect import bisect_left
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence, Set
from dataclasses import dataclass

from torch import nn

from torchgraft.adapt import canonical_shape
from torchgraft.match.names import BENIGN_TENSORS

__all__ = [
    "MAX_DP_CELLS",
    "OPTIONAL_TENSORS",
    "Group",
    "GroupMatch",
    "align",
    "block_of",
    "check_blocks",
    "compatible",
    "fuse_projections",
    "fused_layout",
    "split_containers",
    "groups_from_keys",
    "groups_from_model",
    "natural_order",
    "order_known",
    "settle_by_flow",
    "signature",
    "tensor_pairs",
]

OPTIONAL_TENSORS = frozenset(BENIGN_TENSORS)
"""Local tensor names that may be missing on one side without making two groups incompatible."""

MAX_DP_CELLS = 160_000
"""Most dynamic-programming cells one region may use (a full 400 x 400 region); larger regions are reported
ambiguous rather than aligned."""

Signature = tuple[tuple[str, tuple[int, ...]], ...]


@dataclass(frozen=True)
class Group:
    """One module's own tensors."""

    name: str
    """Module path: `"layer1.0.conv1"` (`""` for the root)."""
    tensors: tuple[tuple[str, tuple[int, ...]], ...]
    """(local tensor name, shape) in state_dict order, e.g. `(("weight", (64, 3, 7, 7)),)`."""
    kind: str | None = None
    """Module class name (`"Conv2d"`) when known, else None."""


@dataclass
class GroupMatch:
    """What `align` decided for one target group."""

    target: int
    """Index into the target groups."""
    source: int | None
    """Index into the source groups when matched unambiguously, else None."""
    candidates: list[int]
    """When ambiguous: the source indices that fit equally well (`source` is None); empty otherwise. A single
    candidate means that some optimal alignments give it and others leave the group unmatched."""
    how: str
    """"unique-signature" | "aligned" | "aligned+names" | "ambiguous" | "unmatched"."""


# --------------------------------------------------------------------------------------------------------------
# groups


def groups_from_keys(shapes: Mapping[str, Sequence[int]], kinds: Mapping[str, str] | None = None) -> list[Group]:
    """Group tensor keys by module path (everything before the last dot), in order of first occurrence.

    `shapes` maps full tensor keys to shapes (tuples or `torch.Size`), in the file's or state_dict's order.
    `kinds` maps module paths to class names when known (a model's `named_modules`, a whole-model pickle).
    """
    tensors: dict[str, list[tuple[str, tuple[int, ...]]]] = {}
    for key, shape in shapes.items():
        path, _, local = key.rpartition(".")
        tensors.setdefault(path, []).append((local, tuple(int(d) for d in shape)))
    kinds = kinds or {}
    return [Group(path, tuple(own), kinds.get(path)) for path, own in tensors.items()]


def groups_from_model(model: nn.Module) -> list[Group]:
    """A model's groups in `named_modules` order: each module's own parameters and persistent buffers (its
    state_dict keys), with `kind` = the module's class name; modules without tensors are skipped."""
    shapes = {key: tuple(t.shape) for key, t in model.state_dict(keep_vars=True).items()}
    kinds = {name: type(m).__name__ for name, m in model.named_modules(remove_duplicate=False)}
    return groups_from_keys(shapes, kinds)


#: Local tensor names that libraries spell differently for one role, by family: a documented table, the only
#: place such names are known (ConvNeXt's layer scale is torchvision's `layer_scale`, timm's `gamma`,
#: Hugging Face's `layer_scale_parameter`; a ViT's class token and position embedding likewise).
NAME_FAMILIES = {
    "gamma": "layer_scale", "layer_scale_parameter": "layer_scale",
    "class_token": "cls_token",
    "pos_embedding": "pos_embed", "position_embeddings": "pos_embed",
    "in_proj_weight": "weight", "in_proj_bias": "bias",  # torch's MultiheadAttention: a fused [Q; K; V]
    # a fused projection whose parts do not all have a bias keeps the others on its attention module (timm's
    # BEiT, EVA: q_bias, v_bias, no k bias); the separate side has them on its q and v projections
    "q_bias": "bias", "k_bias": "bias", "v_bias": "bias",
    "lambda_1": "gamma_1", "lambda_2": "gamma_2",  # per-branch layer scale (timm's gamma_1 / Hugging Face's)
}

#: Module names of separate attention projections, by the part of a blocked [Q; K; V] each holds. Separate
#: projections that follow each other under one module (q, k, v) are aligned as one fused group, so that they
#: meet a fused `qkv` (timm) or `in_proj` (torch's MultiheadAttention), whose layout is blocked: the rows of
#: Q, then K, then V. Layouts that interleave heads (GPT-NeoX's `query_key_value`) are not in this table.
PROJECTION_PARTS = {
    "q": "q", "query": "q", "q_proj": "q",
    "k": "k", "key": "k", "k_proj": "k",
    "v": "v", "value": "v", "v_proj": "v",
}
FUSED_ORDERS = (("q", "k", "v"), ("k", "v"))

#: Fused projections by name family, and the layout of their rows: "blocked" is all of Q, then K, then V (timm's
#: `qkv`, torch's MultiheadAttention `in_proj_weight`, GPT-2's `c_attn`, MosaicML's `Wqkv`); "heads" interleaves
#: them head by head (GPT-NeoX's `query_key_value`: [h1 q, h1 k, h1 v, h2 q, ...]), which no adapter cuts yet.
#: A fused projection of another name is not split or joined: its layout is unknown, and a rule says it.
FUSED_LAYOUTS = {
    "qkv": "blocked", "kv": "blocked", "in_proj": "blocked", "in_proj_weight": "blocked", "c_attn": "blocked",
    "Wqkv": "blocked", "qkv_proj": "blocked", "query_key_value": "heads",
}


def fused_layout(group: Group) -> str | None:
    """The row layout of a fused projection group (`FUSED_LAYOUTS`, by module name or, for a container's own
    tensors, by tensor name), or None when its family is unknown."""
    for local, _ in group.tensors:
        if local in FUSED_LAYOUTS:
            return FUSED_LAYOUTS[local]
    return FUSED_LAYOUTS.get(group.name.rpartition(".")[2])


def family(name: str) -> str:
    """A local tensor name's family (`NAME_FAMILIES`), or the name itself."""
    return NAME_FAMILIES.get(name, name)


def signature(group: Group) -> Signature:
    """The group's local tensor names (by family, `NAME_FAMILIES`), each with its shape without size-1
    dimensions (`canonical_shape`), sorted by name; optional tensors (`num_batches_tracked`) are left out unless
    the group has nothing else."""
    kept = [(n, s) for n, s in group.tensors if n not in OPTIONAL_TENSORS] or list(group.tensors)
    return tuple(sorted((family(n), canonical_shape(s)) for n, s in kept))


def compatible(a: Group, b: Group) -> bool:
    """Equal signatures, and equal kinds when both kinds are known."""
    return signature(a) == signature(b) and (a.kind is None or b.kind is None or a.kind == b.kind)


def tensor_pairs(source: Group, target: Group) -> list[tuple[str, str]]:
    """(source local name, target local name) for each target tensor that has a source tensor, in target order.

    Pairs by name (by family, `NAME_FAMILIES`): compatible groups have the same names. An optional tensor
    (`num_batches_tracked`) missing from the source is left out, so the target keeps its own.
    """
    have = {family(n): n for n, _ in source.tensors}
    return [(have[family(n)], n) for n, _ in target.tensors if family(n) in have]


def ancestors(modules: Iterable[str]) -> set[str]:
    """Every module path that is a proper ancestor of one of `modules` (`""` for the root)."""
    out: set[str] = set()
    for name in modules:
        if not name:
            continue
        parts = name.split(".")
        for depth in range(len(parts)):
            out.add(".".join(parts[:depth]))
    return out


def split_containers(groups: Sequence[Group]) -> list[Group]:
    """Tensors a container owns beside its submodules (a ViT's `cls_token`, `pos_embed`; a block's layer scale)
    each as a group of its own: libraries keep them on different containers (torchvision's ViT has its class
    token on the model and its position embedding on the encoder, timm both on the model), so they pair one by
    one, by name family and shape."""
    containers = ancestors(g.name for g in groups)
    out: list[Group] = []
    for g in groups:
        if g.name in containers and len(g.tensors) > 1:
            weighted = any(family(t[0]) == "weight" for t in g.tensors)
            paired = tuple(t for t in g.tensors if weighted and family(t[0]) in ("weight", "bias"))  # in_proj's
            if paired:
                out.append(Group(g.name, paired, g.kind))
            out.extend(Group(g.name, (t,), g.kind) for t in g.tensors if t not in paired)
        else:
            out.append(g)
    return out


def fuse_projections(groups: Sequence[Group]) -> tuple[list[Group], dict[str, list[Group]]]:
    """Groups with each run of separate projections (`PROJECTION_PARTS`, in a `FUSED_ORDERS` order, siblings
    with equal tensors: weight `(D, I)`, bias `(D,)`) replaced by one virtual group as a blocked fused one would
    be (weight `(k*D, I)`), placed where the first stood; and virtual name -> the groups it stands for. When only
    some parts have a bias (no k bias), the virtual group is the weight alone, after one group per bias: a fused
    model keeps those biases as tensors of their own (`q_bias`, `v_bias`, the `NAME_FAMILIES` of `bias`)."""
    out: list[Group] = []
    virtual: dict[str, list[Group]] = {}
    i = 0
    while i < len(groups):
        if groups[i].name.rpartition(".")[2] not in PROJECTION_PARTS:
            out.append(groups[i])
            i += 1
            continue
        for order in FUSED_ORDERS:
            run = list(groups[i:i + len(order)])
            if len(run) == len(order) and _projection_run(run, order):
                parent = run[0].name.rpartition(".")[0]
                name = _join_name(parent, "{" + ",".join(g.name.rpartition(".")[2] for g in run) + "}")
                biased = [any(n == "bias" for n, _ in g.tensors) for g in run]
                if all(biased) or not any(biased):
                    fused = tuple((n, (shape[0] * len(order), *shape[1:])) for n, shape in run[0].tensors)
                    out.append(Group(name, fused))
                    virtual[name] = run
                else:  # biases on some parts only (no k bias): the fused weight, and each bias on its own
                    out.extend(Group(g.name, tuple(t for t in g.tensors if t[0] == "bias"), g.kind)
                               for g, has in zip(run, biased) if has)
                    weights = [Group(g.name, tuple(t for t in g.tensors if t[0] == "weight"), g.kind) for g in run]
                    shape = weights[0].tensors[0][1]
                    out.append(Group(name, (("weight", (shape[0] * len(order), *shape[1:])),)))
                    virtual[name] = weights
                i += len(order)
                break
        else:
            out.append(groups[i])
            i += 1
    return out, virtual


def _projection_run(run: Sequence[Group], order: Sequence[str]) -> bool:
    """Sibling projections in `order`, each a weight `(D, I)` of one shape with an optional bias `(D,)`."""
    parents = {g.name.rpartition(".")[0] for g in run}
    parts = [PROJECTION_PARTS.get(g.name.rpartition(".")[2]) for g in run]
    names = {g.name.rpartition(".")[2] for g in run}
    if not (len(parents) == 1 and tuple(parts) == tuple(order) and len(names) == len(run)):
        return False
    weights = set()
    for g in run:
        own = dict(g.tensors)
        if set(own) - {"weight", "bias"} or len(own.get("weight", ())) != 2:
            return False
        if "bias" in own and own["bias"] != own["weight"][:1]:
            return False
        weights.add(own["weight"])
    return len(weights) == 1


def _join_name(module: str, name: str) -> str:
    return f"{module}.{name}" if module else name


# --------------------------------------------------------------------------------------------------------------
# blocks


def block_of(module: str, containers: set[str]) -> str:
    """The numbered block that holds `module`: its deepest ancestor whose last name part is a number
    (`layer1.0`, `blocks.3`, `features.2.conv.0`), the module itself when it is such a container with tensors of
    its own (a ConvNeXt block's layer scale); `""` when none is."""
    parts = module.split(".") if module else []
    top = len(parts) if module in containers else len(parts) - 1
    for depth in range(top, 0, -1):
        if parts[depth - 1].isdigit():
            return ".".join(parts[:depth])
    return ""


def check_blocks(source: Sequence[Group], target: Sequence[Group], matches: Sequence[GroupMatch],
                 known: Iterable[tuple[str, str]] = (), *, cut_at_anchors: bool = True
                 ) -> tuple[dict[int, str], dict[int, int], list[tuple[list[int], list[int]]]]:
    """Matches that break the block structure, as target group index -> why it must not be loaded; ambiguous
    target groups the block structure settles, as target index -> source index; and the regions of
    corresponding blocks, each as (source indices, target indices).

    The matched pairs (with `known`, module pairs settled earlier, e.g. by name) vote for a correspondence of
    numbered blocks (`block_of`): a source block corresponds to the target blocks that most of its pairs land
    in, and back. Two checks follow, both of which a positional alignment can fail when one library registers
    a block's modules in another order than it runs them (Hugging Face's ViT stores `layernorm_before` after
    the attention):
    1. a pair whose blocks correspond in neither direction crosses into a neighbouring block;
    2. the groups of corresponding blocks are aligned again on their own, and a pair this alignment does not
       give too (the block-local choice is ambiguous) was settled only by what lies outside the block.
    A target group left ambiguous between candidates of several blocks takes the one candidate that the
    alignment of its own block gives (a final norm that also resembles the last block's norms).
    """
    s_cont, t_cont = ancestors(g.name for g in source), ancestors(g.name for g in target)
    sb = [block_of(g.name, s_cont) for g in source]
    tb = [block_of(g.name, t_cont) for g in target]
    votes: dict[tuple[str, str], int] = defaultdict(int)
    for m in matches:
        if m.source is not None:
            votes[(sb[m.source], tb[m.target])] += 1
    known_blocks = [(block_of(s_module, s_cont), block_of(t_module, t_cont)) for s_module, t_module in set(known)]
    for pair in known_blocks:
        votes[pair] += 1
    forward, back = _best_votes(votes, 0), _best_votes(votes, 1)
    refused: dict[int, str] = {}
    root: dict[tuple[int, str], tuple[int, str]] = {}  # union-find over (side, block): corresponding blocks

    def find(x: tuple[int, str]) -> tuple[int, str]:
        while root.setdefault(x, x) != x:
            root[x] = x = root[root[x]]
        return x

    def join(cs: str, ct: str) -> bool:
        """Unite two blocks that correspond (in either direction); False when they do not."""
        if ct in forward[cs] or cs in back[ct]:
            root[find((0, cs))] = find((1, ct))
            return True
        return False

    for cs, ct in known_blocks:
        join(cs, ct)
    for m in matches:
        if m.source is None:
            continue
        cs, ct = sb[m.source], tb[m.target]
        if not join(cs, ct):
            refused[m.target] = (f"resembles source module {source[m.source].name or '(root)'}, but its block "
                                 f"{cs or '(root)'} corresponds to {', '.join(sorted(forward[cs])) or '(root)'}, "
                                 f"not {ct or '(root)'}: not loaded")
    given = {m.target: m.source for m in matches if m.source is not None and m.target not in refused}
    open_ = {m.target: set(m.candidates) for m in matches if m.source is None and m.candidates}
    settled: dict[int, int] = {}
    parts: dict[tuple[int, str], tuple[list[int], list[int]]] = defaultdict(lambda: ([], []))
    for i, b in enumerate(sb):
        if (0, b) in root:
            parts[find((0, b))][0].append(i)
    for j, b in enumerate(tb):
        if (1, b) in root:
            parts[find((1, b))][1].append(j)
    for part, (s_local, t_local) in parts.items():
        if not s_local or not t_local:
            continue
        local = align([source[i] for i in s_local], [target[j] for j in t_local], cut_at_anchors=cut_at_anchors)
        for lm in local:
            j = t_local[lm.target]
            if j in open_ and lm.source is not None and s_local[lm.source] in open_[j]:
                # settled only when every other candidate belongs to blocks that correspond to other blocks
                others = open_[j] - {s_local[lm.source]}
                if all((0, sb[c]) in root and find((0, sb[c])) != part for c in others):
                    settled[j] = s_local[lm.source]
            elif j in given and (lm.source is None or s_local[lm.source] != given[j]):
                others = [source[s_local[i]].name for i in lm.candidates] if lm.source is None else \
                    [source[s_local[lm.source]].name]
                others = list(dict.fromkeys([source[given[j]].name, *others]))
                refused[j] = (f"within block {tb[j] or '(root)'}, fits source modules {', '.join(others)} equally "
                              "well (the file's order of a block's modules need not be the order they run in); "
                              "give the source model to align both in execution order, or add a rename rule")
    return refused, settled, [part for part in parts.values() if part[0] and part[1]]


def settle_by_flow(source: Sequence[Group], target: Sequence[Group], matches: Sequence[GroupMatch],
                   source_flow: Mapping[str, set[str]], target_flow: Mapping[str, set[str]],
                   trusted: Iterable[int], regions: Sequence[tuple[list[int], list[int]]],
                   source_joined: Set[tuple[str, str]] = frozenset(),
                   target_joined: Set[tuple[str, str]] = frozenset()) -> dict[int, int]:
    """Target groups left without a source (ambiguous, unmatched or refused) that the data flow settles, as
    target index -> source index; the candidates are the unpaired source groups of the same signature.

    With both models traced, each module's producers and consumers are known (`Trace.flow`). A candidate
    source module fits a target module when every paired neighbour of the target — a module feeding it or fed
    by it, paired by a `trusted` match (target indices) or settled here — is paired with a neighbour of the
    candidate in the same direction; a target with at least one paired neighbour takes its candidate when it
    is the only one that fits and no other target takes it too. The new pairs are neighbours of others in
    turn, until nothing changes. This tells a block's shortcut from its main path when both are 1x1
    convolutions of one shape: the main one feeds the 3x3 convolution. A neighbour missing from a trace only
    removes evidence; a neighbour that disagrees rules a candidate out.

    An edge that passes only through a meeting of values (`Trace.joined`: a residual addition) is another kind
    of neighbour than a direct one, and kinds must agree: the stem feeds the first block directly but the
    second only through its shortcut.

    Candidates come only from the target's own region of corresponding blocks (`check_blocks`): a look-alike
    block inserted before another is as consistent with its neighbours as the block it copies, and only the
    blocks already tied by other pairs tell them apart. Outside every region nothing is settled.
    """
    region_of_source = {i: r for r, (s_local, _) in enumerate(regions) for i in s_local}
    region_of_target = {j: r for r, (_, t_local) in enumerate(regions) for j in t_local}

    def index(groups: Sequence[Group]) -> dict[str, int]:
        seen: dict[str, int] = {}
        for i, g in enumerate(groups):
            seen[g.name] = -1 if g.name in seen else i  # a name with several groups is not a node
        return {n: i for n, i in seen.items() if i >= 0}

    def edges(flow: Mapping[str, set[str]], joined: Set[tuple[str, str]], at: dict[str, int]
              ) -> tuple[dict[int, set[tuple[int, bool]]], dict[int, set[tuple[int, bool]]]]:
        succ: dict[int, set[tuple[int, bool]]] = defaultdict(set)
        pred: dict[int, set[tuple[int, bool]]] = defaultdict(set)
        for a, bs in flow.items():
            for b in bs:
                if a in at and b in at:
                    met = (a, b) in joined
                    succ[at[a]].add((at[b], met))
                    pred[at[b]].add((at[a], met))
        return succ, pred

    s_succ, s_pred = edges(source_flow, source_joined, index(source))
    t_succ, t_pred = edges(target_flow, target_joined, index(target))
    pair = {m.target: m.source for m in matches if m.source is not None}
    pair = {t: pair[t] for t in trusted if t in pair}
    used = set(pair.values())
    by_signature: dict[Signature, set[int]] = defaultdict(set)
    for i, g in enumerate(source):
        if i not in used:
            by_signature[signature(g)].add(i)
    open_ = {j: {i for i in by_signature.get(signature(g), ())
                 if compatible(source[i], g) and region_of_source.get(i) == region_of_target[j]}
             for j, g in enumerate(target) if j not in pair and j in region_of_target}
    open_ = {j: c for j, c in open_.items() if c}
    settled: dict[int, int] = {}

    def evidence(neighbours: Iterable[tuple[int, bool]]) -> set[tuple[int, bool]]:
        """The paired neighbours of one direction. Edges through a meeting of values count only while every
        module met there is paired: an identity shortcut carries the stem's output through an inserted
        look-alike's addition into the block after it, just as it carries it through the first block into
        the second, and only the unpaired look-alike at that meeting tells the two apart."""
        neighbours = list(neighbours)
        loose = any(met and x not in pair for x, met in neighbours)
        return {(pair[x], met) for x, met in neighbours if x in pair and not (met and loose)}

    while open_:
        choice: dict[int, int] = {}
        for t, candidates in open_.items():
            after = evidence(t_succ.get(t, ()))
            before = evidence(t_pred.get(t, ()))
            if not after and not before:
                continue
            # every paired neighbour must be the candidate's neighbour in the same direction
            fits = [c for c in candidates - used
                    if after <= s_succ.get(c, set()) and before <= s_pred.get(c, set())]
            if len(fits) == 1:
                choice[t] = fits[0]
        wanted = defaultdict(list)
        for t, c in choice.items():
            wanted[c].append(t)
        won = {ts[0]: c for c, ts in wanted.items() if len(ts) == 1}
        if not won:
            break
        for t, c in won.items():
            pair[t] = settled[t] = c
            used.add(c)
            del open_[t]
    return settled


def _best_votes(votes: Mapping[tuple[str, str], int], side: int) -> dict[str, set[str]]:
    """Block -> the blocks of the other side that most of its pairs land in (all of them when tied)."""
    most: dict[str, int] = defaultdict(int)
    best: dict[str, set[str]] = defaultdict(set)
    for pair, n in votes.items():
        mine, other = pair[side], pair[1 - side]
        if n > most[mine]:
            most[mine], best[mine] = n, {other}
        elif n == most[mine]:
            best[mine].add(other)
    return best


# --------------------------------------------------------------------------------------------------------------
# key order


_NUMBER = re.compile(r"[0-9]+")


class _Node:
    __slots__ = ("children", "key")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.key: str | None = None


def _natural_key(name: str) -> tuple:
    return tuple((0, int(p), p) if p.isdigit() else (1, 0, p) for p in re.split(r"([0-9]+)", name) if p)


def _sibling_order(names: list[str]) -> list[str]:
    numeric = [n for n in names if _NUMBER.fullmatch(n)]
    if numeric:
        block = sorted(numeric, key=lambda n: (int(n), n))
        out: list[str] = []
        for n in names:
            if not _NUMBER.fullmatch(n):
                out.append(n)
            elif n == numeric[0]:
                out.extend(block)
        return out
    if names == sorted(names) and _one_numbered_pattern(names):  # string order: maybe from a string sort
        return sorted(names, key=_natural_key)
    return names


def _one_numbered_pattern(names: list[str]) -> bool:
    """Several names that differ only in their numbers (`stage1`, `stage2`, `stage10`)."""
    patterns = {_NUMBER.sub("#", n) for n in names}
    return len(names) > 1 and len(patterns) == 1 and "#" in next(iter(patterns))


def _tree(keys: Iterable[str]) -> _Node:
    """Dotted keys as a tree of their components; each key's node holds it (the key "" is the root's)."""
    root = _Node()
    for key in keys:
        node = root
        for part in key.split(".") if key else []:
            child = node.children.get(part)
            if child is None:
                child = node.children[part] = _Node()
            node = child
        node.key = key
    return root


def natural_order(keys: Iterable[str]) -> list[str]:
    """Order dotted keys numerically where a string sort broke it (`blocks.2` before `blocks.10`).

    Keys are read as a tree of dotted components. Among the children of one node, purely numeric components
    are sorted as numbers and kept together at the place of the first of them; children that all share one
    name pattern apart from their numbers and stand in string order (`stage1`, `stage10`, `stage2`) are sorted
    naturally; any other children keep their first-occurrence order, so keys already in module order come back
    unchanged. Each key is returned once.
    """
    out: list[str] = []
    stack = [_tree(keys)]
    while stack:
        node = stack.pop()
        if node.key is not None:
            out.append(node.key)
        names = _sibling_order(list(node.children))
        stack.extend(node.children[n] for n in reversed(names))
    return out


def order_known(groups: Sequence[Group], fixed: Callable[[Group], bool]) -> bool:
    """Whether `natural_order` gave a string-sorted file back its module order, as far as alignment needs it.

    A string sort keeps the module tree but loses the order of named siblings (`conv1`, `bn1` come back as
    `bn1`, `conv1`); numbered siblings (`0` ... `10`, or `stage1` ... `stage10` when every sibling has that one
    pattern) are put back in order. Under each module, the *units* are: its own tensors, the numbered children
    as one block, and each named child. The order is known when under every module at most one unit holds a
    group that is not `fixed` (one whose place does not matter, e.g. its signature is unique on both sides), so
    torchvision's `features.N` + `classifier` is known, and a ResNet block's `conv1`, `bn1`, `conv2` is not.
    `groups` are the source's groups, named by module path.
    """
    root = _tree(g.name for g in groups)
    loose_names = {g.name for g in groups if not fixed(g)}
    loose: set[int] = {id(root)} if loose_names else set()  # ids of nodes whose subtree holds a loose group
    for name in loose_names:
        node = root
        for part in name.split(".") if name else []:
            node = node.children[part]
            loose.add(id(node))
    stack = [root]
    while stack:
        node = stack.pop()
        names = list(node.children)
        block = set(names) if _one_numbered_pattern(names) else {n for n in names if _NUMBER.fullmatch(n)}
        units = [node.key in loose_names, any(id(node.children[n]) in loose for n in block),
                 *(id(node.children[n]) in loose for n in names if n not in block)]
        if sum(units) > 1:
            return False
        stack.extend(node.children.values())
    return True


# --------------------------------------------------------------------------------------------------------------
# alignment


def align(source: Sequence[Group], target: Sequence[Group], *, cut_at_anchors: bool = True) -> list[GroupMatch]:
    """Pair target groups with source groups by structure; one `GroupMatch` per target group, in target order.

    See the module docstring for the rules. Nothing is guessed: a target group gets a source only when every
    optimal alignment (or, for "aligned+names", every optimal alignment that is also best on name similarity)
    gives it that source.

    cut_at_anchors: False aligns everything that is not a unique-signature match as one region, so the
        positions of the unique groups play no part at all: for a source whose order is known except where
        its unique groups sit (`order_known`).
    """
    ids: dict[Signature, int] = {}
    ssig = [ids.setdefault(signature(g), len(ids)) for g in source]
    tsig = [ids.setdefault(signature(g), len(ids)) for g in target]
    ctx = _Context(source, target, ssig, tsig)

    result: list[GroupMatch | None] = [None] * len(target)
    used = bytearray(len(source))
    anchors = _unique_pairs(ctx)
    for t, s in anchors:
        result[t] = GroupMatch(t, s, [], "unique-signature")
        used[s] = 1

    bounds = (_increasing_chain(anchors) if cut_at_anchors else []) + [(len(target), len(source))]
    prev_t = prev_s = -1
    for bound_t, bound_s in bounds:
        region_t = [t for t in range(prev_t + 1, bound_t) if result[t] is None]
        region_s = [s for s in range(prev_s + 1, bound_s) if not used[s]]
        if region_t:
            for match in _align_region(ctx, region_s, region_t):
                result[match.target] = match
        prev_t, prev_s = bound_t, bound_s
    return [m if m is not None else GroupMatch(t, None, [], "unmatched") for t, m in enumerate(result)]


class _Context:
    """Signature ids, kinds and (lazily) name tokens of both sides."""

    def __init__(self, source: Sequence[Group], target: Sequence[Group], ssig: list[int], tsig: list[int]):
        self.source, self.target = source, target
        self.ssig, self.tsig = ssig, tsig
        self.skind = [g.kind for g in source]
        self.tkind = [g.kind for g in target]
        self._tokens: dict[tuple[int, int], tuple[str, ...]] = {}

    def compatible(self, s: int, t: int) -> bool:
        if self.ssig[s] != self.tsig[t]:
            return False
        ks, kt = self.skind[s], self.tkind[t]
        return ks is None or kt is None or ks == kt

    def name_similarity(self, s: int, t: int) -> int:
        return _lcs(self._tokens_of(0, s), self._tokens_of(1, t))

    def _tokens_of(self, side: int, i: int) -> tuple[str, ...]:
        tokens = self._tokens.get((side, i))
        if tokens is None:
            name = (self.source if side == 0 else self.target)[i].name
            tokens = self._tokens[(side, i)] = _tokens(name)
        return tokens


_TOKEN = re.compile(r"[a-z]+|[0-9]+")


def _tokens(path: str) -> tuple[str, ...]:
    """`layers.3.blocks.4.conv2` -> ("layers", "3", "blocks", "4", "conv", "2")."""
    return tuple(str(int(t)) if t.isdigit() else t for t in _TOKEN.findall(path.lower()))


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token sequences."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def _unique_pairs(ctx: _Context) -> list[tuple[int, int]]:
    """(target, source) pairs where each is the only group of its side compatible with the other, by target."""
    by_sig_s: dict[int, list[int]] = defaultdict(list)
    by_sig_t: dict[int, list[int]] = defaultdict(list)
    for s, sig in enumerate(ctx.ssig):
        by_sig_s[sig].append(s)
    for t, sig in enumerate(ctx.tsig):
        by_sig_t[sig].append(t)
    pairs = []
    for sig, ts in by_sig_t.items():
        ss = by_sig_s.get(sig)
        if not ss:
            continue
        if len(ss) == 1 and len(ts) == 1:
            if ctx.compatible(ss[0], ts[0]):
                pairs.append((ts[0], ss[0]))
            continue
        # several groups share the shapes; known kinds on both sides may still single one pair out
        s_kind: dict[str | None, list[int]] = defaultdict(list)
        t_kind: dict[str | None, list[int]] = defaultdict(list)
        for s in ss:
            s_kind[ctx.skind[s]].append(s)
        for t in ts:
            t_kind[ctx.tkind[t]].append(t)
        if len(s_kind) == 1 and None in s_kind or len(t_kind) == 1 and None in t_kind:
            continue  # kinds unknown on one side: every group of the bucket fits every other
        for t in ts:
            kt = ctx.tkind[t]
            fits = ss if kt is None else s_kind.get(kt, []) + s_kind.get(None, [])
            if len(fits) != 1:
                continue
            s = fits[0]
            ks = ctx.skind[s]
            n_back = len(ts) if ks is None else len(t_kind.get(ks, [])) + len(t_kind.get(None, []))
            if n_back == 1:
                pairs.append((t, s))
    pairs.sort()
    return pairs


def _increasing_chain(pairs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The longest subsequence of `pairs` (sorted by target) whose sources increase too (patience sorting)."""
    tails: list[int] = []  # source index ending the best chain of each length
    tail_at: list[int] = []  # position in `pairs` of that chain end
    back = [-1] * len(pairs)
    for k, (_, s) in enumerate(pairs):
        pos = bisect_left(tails, s)
        back[k] = tail_at[pos - 1] if pos else -1
        if pos == len(tails):
            tails.append(s)
            tail_at.append(k)
        else:
            tails[pos] = s
            tail_at[pos] = k
    chain = []
    k = tail_at[-1] if tail_at else -1
    while k >= 0:
        chain.append(pairs[k])
        k = back[k]
    return chain[::-1]


# region alignment ---------------------------------------------------------------------------------------------

_NEG = -(1 << 62)
Weight = Callable[[int, int], "int | None"]


def _align_region(ctx: _Context, region_s: list[int], region_t: list[int]) -> list[GroupMatch]:
    """Align the groups between two anchors; one GroupMatch per group of `region_t`."""
    out: list[GroupMatch] = []
    s_sigs = {ctx.ssig[s] for s in region_s}
    t_sigs = {ctx.tsig[t] for t in region_t}
    # groups with no same-signature partner in the region are skipped by every alignment
    S = [s for s in region_s if ctx.ssig[s] in t_sigs]
    T = []
    for t in region_t:
        if ctx.tsig[t] in s_sigs:
            T.append(t)
        else:
            out.append(GroupMatch(t, None, [], "unmatched"))
    if not T:
        return out
    n, m = len(S), len(T)
    if n == m and all(ctx.compatible(s, t) for s, t in zip(S, T)):
        out.extend(GroupMatch(t, s, [], "aligned") for s, t in zip(S, T))
        return out

    count_weight = _pair_weight(ctx, S, T)

    # every alignment with L pairs stays within diagonals j - i in [-(n - L), m - L]; start from an upper
    # bound on L (shared signatures), and widen once from the best score found inside that band
    sig_count_s: dict[int, int] = defaultdict(int)
    for s in S:
        sig_count_s[ctx.ssig[s]] += 1
    sig_count_t: dict[int, int] = defaultdict(int)
    for t in T:
        sig_count_t[ctx.tsig[t]] += 1
    bound = sum(min(c, sig_count_t.get(sig, 0)) for sig, c in sig_count_s.items())
    band = _band(n, m, bound)
    if band is None:
        return out + _fallback(ctx, S, T)
    forward = _forward(n, m, *band, count_weight)
    found = forward[n][m - n - band[0]]
    if found < bound:
        band = _band(n, m, found)
        if band is None:
            return out + _fallback(ctx, S, T)
        forward = _forward(n, m, *band, count_weight)
    options, skippable = _optimal_pairs(n, m, band, count_weight, forward)

    unresolved = [j for j in range(m) if len(options[j]) > 1 or (options[j] and skippable[j])]
    lex_options = lex_skippable = None
    if unresolved:
        # break ties by name similarity, among the alignments that are optimal by count
        sims = {(i, j): ctx.name_similarity(S[i], T[j]) for j in range(m) for i in options[j]}
        big = min(n, m) * max(sims.values(), default=0) + 1
        weights = {pair: big + sim for pair, sim in sims.items()}

        def lex_weight(i: int, j: int) -> int | None:
            return weights.get((i, j))

        lex_forward = _forward(n, m, *band, lex_weight)
        lex_options, lex_skippable = _optimal_pairs(n, m, band, lex_weight, lex_forward)

    for j, t in enumerate(T):
        if len(options[j]) == 1 and not skippable[j]:
            out.append(GroupMatch(t, S[options[j][0]], [], "aligned"))
        elif not options[j]:
            out.append(GroupMatch(t, None, [], "unmatched"))
        else:
            assert lex_options is not None and lex_skippable is not None
            if len(lex_options[j]) == 1 and not lex_skippable[j]:
                out.append(GroupMatch(t, S[lex_options[j][0]], [], "aligned+names"))
            elif not lex_options[j]:
                out.append(GroupMatch(t, None, [], "unmatched"))
            else:
                out.append(GroupMatch(t, None, sorted(S[i] for i in lex_options[j]), "ambiguous"))
    return out


def _pair_weight(ctx: _Context, S: list[int], T: list[int]) -> Weight:
    """1 for compatible (S[i], T[j]), else None; compares plain ids when kinds are all known or all unknown."""
    s_kinds = {ctx.skind[s] for s in S}
    t_kinds = {ctx.tkind[t] for t in T}
    if s_kinds == {None} or t_kinds == {None}:
        a, b = [ctx.ssig[s] for s in S], [ctx.tsig[t] for t in T]
    elif None not in s_kinds and None not in t_kinds:
        a, b = [(ctx.ssig[s], ctx.skind[s]) for s in S], [(ctx.tsig[t], ctx.tkind[t]) for t in T]
    else:
        return lambda i, j: 1 if ctx.compatible(S[i], T[j]) else None
    return lambda i, j: 1 if a[i] == b[j] else None


def _band(n: int, m: int, pairs: int) -> tuple[int, int] | None:
    """Diagonals (lo, hi) holding every alignment with at least `pairs` pairs, or None when over budget."""
    lo, hi = -(n - pairs), m - pairs
    if lo == hi:  # a band one diagonal wide has no path when the sequences differ; two always do
        hi += 1
    lo, hi = max(lo, -n), min(hi, m)
    if (n + 1) * (hi - lo + 1) > MAX_DP_CELLS:
        return None
    return lo, hi


def _forward(n: int, m: int, lo: int, hi: int, weight: Weight) -> list[list[int]]:
    """Best score of aligning S[:i] with T[:j], for the cells with lo <= j - i <= hi, stored at [i][j - i - lo].

    Moves: skip a source, skip a target, or pair S[i-1] with T[j-1] when `weight` gives a score.
    """
    width = hi - lo + 1
    rows: list[list[int]] = []
    prev: list[int] | None = None
    for i in range(n + 1):
        row = [_NEG] * width
        first, last = max(0, -i - lo), min(width - 1, m - i - lo)
        for x in range(first, last + 1):
            j = i + lo + x
            best = 0 if i == 0 and j == 0 else _NEG
            if x > 0 and row[x - 1] > best:
                best = row[x - 1]
            if prev is not None:
                if x + 1 < width and prev[x + 1] > best:
                    best = prev[x + 1]
                if j > 0:
                    w = weight(i - 1, j - 1)
                    if w is not None and prev[x] + w > best:
                        best = prev[x] + w
            row[x] = best
        rows.append(row)
        prev = row
    return rows


def _optimal_pairs(
    n: int, m: int, band: tuple[int, int], weight: Weight, forward: list[list[int]]
) -> tuple[list[list[int]], list[bool]]:
    """For each target j: the sources it is paired with in some optimal alignment, and whether some optimal
    alignment leaves it unpaired."""
    lo, hi = band
    width = hi - lo + 1
    # best score of the suffixes S[i:], T[j:] = forward pass over the reversed sequences
    rev = _forward(n, m, m - n - hi, m - n - lo, lambda i, j: weight(n - 1 - i, m - 1 - j))
    best = forward[n][m - n - lo]
    options: list[list[int]] = [[] for _ in range(m)]
    skippable = [False] * m
    for i in range(n + 1):
        row = forward[i]
        rev_here = rev[n - i]
        rev_next = rev[n - i - 1] if i < n else None
        first, last = max(0, -i - lo), min(width - 1, m - i - lo)
        for x in range(first, last + 1):
            f = row[x]
            if f < 0:
                continue
            j = i + lo + x
            if j == m:
                continue
            if x + 1 < width and f + rev_here[width - 2 - x] == best:
                skippable[j] = True
            if rev_next is not None:
                w = weight(i, j)
                if w is not None and f + w + rev_next[width - 1 - x] == best:
                    options[j].append(i)
    return options, skippable


def _fallback(ctx: _Context, S: list[int], T: list[int]) -> list[GroupMatch]:
    """A region too large to align: every target group that has compatible sources is ambiguous."""
    by_sig: dict[int, list[int]] = defaultdict(list)
    for s in S:
        by_sig[ctx.ssig[s]].append(s)
    out = []
    for t in T:
        fits = [s for s in by_sig.get(ctx.tsig[t], []) if ctx.compatible(s, t)]
        out.append(GroupMatch(t, None, fits, "ambiguous") if fits else GroupMatch(t, None, [], "unmatched"))
    return out
