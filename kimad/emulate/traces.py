"""Bandwidth traces: when each emulated node's egress rate changes, and to what.

A trace is a time-ordered tuple of :class:`RateChange` (seconds since the cluster started, node
index, Mbit/s). Every node has a rate at time 0; after the last change a rate holds.

Built-ins, for ``nodes`` nodes, a base ``rate_mbit`` R and a ``duration_s`` D:

- ``constant``: R on every node.
- ``step-down``: R, then R/5 from D/2 on (100 -> 20 Mbit/s).
- ``step-up``: R/5, then R from D/2 on.
- ``square``: R and R/5 in turn, switching every ``period_s`` (R first): 100 -> 20 -> 100 -> ... Mbit/s.
- ``sine``: R * (0.6 + 0.4 sin(2 pi t / D)), sampled every ``period_s``; between 0.2 R and R.
- ``cloud``: a seeded multiplicative random walk per node, clamped to [0.1 R, R], every ``period_s``.
- ``hetero``: node i holds R * (1 - 0.75 i / (nodes - 1)), from R down to R/4.

``period_s`` left ``None`` takes the trace's default (:data:`DEFAULT_PERIOD_S`): 5 s phases for ``square``
(long enough for the estimator to settle, ~50 steps of a small CNN, and for several swings in a minute of
training), 1 s samples for ``sine`` and ``cloud``.

A CSV file gives ``time_s,node,mbit`` per line (node = index or ``*`` for every node; a header
line and ``#`` comments are allowed). Nodes the file leaves without a rate at time 0 start at R.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

from kimad.errors import KimadError


class TraceError(KimadError, ValueError):
    """A trace is unknown, malformed, or names a node or rate the cluster cannot have."""


@dataclass(frozen=True)
class RateChange:
    """At ``time_s`` seconds after start, node ``node``'s egress rate becomes ``mbit`` Mbit/s."""

    time_s: float
    node: int
    mbit: float


BUILTIN_TRACES = ("constant", "step-down", "step-up", "square", "sine", "cloud", "hetero")
DEFAULT_PERIOD_S = {"square": 5.0}  # a built-in's period when none is given; the others: 1 s


def _check_shape(nodes: int, rate_mbit: float, duration_s: float, period_s: float) -> None:
    if not isinstance(nodes, int) or nodes < 1:
        raise TraceError(f"nodes must be an integer >= 1, got {nodes!r}")
    if not rate_mbit > 0:
        raise TraceError(f"rate_mbit must be > 0 Mbit/s, got {rate_mbit!r}")
    if not duration_s > 0:
        raise TraceError(f"duration_s must be > 0 seconds, got {duration_s!r}")
    if not period_s > 0:
        raise TraceError(f"period_s must be > 0 seconds, got {period_s!r}")


def builtin_trace(
    name: str,
    nodes: int,
    rate_mbit: float = 100.0,
    duration_s: float = 60.0,
    period_s: float | None = None,
    seed: int = 0,
) -> tuple[RateChange, ...]:
    """The built-in trace ``name`` (one of :data:`BUILTIN_TRACES`); rates in Mbit/s, times in seconds
    (``period_s`` ``None``: the trace's default, :data:`DEFAULT_PERIOD_S`)."""
    if period_s is None:
        period_s = DEFAULT_PERIOD_S.get(name, 1.0)
    _check_shape(nodes, rate_mbit, duration_s, period_s)
    every = range(nodes)
    r = float(rate_mbit)
    samples = [k * period_s for k in range(int(duration_s / period_s) + 1)]
    if name == "constant":
        changes = [RateChange(0.0, i, r) for i in every]
    elif name == "step-down":
        changes = [RateChange(0.0, i, r) for i in every] + [RateChange(duration_s / 2, i, r / 5) for i in every]
    elif name == "step-up":
        changes = [RateChange(0.0, i, r / 5) for i in every] + [RateChange(duration_s / 2, i, r) for i in every]
    elif name == "square":
        changes = [RateChange(t, i, r if k % 2 == 0 else r / 5) for k, t in enumerate(samples) for i in every
                   if t < duration_s]  # a switch at the very end would be measured by nothing
    elif name == "sine":
        changes = [
            RateChange(t, i, r * (0.6 + 0.4 * math.sin(2 * math.pi * t / duration_s))) for t in samples for i in every
        ]
    elif name == "cloud":
        rng = random.Random(seed)
        level = [r] * nodes
        changes = []
        for t in samples:
            for i in every:
                if t > 0:
                    # Multiplicative steps: cloud links lose and regain capacity in proportion.
                    level[i] = min(r, max(0.1 * r, level[i] * math.exp(rng.gauss(0.0, 0.25))))
                changes.append(RateChange(t, i, level[i]))
    elif name == "hetero":
        changes = [RateChange(0.0, i, r * (1 - 0.75 * i / (nodes - 1)) if nodes > 1 else r) for i in every]
    else:
        raise TraceError(f"unknown trace {name!r}; built-ins are {', '.join(BUILTIN_TRACES)}, or give a .csv file")
    return tuple(changes)


