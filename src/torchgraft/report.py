"""What a transfer did: one entry per target tensor (loaded, adapted or new), the source tensors left unused,
warnings, numeric problems of the loaded values, and whether the result was verified by running both models.

A `Report` is made by applying a `Plan` (`torchgraft.match.plan`): the plan says what will happen and why, the
report says what happened.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torchgraft.errors import GraftError
from torchgraft.io.read import Source
from torchgraft.match.names import is_benign
from torchgraft.numeric import check_tensor, describe_problems
from torchgraft.summary import collapse_indices

__all__ = ["Entry", "Report", "STATUSES", "LOW_OVERLAP", "check_finite", "check_loads_something", "check_new",
           "sources_of"]

#: A report entry's status: the source tensor as it is, the output of a named adapter, or the model's own value.
STATUSES = ("loaded", "adapted", "new")
#: Below this share of the target's values coming from the source, a transfer warns (wrong checkpoint?).
LOW_OVERLAP = 0.10


def sources_of(source: str | list[str] | None) -> list[str]:
    """The source tensor keys of an entry or a plan step, as a list."""
    return [source] if isinstance(source, str) else list(source or [])


@dataclass
class Entry:
    """What one target tensor received."""

    target: str
    source: str | list[str] | None
    status: str  # "loaded" | "adapted" | "new"
    method: str  # "exact" | "prefix" | "rule" | "rule:merge" | "rule:split" | "structure" | "none"
    adapter: str | None = None
    note: str = ""
    args: dict[str, Any] | None = None  # the adapter's arguments
    layout: str | None = None  # the layout adapter that laid another framework's stored value out

    @property
    def benign(self) -> bool:
        return self.status == "new" and is_benign(self.target)


def check_new(items: Sequence[Any], allow_new: Sequence[str], new: str) -> None:
    """Raise for `--strict` unless every item (entry or plan step) whose status is `new` is benign or allowed."""
    missing = [e.target for e in items if _status(e) == new and not is_benign(e.target)
               and not any(fnmatch.fnmatchcase(e.target, p) for p in allow_new)]
    if missing:
        shown = ", ".join(label for label, _ in collapse_indices(missing)[:5])
        raise GraftError(
            f"--strict: {len(missing)} target tensors would stay new ({shown}); expected every tensor loaded "
            "or adapted. Nothing was written. Add a rule for them, or allow them with --allow-new PATTERN "
            "(e.g. --allow-new 'fc.*' for a new head)."
        )


def check_loads_something(items: Sequence[Any], source: str, target: str) -> None:
    """Raise unless some item (entry or plan step) loads or adapts a tensor beyond benign buffers such as
    `num_batches_tracked`: writing the output would write a freshly initialised model."""
    if all(_status(e) == "new" or is_benign(e.target) for e in items):
        raise GraftError(f"nothing to load: no tensor of {source} fits {target} ({len(items)} target tensors would "
                         "stay new); expected weights of this model or a relative. Nothing was written. Compare them "
                         "with `graft diff`, or pass --allow-empty to write the model as initialised.")


def check_finite(problems: Sequence[dict[str, Any]]) -> None:
    """Raise for `--strict` when any of `problems` (`numeric.check_tensor`'s, keyed by `key`) is NaN or Inf."""
    bad = [p for p in problems if p["problem"] in ("nan", "inf")]
    if bad:
        raise GraftError(
            f"--strict: {len(bad)} loaded source tensors hold NaN or infinite values ({describe_problems(bad[:3])}"
            f"{', ...' if len(bad) > 3 else ''}); the checkpoint is damaged or diverged. Nothing was written. "
            "Use another checkpoint, or drop those tensors with a rule."
        )


def _status(item: Any) -> str:
    return getattr(item, "status", None) or getattr(item, "action")


@dataclass
class Report:
    """The outcome of a transfer: one entry per target tensor, and the source tensors left unused."""

    source: str
    target: str
    entries: list[Entry]
    unused_source: list[dict[str, str]] = field(default_factory=list)
    """`{"source": key, "why": reason}` for each source tensor no target took."""
    warnings: list[str] = field(default_factory=list)
    target_numel: dict[str, int] = field(default_factory=dict, repr=False)
    numeric: list[dict[str, Any]] = field(default_factory=list)
    """NaN/Inf/all-zero source tensors that were loaded: `{"source", "problem", "count", "target"}` each."""
    verification: Any = None
    """A `torchgraft.verify.Verification` when the transfer was checked against the source model, else None."""
    notes: list[str] = field(default_factory=list)
    """How the transfer ran (model built on the meta device or not, and why), for the curious."""
    model: Any = field(default=None, repr=False, compare=False)
    """The model that received the tensors (the one `transfer(build=...)` built)."""
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Module attributes set from the source (a Keras BatchNorm's eps and momentum), by target module."""
    _numeric_seen: set[str] = field(default_factory=set, repr=False, compare=False)

    def counts(self) -> dict[str, int]:
        c = dict.fromkeys(STATUSES, 0)
        for e in self.entries:
            c[e.status] += 1
        c["unused_source"] = len(self.unused_source)
        return c

    @property
    def verified(self) -> bool | None:
        """True when both models computed the same, False when they diverged, None when not checked."""
        return None if self.verification is None else bool(self.verification.ok)

    @property
    def loaded_fraction(self) -> float:
        """Share of the target's elements that came from the source (loaded or adapted)."""
        total = sum(self.target_numel.values()) or 1
        done = sum(self.target_numel.get(e.target, 0) for e in self.entries if e.status != "new")
        return done / total

    def entry(self, target: str) -> Entry:
        for e in self.entries:
            if e.target == target:
                return e
        raise KeyError(target)

    def by_status(self, status: str) -> list[Entry]:
        return [e for e in self.entries if e.status == status]

    def to_dict(self) -> dict[str, Any]:
        entries = []
        for e in self.entries:
            row = {"target": e.target, "source": e.source, "status": e.status, "method": e.method,
                   "adapter": e.adapter, "note": e.note}
            if e.args:
                row["args"] = e.args
            if e.layout:
                row["layout"] = e.layout
            entries.append(row)
        out = {
            "source": self.source,
            "target": self.target,
            "entries": entries,
            "unused_source": self.unused_source,
            "summary": self.counts(),
            "warnings": self.warnings,
            "numeric": self.numeric,
            "verified": self.verified,
            **({"settings": self.settings} if self.settings else {}),
        }
        if self.verification is not None:
            out["verify"] = self.verification.to_dict()
            divergence = self.verification.first_divergence
            if divergence is not None:
                out["first_divergence"] = {"target_module": divergence.target_module,
                                           "source_module": divergence.source_module,
                                           "max_abs": divergence.max_abs_diff}
        return out

    def summary(self, max_rows: int = 12) -> str:
        """A short text: counts, then new and unused tensors with layer indices collapsed ("... and N more")."""
        c = self.counts()
        lines = [f"{c['loaded']} loaded, {c['adapted']} adapted, {c['new']} new, "
                 f"{c['unused_source']} source tensors unused ({self.loaded_fraction:.1%} of the target's values "
                 "from the source)"]
        if self.verification is not None:
            lines.append(("verified: " if self.verified else "not verified: ") + self.verification.summary())
        lines += [f"warning: {w}" for w in self.warnings]
        for title, names in (("adapted", [f"{e.target} ({e.adapter})" for e in self.by_status("adapted")]),
                             ("new", [e.target for e in self.by_status("new") if not e.benign]),
                             ("unused", [u["source"] for u in self.unused_source])):
            rows = collapse_indices(names)
            if rows:
                lines.append(f"{title}:")
                lines += [f"  {label}" + (f"  x{len(m)}" if len(m) > 1 else "") for label, m in rows[:max_rows]]
                if len(rows) > max_rows:
                    lines.append(f"  ... and {len(rows) - max_rows} more (report.to_dict() lists them all)")
        return "\n".join(lines)

    def check_numeric(self, source: Source, entries: Sequence[Entry] | None = None,
                      known: Mapping[str, list[dict[str, Any]]] | None = None) -> None:
        """Check the source tensors that `entries` (default: every loaded or adapted one) take, once each: NaN,
        Inf and all-zero weights are added to `numeric`, with a warning per source tensor. `known` holds the
        problems of tensors already checked (by `Plan.check_strict`), which are not read again."""
        for e in (entries if entries is not None else [e for e in self.entries if e.status != "new"]):
            for name in sources_of(e.source):
                if name in self._numeric_seen or name not in source.info:
                    continue
                self._numeric_seen.add(name)
                found = (known or {}).get(name)
                for problem in found if found is not None else check_tensor(name, source[name]):
                    self.add_numeric(problem, e.target)

    def add_numeric(self, problem: dict[str, Any], target: str) -> None:
        row = {"source": problem["key"], **{k: v for k, v in problem.items() if k != "key"}, "target": target}
        self.numeric.append(row)
        self.warnings.append(f"source tensor {describe_problems([problem])} (loaded into {target})")

    def check_strict(self, allow_new: Sequence[str] = (), source: Source | None = None) -> None:
        """Raise unless every target tensor is loaded or adapted (benign buffers and `allow_new` globs aside),
        and (with `source`, or after `apply`) unless every loaded source tensor is finite."""
        check_new(self.entries, allow_new, "new")
        if source is not None:
            self.check_numeric(source)
        check_finite([{**p, "key": p["source"]} for p in self.numeric])
