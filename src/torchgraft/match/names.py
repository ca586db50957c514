"""Matching by name: exact names, wrapper prefixes found by analysis, and user rules as data.

Rules are a dict (or a YAML/JSON file) a user can read and edit:

    rename:                      # source name -> target name; first rule that matches wins
      "features.{}.conv.{}": "blocks.{}.conv{}"        # `{}` is one name component (`{}` in order)
      "re:^encoder\\.layers\\.(\\d+)\\.": "blocks.\\1."   # `re:` regex with groups, applied as re.sub
    drop: ["re:.*\\.num_batches_tracked$", "aux_head.*"]   # source names never used (glob or re:)
    merge:                       # several source tensors -> one target, concatenated along `dim`
      - {target: "blocks.{}.attn.qkv.weight", dim: 0,
         sources: ["blocks.{}.attn.q.weight", "blocks.{}.attn.k.weight", "blocks.{}.attn.v.weight"]}
    split:                       # one source tensor -> several targets, cut into equal chunks along `dim`
      - {source: "blocks.{}.attn.qkv.weight", dim: 0,
         targets: ["blocks.{}.attn.q.weight", "blocks.{}.attn.k.weight", "blocks.{}.attn.v.weight"]}
"""

from __future__ import annotations

import fnmatch
import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torchgraft.errors import GraftError

__all__ = ["Rules", "PrefixChoice", "best_prefixes", "load_rules", "under_prefix", "is_benign", "BENIGN_TENSORS",
           "KNOWN_PREFIXES"]


@dataclass(frozen=True)
class Benign:
    """A tensor that may be missing from one side without harm."""

    keeps: str
    """What the target keeps when no source gives it (a transfer report's note)."""
    history: str
    """Why a file may lack it (a diff's note)."""


#: The one table of tensors that do not matter, by local name: matching may leave them out of a module's
#: signature, a transfer leaves them new without a warning, and `graft diff` explains them.
BENIGN_TENSORS: dict[str, Benign] = {
    "num_batches_tracked": Benign(
        "a BatchNorm counter older files lack; it keeps its default (0)",
        "BatchNorm `num_batches_tracked` counters, which PyTorch 0.4.1 added; files saved before it lack them. "
        "They only matter with momentum=None and are safe to leave at their defaults"),
    "position_ids": Benign(
        "an index buffer (0, 1, 2, ...) the model builds itself",
        "`position_ids` buffers (0, 1, 2, ...) that transformers builds itself; recent versions no longer save "
        "them"),
}


def is_benign(key: str) -> bool:
    """Whether a tensor key names one of `BENIGN_TENSORS`."""
    return key.rpartition(".")[2] in BENIGN_TENSORS

#: Prefixes that wrappers and task heads put in front of a backbone's names, tried on both sides.
KNOWN_PREFIXES = ("module.", "_orig_mod.", "model.", "backbone.", "encoder.", "base_model.", "net.", "bert.",
                  "roberta.", "vit.", "deit.", "swin.", "convnext.", "resnet.", "features.", "body.", "trunk.")


def under_prefix(keys: Iterable[str], prefix: str) -> dict[str, str]:
    """{name without `prefix`: name} for the names that start with it (every name when `prefix` is "")."""
    return {k[len(prefix):]: k for k in keys if k.startswith(prefix)}