def parse_csv_trace(text: str, nodes: int, rate_mbit: float = 100.0, source: str = "<csv>") -> tuple[RateChange, ...]:
    """Parse ``time_s,node,mbit`` lines (node = index or ``*``) into a sorted trace for ``nodes`` nodes."""
    _check_shape(nodes, rate_mbit, 1.0, 1.0)
    changes: list[RateChange] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = [f.strip() for f in line.split(",")]
        if number == 1 and fields and fields[0].lower() in ("time_s", "time"):
            continue
        where = f"{source} line {number} ({raw.strip()!r})"
        if len(fields) != 3:
            raise TraceError(f"{where}: expected 3 fields time_s,node,mbit, got {len(fields)}")
        try:
            time_s, mbit = float(fields[0]), float(fields[2])
        except ValueError:
            raise TraceError(f"{where}: time_s and mbit must be numbers") from None
        if not (math.isfinite(time_s) and time_s >= 0):
            raise TraceError(f"{where}: time_s must be a finite number of seconds >= 0")
        if not (math.isfinite(mbit) and mbit > 0):
            raise TraceError(f"{where}: mbit must be a finite rate > 0 Mbit/s")
        if fields[1] == "*":
            targets = list(range(nodes))
        else:
            try:
                node = int(fields[1])
            except ValueError:
                raise TraceError(f"{where}: node must be an index or '*', got {fields[1]!r}") from None
            if not 0 <= node < nodes:
                raise TraceError(f"{where}: node {node} is outside this cluster's nodes 0..{nodes - 1}")
            targets = [node]
        changes.extend(RateChange(time_s, i, mbit) for i in targets)
    if not changes:
        raise TraceError(f"{source}: no rate changes in the trace")
    started = {c.node for c in changes if c.time_s == 0.0}
    initial = [RateChange(0.0, i, float(rate_mbit)) for i in range(nodes) if i not in started]
    # A stable sort keeps the file's order among changes at the same instant: the last one wins.
    return tuple(sorted(initial + changes, key=lambda c: c.time_s))


def load_trace(
    spec: str,
    nodes: int,
    rate_mbit: float = 100.0,
    duration_s: float = 60.0,
    period_s: float | None = None,
    seed: int = 0,
) -> tuple[RateChange, ...]:
    """A built-in trace by name, or the CSV file at path ``spec`` (``period_s``: see :func:`builtin_trace`)."""
    if spec in BUILTIN_TRACES:
        return builtin_trace(spec, nodes, rate_mbit, duration_s, period_s, seed)
    path = Path(spec)
    if path.suffix.lower() == ".csv" or path.is_file():
        try:
            text = path.read_text()
        except OSError as error:
            raise TraceError(f"cannot read trace file {spec!r}: {error.strerror}") from None
        return parse_csv_trace(text, nodes, rate_mbit, source=str(path))
    raise TraceError(f"unknown trace {spec!r}; built-ins are {', '.join(BUILTIN_TRACES)}, or give a .csv file")


def initial_rates(trace: tuple[RateChange, ...], nodes: int) -> list[float]:
    """Each node's rate at time 0 in Mbit/s (the last time-0 change for it wins)."""
    rates: list[float | None] = [None] * nodes
    for change in trace:
        if change.time_s == 0.0:
            rates[change.node] = change.mbit
    missing = [i for i, r in enumerate(rates) if r is None]
    if missing:
        raise TraceError(f"the trace gives nodes {missing} no rate at time 0")
    return [float(r) for r in rates]
