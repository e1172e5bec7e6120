"""Menus: the compression options of one tensor, each priced in bytes, seconds and squared error.

A menu always starts with dense fp32 (level 0, error 0). Then, for tensors of at least
``min_compress_numel`` elements:

* ``topk`` at each density ``d`` of the grid: ``k = clip(max(1, round(d * numel)), 1, numel)``,
  level ``1 + i`` where ``i`` indexes the grid sorted from dense to sparse, so one level means the
  same density in every tensor (Kimad's uniform allocator picks one level for all);
* ``qsgd`` with 8, 4 and 2 bits, then ``sign``, if requested and their errors are given, at the
  next levels in that order (more compression, higher level, within a family; levels compare
  top-k densities with each other, not with quantisers).

Levels are consecutive in that order, so all large tensors built with the same densities and
compressors have the same levels.

Options are not pruned: a dominated option (more bytes and more error than another) stays in
the menu, and which to pick is the allocator's business. Two densities that round to the same
``k`` give two options with equal bytes, kept so that every level exists in every large tensor.
Tiny tensors (``numel < min_compress_numel``) get only level 0: compressing them saves almost
nothing and costs a collective's latency.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Mapping, Sequence

from kimad.compressors.wire import QSGD_BITS, TOPK_ROUNDING_REL_SQ_ERROR, MessageFormat, message_bytes
from kimad.control.cost import CostModel
from kimad.errors import KimadError

COMPRESSORS = ("topk", "qsgd", "sign")


class MenuError(KimadError, ValueError):
    """A menu cannot be built: unknown compressor, no options, or errors/densities that do not fit."""


@dataclasses.dataclass(frozen=True)
class Option:
    """One way to send one tensor.

    Attributes:
        label: unique within its menu, e.g. ``"dense32"``, ``"topk0.01"``, ``"qsgd4"``, ``"sign"``.
        fmt: the wire format.
        k: entries sent, for top-k (else ``None``).
        bits: bits per element, for qsgd (else ``None``).
        level: global compression level, 0 = dense fp32 (see the module docstring).
        bytes: one rank's message, bytes (``wire.message_bytes``).
        time_s: predicted seconds of its collective (``CostModel.option_time``).
        error: squared L2 compression error ``||g - C(g)||^2`` (expected, for stochastic compressors).
    """

    label: str
    fmt: MessageFormat
    k: int | None
    bits: int | None
    level: int
    bytes: int
    time_s: float
    error: float


def geometric_densities(count: int = 16, lo: float = 1e-4, hi: float = 1.0) -> tuple[float, ...]:
    """``count`` densities spaced geometrically from ``hi`` down to ``lo`` (dense to sparse), both included."""
    if not isinstance(count, int) or count < 1:
        raise MenuError(f"a density grid needs count >= 1 points, got {count!r}")
    if not (0 < lo <= hi <= 1):
        raise MenuError(f"densities need 0 < lo <= hi <= 1, got lo={lo!r}, hi={hi!r}")
    if count == 1:
        return (float(hi),)
    ratio = (lo / hi) ** (1.0 / (count - 1))
    return tuple([float(hi * ratio ** i) for i in range(count - 1)] + [float(lo)])


def _error(name: str, what: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise MenuError(f"tensor {name!r}: the {what} error must be a finite number >= 0, got {value!r}")
    return value


@functools.lru_cache(maxsize=64)
def _topk_labels(grid: tuple[float, ...]) -> dict[float, str]:
    """Each density's label, ``topk<density>`` with 6 significant digits, or all of them when that would clash in
    the grid (cached: a controller builds every tensor's menu from one grid, every step)."""
    short = [f"{d:.6g}" for d in grid]
    return {d: f"topk{d!r}" if short.count(s) > 1 else f"topk{s}" for d, s in zip(grid, short)}


@functools.lru_cache(maxsize=4096)
def _message_bytes(fmt: MessageFormat, numel: int, k: int | None, bits: int | None) -> int:
    """:func:`wire.message_bytes`, cached: a tensor's options have the same sizes every step."""
    return message_bytes(fmt, numel, k=k, bits=bits)


def build_menu(name: str, numel: int, *, cost_model: CostModel, densities: Sequence[float],
               topk_errors: Sequence[float], sq_norm: float, qsgd_errors: Mapping[int, float] | None = None,
               sign_error: float | None = None, compressors: Sequence[str] = ("topk",),
               min_compress_numel: int = 1024) -> tuple[Option, ...]:
    """The options of tensor ``name`` (``numel`` elements), sorted by level.

    Args:
        cost_model: prices each option's message in seconds.
        densities: top-k densities in (0, 1], distinct, any order.
        topk_errors: ``||g - topk_k(g)||^2`` for each density (same order as ``densities``), from the
            error profile op; each in ``[0, sq_norm]`` (dropping entries cannot remove more than all). An
            option's error adds the expected bfloat16 rounding of the sent values
            (``wire.TOPK_ROUNDING_REL_SQ_ERROR`` times ``sq_norm`` minus that error).
        sq_norm: ``||g||^2`` of the (corrected) gradient, >= 0.
        qsgd_errors: expected squared error per qsgd bit width (8, 4, 2); needed when ``"qsgd"`` is asked.
        sign_error: squared error of scaled sign; needed when ``"sign"`` is asked.
        compressors: which of ``"topk"``, ``"qsgd"``, ``"sign"`` to offer.
        min_compress_numel: smaller tensors are always sent dense.

    Raises:
        MenuError: unknown compressor, missing or invalid errors, bad densities, ``numel < 1``.
    """
    if not isinstance(numel, int) or isinstance(numel, bool) or numel < 1:
        raise MenuError(f"tensor {name!r}: numel must be an int >= 1, got {numel!r}")
    unknown = [c for c in compressors if c not in COMPRESSORS]
    if unknown:
        raise MenuError(f"tensor {name!r}: unknown compressor(s) {unknown}; known: {COMPRESSORS}")
    sq_norm = _error(name, "squared norm (sq_norm)", sq_norm)

    def option(label: str, fmt: MessageFormat, level: int, error: float, k: int | None = None,
               bits: int | None = None) -> Option:
        nbytes = _message_bytes(fmt, numel, k, bits)
        return Option(label, fmt, k, bits, level, nbytes, cost_model.message_time(fmt, nbytes), error)

    options = [option("dense32", MessageFormat.DENSE32, 0, 0.0)]
    if numel < min_compress_numel:
        return tuple(options)
    level = 1
    if "topk" in compressors:
        densities = [float(d) for d in densities]
        if not densities:
            raise MenuError(f"tensor {name!r}: top-k was asked for but the density grid is empty")
        if len(topk_errors) != len(densities):
            raise MenuError(f"tensor {name!r}: {len(topk_errors)} top-k errors for {len(densities)} densities")
        if len(set(densities)) != len(densities) or not all(0 < d <= 1 for d in densities):
            raise MenuError(f"tensor {name!r}: densities must be distinct and in (0, 1], got {densities}")
        labels = _topk_labels(tuple(densities))
        for d, err in sorted(zip(densities, topk_errors), key=lambda de: -de[0]):
            err = _error(name, f"top-k (density {d:g})", err)
            if err > sq_norm * (1 + 1e-6) + 1e-30:
                raise MenuError(f"tensor {name!r}: top-k error {err!r} at density {d:g} exceeds "
                                f"||g||^2 = {sq_norm!r}; errors and norm must come from the same gradient")
            k = min(numel, max(1, round(d * numel)))
            # the sent values' bfloat16 rounding adds its expected error on the sent part, ||g||^2 - err
            err += TOPK_ROUNDING_REL_SQ_ERROR * max(0.0, sq_norm - err)
            options.append(option(labels[d], MessageFormat.TOPK, level, err, k=k))
            level += 1
    if "qsgd" in compressors:
        if not qsgd_errors or any(b not in qsgd_errors for b in QSGD_BITS):
            raise MenuError(f"tensor {name!r}: qsgd was asked for but qsgd_errors does not give every bit "
                            f"width {QSGD_BITS}: {qsgd_errors!r}")
        for bits in QSGD_BITS:
            options.append(option(f"qsgd{bits}", MessageFormat.QSGD, level,
                                  _error(name, f"qsgd{bits}", qsgd_errors[bits]), bits=bits))
            level += 1
    if "sign" in compressors:
        if sign_error is None:
            raise MenuError(f"tensor {name!r}: sign was asked for but sign_error is None")
        options.append(option("sign", MessageFormat.SIGN, level, _error(name, "sign", sign_error)))
    labels = [o.label for o in options]
    if len(set(labels)) != len(labels):
        raise MenuError(f"tensor {name!r}: densities too close to label apart: {labels}")
    return tuple(options)