def _candidate_prefixes(keys: Iterable[str]) -> list[str]:
    """Prefixes worth trying on one side: known wrapper prefixes present, and frequent leading components."""
    keys = list(keys)
    heads = Counter()
    for k in keys:
        parts = k.split(".")
        for depth in (1, 2):
            if len(parts) > depth:
                heads[".".join(parts[:depth]) + "."] += 1
    frequent = [p for p, n in heads.items() if n >= max(2, len(keys) // 10)]
    present = [p for p in KNOWN_PREFIXES if heads.get(p)]
    return [""] + list(dict.fromkeys(present + frequent))


@dataclass
class PrefixChoice:
    """What prefix analysis found: the prefixes to remove (both "" when none), how many names they match, and,
    when several pairs matched as many names but paired them differently, those pairs (then none is used)."""

    source: str = ""
    target: str = ""
    hits: int = 0
    rivals: list[tuple[str, str]] = field(default_factory=list)


_DIGITS = re.compile(r"[0-9]+")


def _may_rename(sp: str, tp: str, source: Iterable[str], target: Iterable[str]) -> bool:
    """Whether renaming the source prefix `sp` to the target prefix `tp` can be a wrapper's doing.

    Removing a prefix from one side is (`module.`, `backbone.`). Renaming one into another is not when the two
    are numbered siblings (`layer3.` -> `layer5.`, `blocks.2.` -> `blocks.4.`), nor when either side also holds
    the other's prefix: then `sp` has its own counterpart in the target (a hand-written model that keeps
    torchvision's `layer3` and adds a `layer5` of look-alike blocks), and pairing it elsewhere is a guess.
    """
    if not sp or not tp or sp == tp:
        return True
    if _DIGITS.sub("#", sp) == _DIGITS.sub("#", tp):
        return False
    return not (any(k.startswith(sp) for k in target) or any(k.startswith(tp) for k in source))


def best_prefixes(source: Mapping[str, tuple[int, ...]], target: Mapping[str, tuple[int, ...]]) -> PrefixChoice:
    """The (source prefix, target prefix) whose removal makes the most names match with equal shapes.

    Found by analysing the leading components of both sides, not only from a fixed list: known wrapper prefixes
    (`module.`, `backbone.` ...) and leading components shared by a tenth of a side's keys or more. A match
    counts only when what is left is still a module path and a tensor name (`layer1.0.conv1.weight`, not just
    `weight`): stripping a whole module's path away says nothing about which module it was. When two prefix
    pairs give the most matches but pair the tensors differently (MoCo's `encoder_q.` and `encoder_k.`, two
    copies of one network), neither is used and both are returned as `rivals`. Among pairs that pair the
    tensors alike, the shortest wins. A prefix renamed into another must look like a wrapper's renaming
    (`_may_rename`), not one module's subtree paired with a look-alike sibling.
    """
    best = PrefixChoice()
    best_pairs: frozenset[tuple[str, str]] = frozenset()
    src_cands = _candidate_prefixes(source)
    tgt_cands = _candidate_prefixes(target)
    for sp in src_cands:
        stripped = under_prefix(source, sp)
        for tp in tgt_cands:
            if not _may_rename(sp, tp, source, target):
                continue
            pairs = []
            for rest, k in under_prefix(target, tp).items():
                hit = stripped.get(rest)
                if "." in rest and hit is not None and source[hit] == target[k]:
                    pairs.append((k, hit))
            if not pairs or len(pairs) < best.hits:
                continue
            found = frozenset(pairs)
            if len(pairs) > best.hits:
                best, best_pairs = PrefixChoice(sp, tp, len(pairs), [(sp, tp)]), found
            elif found != best_pairs:
                best.rivals.append((sp, tp))
            elif len(sp) + len(tp) < len(best.source) + len(best.target):
                best.source, best.target, best.rivals[0] = sp, tp, (sp, tp)
    if len(best.rivals) > 1:
        return PrefixChoice(rivals=best.rivals)
    return PrefixChoice(best.source, best.target, best.hits)


# ---- rules ------------------------------------------------------------------------------------------------


def _compile(pattern: str) -> re.Pattern[str]:
    """`re:...` is a regex; otherwise `{}` is one name component and `*` a glob, both anchored."""
    if pattern.startswith("re:"):
        return re.compile(pattern[3:])
    out = []
    for piece in re.split(r"(\{\}|\*)", pattern):
        if piece == "{}":
            out.append(r"([^.]+)")
        elif piece == "*":
            out.append(r".*")
        else:
            out.append(re.escape(piece))
    return re.compile("^" + "".join(out) + "$")


def _fill(template: str, groups: tuple[str, ...]) -> str:
    if template.startswith("re:"):
        raise GraftError(f"rule output {template!r} starts with re:; outputs are plain names with {{}} slots.")
    parts = template.split("{}")
    if len(parts) - 1 != len(groups):
        raise GraftError(f"rule output {template!r} has {len(parts) - 1} {{}} slots but its pattern captured "
                         f"{len(groups)}; make the counts equal.")
    return "".join(p + (groups[i] if i < len(groups) else "") for i, p in enumerate(parts))


@dataclass
class Merge:
    target: str
    sources: list[str]
    dim: int = 0


@dataclass
class Split:
    source: str
    targets: list[str]
    dim: int = 0


@dataclass
class Rules:
    """User rules: renames, drops, merges (many -> one) and splits (one -> many)."""

    rename: dict[str, str] = field(default_factory=dict)
    drop: list[str] = field(default_factory=list)
    merge: list[Merge] = field(default_factory=list)
    split: list[Split] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._rename = [(_compile(p), p, t) for p, t in self.rename.items()]
        self._drop = [_compile(p) if p.startswith("re:") or "{}" in p else re.compile(fnmatch.translate(p))
                      for p in self.drop]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "Rules":
        data = dict(data or {})
        unknown = set(data) - {"rename", "drop", "merge", "split"}
        if unknown:
            raise GraftError(f"rules have unknown sections {sorted(unknown)}; expected rename, drop, merge, split.")
        try:
            return cls(
                rename={str(k): str(v) for k, v in (data.get("rename") or {}).items()},
                drop=[str(x) for x in data.get("drop") or []],
                merge=[Merge(str(m["target"]), [str(s) for s in m["sources"]], int(m.get("dim", 0)))
                       for m in data.get("merge") or []],
                split=[Split(str(s["source"]), [str(t) for t in s["targets"]], int(s.get("dim", 0)))
                       for s in data.get("split") or []],
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise GraftError(f"rules are malformed ({type(exc).__name__}: {exc}); expected rename: {{src: dst}}, "
                             "drop: [pattern], merge: [{target, sources, dim}], split: [{source, targets, dim}].") \
                from None

    def is_dropped(self, key: str) -> bool:
        return any(p.match(key) for p in self._drop)

    def renamed(self, key: str) -> tuple[str, str] | None:
        """(new name, rule) for the first rename rule that matches `key`, else None."""
        for regex, pattern, template in self._rename:
            m = regex.match(key) if not pattern.startswith("re:") else regex.search(key)
            if not m:
                continue
            if pattern.startswith("re:"):
                return regex.sub(template, key, count=1), pattern
            return _fill(template, m.groups()), pattern
        return None

    def expand_merges(self, source_keys: Iterable[str]) -> list[tuple[str, list[str], int]]:
        """Concrete (target, [sources], dim) for every merge whose first source pattern matches a source key."""
        return [(t, s, m.dim) for m in self.merge for t, s in _expand(m.sources[0], m.sources, [m.target], source_keys)]

    def expand_splits(self, source_keys: Iterable[str]) -> list[tuple[str, list[str], int]]:
        """Concrete (source, [targets], dim) for every split whose source pattern matches a source key."""
        out = []
        for s in self.split:
            for targets, sources in _expand(s.source, [s.source], s.targets, source_keys):
                out.append((sources[0], list(targets) if isinstance(targets, list) else [targets], s.dim))
        return out


def _expand(anchor: str, sources: list[str], targets: list[str], keys: Iterable[str]):
    regex = _compile(anchor)
    for key in keys:
        m = regex.match(key)
        if m:
            groups = m.groups()
            filled_targets = [_fill(t, groups) for t in targets]
            filled_sources = [_fill(s, groups) for s in sources]
            yield (filled_targets if len(filled_targets) > 1 else filled_targets[0]), filled_sources


def load_rules(rules: str | Path | Mapping[str, Any] | Rules | None) -> Rules:
    """Rules from a YAML/JSON file, a dict, or a Rules object."""
    if rules is None:
        return Rules()
    if isinstance(rules, Rules):
        return rules
    if isinstance(rules, Mapping):
        return Rules.from_dict(rules)
    path = Path(rules)
    if not path.is_file():
        raise GraftError(f"{path}: rules file not found; expected a YAML or JSON file with rename/drop/merge/split.")
    text = path.read_text()
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:
        raise GraftError(f"{path}: rules file is not valid YAML/JSON ({exc}).") from None
    if data is not None and not isinstance(data, Mapping):
        raise GraftError(f"{path}: rules file holds a {type(data).__name__}; expected a mapping with rename/drop.")
    return Rules.from_dict(data)
