"""Plans: the compression chosen for every tensor of one step, identical on every rank.

A :class:`Plan` is immutable and serialisable. :meth:`Plan.digest` is a sha256 over a canonical JSON
encoding (sorted keys, no whitespace, floats as Python's shortest round-trip ``repr``), so ranks can
compare 64 hex characters to detect a disagreement before it becomes a collective with mismatched
sizes; it is the same in every process and run for the same plan.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from typing import Sequence

from kimad.compressors.wire import MessageFormat
from kimad.errors import KimadError

_VERSION = 1


class PlanError(KimadError, ValueError):
    """A plan cannot be built or decoded (choice out of range, malformed JSON, NaN totals, ...)."""


@dataclasses.dataclass(frozen=True)
class PlanEntry:
    """The option chosen for one tensor: its label, wire format, ``k``/``bits``, level,
    predicted message bytes per rank, predicted seconds and squared error."""

    name: str
    label: str
    fmt: MessageFormat
    k: int | None
    bits: int | None
    level: int
    bytes: int
    time_s: float
    error: float


_ENTRY_FIELDS = tuple(f.name for f in dataclasses.fields(PlanEntry))  # (asdict deep-copies: slow every step)


@dataclasses.dataclass(frozen=True)
class Plan:
    """The whole step's choice.

    Attributes:
        entries: one :class:`PlanEntry` per tensor, in the order the menus were given.
        total_bytes: sum of the entries' message bytes (per rank).
        total_time_s: sum of the entries' predicted seconds (each tensor is its own collective).
        total_error: sum of the entries' squared errors.
        budget_s: the budget the allocator was given, seconds (may be ``inf``).
        over_budget: whether even the allocator's best choice exceeds the budget.
        step: the training step the plan is for.
        allocator: the allocator's name, e.g. ``"layerwise"`` or ``"uniform"``.
    """

    entries: tuple[PlanEntry, ...]
    total_bytes: int
    total_time_s: float
    total_error: float
    budget_s: float
    over_budget: bool
    step: int
    allocator: str

    @classmethod
    def from_choice(cls, menus: Sequence[tuple[str, Sequence]], choice: Sequence[int], *, budget_s: float,
                    over_budget: bool, step: int, allocator: str) -> "Plan":
        """The plan picking option ``choice[i]`` of menu ``menus[i] = (tensor name, options)``."""
        if len(menus) != len(choice):
            raise PlanError(f"{len(choice)} choices for {len(menus)} menus; need one per tensor")
        entries = []
        for (name, options), c in zip(menus, choice):
            if not isinstance(c, int) or isinstance(c, bool) or not 0 <= c < len(options):
                raise PlanError(f"tensor {name!r}: choice {c!r} is not an index of its {len(options)} options")
            o = options[c]
            entries.append(PlanEntry(name, o.label, MessageFormat(o.fmt), o.k, o.bits, o.level, o.bytes,
                                     float(o.time_s), float(o.error)))
        return cls(tuple(entries), sum(e.bytes for e in entries), math.fsum(e.time_s for e in entries),
                   math.fsum(e.error for e in entries), float(budget_s), bool(over_budget), step, allocator)

    def __post_init__(self) -> None:
        if not isinstance(self.step, int) or isinstance(self.step, bool) or self.step < 0:
            raise PlanError(f"a plan's step must be an int >= 0, got {self.step!r}")
        if not isinstance(self.allocator, str) or not self.allocator:
            raise PlanError(f"a plan names its allocator with a non-empty string, got {self.allocator!r}")
        names = [e.name for e in self.entries]
        if len(set(names)) != len(names):
            repeated = sorted({n for n in names if names.count(n) > 1})
            raise PlanError(f"a plan names each tensor once; repeated: {repeated}")
        values = [self.total_time_s, self.total_error, self.budget_s, *(e.time_s for e in self.entries),
                  *(e.error for e in self.entries)]
        if any(math.isnan(v) for v in values):  # (the names are only formatted for the message)
            whats = ["total_time_s", "total_error", "budget_s", *(f"time_s of {e.name!r}" for e in self.entries),
                     *(f"error of {e.name!r}" for e in self.entries)]
            what = next(w for w, v in zip(whats, values) if math.isnan(v))
            raise PlanError(f"plan {what} is NaN; plans carry only real numbers")

    def to_dict(self) -> dict:
        """Plain JSON-ready dict (formats as their string values)."""
        return {"version": _VERSION, "step": self.step, "allocator": self.allocator, "budget_s": self.budget_s,
                "over_budget": self.over_budget, "total_bytes": self.total_bytes,
                "total_time_s": self.total_time_s, "total_error": self.total_error,
                "entries": [{**{f: getattr(e, f) for f in _ENTRY_FIELDS}, "fmt": e.fmt.value} for e in self.entries]}

    def to_json(self) -> str:
        """Canonical JSON: sorted keys, no whitespace, floats as shortest round-trip repr (``Infinity`` for inf)."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), allow_nan=True)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        """Decode :meth:`to_json`; ``Plan.from_json(p.to_json()) == p``."""
        try:
            d = json.loads(text)
            if d.get("version") != _VERSION:
                raise PlanError(f"plan JSON version {d.get('version')!r} is not {_VERSION}")
            entries = tuple(PlanEntry(**{**e, "fmt": MessageFormat(e["fmt"])}) for e in d["entries"])
            return cls(entries, d["total_bytes"], d["total_time_s"], d["total_error"], d["budget_s"],
                       d["over_budget"], d["step"], d["allocator"])
        except PlanError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise PlanError(f"not a Kimad plan JSON ({type(e).__name__}: {e})") from None

    def digest(self) -> str:
        """sha256 hex of :meth:`to_json`: equal plans give equal digests in every process and run."""
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()

    def __len__(self) -> int:
        return len(self.entries)
