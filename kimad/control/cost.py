"""Alpha-beta cost model of the ring collectives, and the prices of one tensor's message.

A ring collective over ``n`` ranks costs ``latency_terms * alpha + link_bytes * framing * 8 / bandwidth``
seconds, where (the only place these formulas live; the estimator inverts them):

``allreduce`` of ``D`` bytes:            ``2 (n - 1) / n * D`` bytes on each link, ``2 (n - 1)`` latencies
                                        (reduce-scatter then allgather, ``n - 1`` rounds each).
``allgather`` of ``m`` bytes per rank:   ``(n - 1) * m`` bytes on each link, ``n - 1`` latencies.

With ``n == 1`` nothing is communicated and both cost 0 seconds.

Framing: a collective counts message (payload) bytes, but a link's rate is quoted in -- and a shaper or NIC
meters -- the frames that carry them, headers included. ``framing`` is wire bytes per payload byte; the
bandwidth is then the link's rate in wire bits, the rate one would read off the link itself. For bulk TCP over
IPv4 and Ethernet with MTU 1500 (:data:`TCP_ETHERNET_FRAMING`) each 1448-byte segment (1500 less 20 IP, 20 TCP
and 12 timestamp-option bytes) goes out as a 1514-byte frame (+14 Ethernet header, as Linux's traffic control
meters it): 4.6% of the rate is headers. ``framing = 1`` makes the bandwidth the payload rate.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from kimad.compressors.wire import MessageFormat, message_bytes
from kimad.errors import KimadError

COLLECTIVES = ("allreduce", "allgather")
TCP_ETHERNET_FRAMING = 1514 / 1448  # wire bytes per payload byte: bulk TCP/IPv4 over Ethernet, MTU 1500


class CostModelError(KimadError, ValueError):
    """A cost model was built or queried with an impossible argument (bandwidth <= 0, world size < 1, ...)."""


def check_framing(framing: float, error: type[Exception] = CostModelError) -> float:
    """``framing`` as a float if it is a finite number >= 1 (wire bytes per payload byte), else raise ``error``."""
    if isinstance(framing, bool) or not isinstance(framing, (int, float)) or not (1.0 <= framing < math.inf):
        raise error(f"framing must be a finite number >= 1 (wire bytes per payload byte), got {framing!r}")
    return float(framing)


def _check_collective(collective: str, world_size: int) -> None:
    if collective not in COLLECTIVES:
        raise CostModelError(f"unknown collective {collective!r}; known: {COLLECTIVES}")
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise CostModelError(f"world_size must be an int >= 1, got {world_size!r}")


def link_bytes(collective: str, world_size: int, nbytes: float) -> float:
    """Bytes each rank sends over its ring link for one collective.

    Args:
        collective: ``"allreduce"`` (``nbytes`` = the whole buffer, summed) or ``"allgather"``
            (``nbytes`` = this rank's contribution).
        world_size: number of ranks ``n`` >= 1.
        nbytes: bytes, >= 0.
    """
    _check_collective(collective, world_size)
    n = world_size
    if collective == "allreduce":
        return 2.0 * (n - 1) / n * nbytes
    return float(n - 1) * nbytes


def latency_terms(collective: str, world_size: int) -> int:
    """How many per-message latencies (alpha) one ring collective pays: ``2 (n-1)`` or ``n-1``."""
    _check_collective(collective, world_size)
    return 2 * (world_size - 1) if collective == "allreduce" else world_size - 1


@dataclasses.dataclass(frozen=True)
class CostModel:
    """Predicted seconds of Kimad's collectives for a bandwidth estimate and a world size.

    Attributes:
        bandwidth_bps: link bandwidth in wire bits per second (> 0, may be ``inf``).
        latency_s: per-message latency alpha in seconds (>= 0).
        world_size: number of ranks ``n`` (>= 1).
        batched: the step's messages travel together, in collectives whose latencies are paid once per
            step (:meth:`batched_byte_budget`), so :meth:`option_time` prices an option's bytes only.
            Unbatched, each option pays its own collective's latencies too.
        framing: wire bytes per payload byte (>= 1; see the module docstring): 1 makes ``bandwidth_bps``
            the payload rate.
    """

    bandwidth_bps: float
    latency_s: float
    world_size: int
    batched: bool = False
    framing: float = 1.0

    def __post_init__(self) -> None:
        if not (self.bandwidth_bps > 0):  # also rejects NaN
            raise CostModelError(f"bandwidth_bps must be > 0 bits/s, got {self.bandwidth_bps!r}")
        if not (math.isfinite(self.latency_s) and self.latency_s >= 0):
            raise CostModelError(f"latency_s must be a finite number >= 0 seconds, got {self.latency_s!r}")
        _check_collective("allreduce", self.world_size)
        object.__setattr__(self, "framing", check_framing(self.framing))

    @classmethod
    def from_estimate(cls, estimate, world_size: int, batched: bool = False) -> "CostModel":
        """Build from anything with ``bandwidth_bps``, ``latency_s`` and optionally ``framing`` (1 if absent;
        e.g. a ``BandwidthEstimator.estimate()``, whose bandwidth is in the framing it was fitted with)."""
        return cls(float(estimate.bandwidth_bps), float(estimate.latency_s), world_size, batched,
                   getattr(estimate, "framing", 1.0))

    def collective_time(self, collective: str, nbytes: float) -> float:
        """Seconds of one ``collective`` moving ``nbytes`` (see :func:`link_bytes` for their meaning)."""
        if not (nbytes >= 0 and math.isfinite(nbytes)):
            raise CostModelError(f"a {collective} moves a finite number >= 0 of bytes, got {nbytes!r}")
        _check_collective(collective, self.world_size)
        return self._ring_time(collective, nbytes, with_latency=True)

    def _ring_time(self, collective: str, nbytes: float, with_latency: bool) -> float:
        """Seconds of a ring ``collective`` of ``nbytes`` (both already checked): :func:`link_bytes` in wire bits
        at the bandwidth, plus :func:`latency_terms` latencies when ``with_latency``. Written out, not by calling
        those two, since the controller prices every option of every tensor with it every step."""
        n = self.world_size
        if n == 1:
            return 0.0
        if collective == "allreduce":
            link, terms = 2.0 * (n - 1) / n * nbytes, 2 * (n - 1)
        else:
            link, terms = float(n - 1) * nbytes, n - 1
        seconds = 8.0 * self.framing * link / self.bandwidth_bps
        return terms * self.latency_s + seconds if with_latency else seconds

    def allreduce(self, total_bytes: float) -> float:
        """Seconds to allreduce a buffer of ``total_bytes`` bytes."""
        return self.collective_time("allreduce", total_bytes)

    def allgather(self, bytes_per_rank: float) -> float:
        """Seconds to allgather ``bytes_per_rank`` bytes from every rank."""
        return self.collective_time("allgather", bytes_per_rank)

    def option_bytes(self, fmt: MessageFormat | str, numel: int, *, k: int | None = None,
                     bits: int | None = None) -> int:
        """Bytes of one rank's message for a tensor of ``numel`` elements (exactly :func:`wire.message_bytes`)."""
        return message_bytes(fmt, numel, k=k, bits=bits)

    def option_link_bytes(self, fmt: MessageFormat | str, numel: int, *, k: int | None = None,
                          bits: int | None = None) -> float:
        """Bytes each rank puts on its link to exchange this message (0 when ``n == 1``)."""
        fmt = MessageFormat(fmt)
        return link_bytes(fmt.collective, self.world_size, self.option_bytes(fmt, numel, k=k, bits=bits))

    def option_time(self, fmt: MessageFormat | str, numel: int, *, k: int | None = None,
                    bits: int | None = None) -> float:
        """Seconds to exchange one tensor's message: dense formats by allreduce, the others by allgather
        (without the collective's latencies when :attr:`batched`)."""
        fmt = MessageFormat(fmt)
        return self.message_time(fmt, self.option_bytes(fmt, numel, k=k, bits=bits))

    def message_time(self, fmt: MessageFormat | str, nbytes: float) -> float:
        """:meth:`option_time` of a message of ``nbytes`` bytes per rank in format ``fmt`` (what the controller
        prices every option with: the message sizes are cached)."""
        if not isinstance(fmt, MessageFormat):
            fmt = MessageFormat(fmt)
        if not (nbytes >= 0 and math.isfinite(nbytes)):
            raise CostModelError(f"a {fmt.value} message has a finite number >= 0 of bytes, got {nbytes!r}")
        return self._ring_time(fmt.collective, nbytes, with_latency=not self.batched)

    def dense_rides(self, nbytes: int) -> bool:
        """Whether ``nbytes`` of dense float32 cost less added to a step's allgather (its bytes only: the
        allgather's latency is paid anyway) than in an allreduce of their own.

        Always at 2 ranks (equal link bytes, no extra latency); at n > 2 ranks up to
        ``2 * latency * bandwidth * n / (n - 2)`` wire bits, as a ring allgather sends each rank's bytes n - 1
        times against an allreduce's ``2 (n - 1) / n`` but the allreduce pays ``2 (n - 1)`` latencies.
        """
        added = self.collective_time("allgather", nbytes) - self.latency_s * latency_terms("allgather", self.world_size)
        return added <= self.collective_time("allreduce", nbytes)

    def batched_byte_budget(self, compressible: Sequence[bool], numels: Sequence[int], budget_s: float,
                            min_byte_share: float) -> tuple[float, float]:
        """``(bytes_budget_s, issued_s)`` for a step sent as one batch: one allgather, plus an allreduce
        for the always-dense tensors (``compressible[i]`` false; ``numels[i]`` float32 each) unless they
        ride in it (:meth:`dense_rides`).

        ``issued_s`` are those collectives' latencies, paid whatever is sent; ``bytes_budget_s`` what is
        left of ``budget_s`` for the options' bytes (priced by a :attr:`batched` model), and never less
        than ``min_byte_share * budget_s``: when latency eats the budget, a plan of the cheapest options
        would starve training (and leave the link's bandwidth unobservable), so the step overruns
        instead. The step's predicted time is ``issued_s`` plus its options' (batched) times.
        """
        if len(compressible) != len(numels):
            raise CostModelError(f"{len(compressible)} compressible flags for {len(numels)} tensors")
        if not 0.0 <= min_byte_share <= 1.0:
            raise CostModelError(f"min_byte_share must be in [0, 1], got {min_byte_share!r}")
        if self.world_size == 1:
            return budget_s, 0.0
        always_dense = 4 * sum(n for c, n in zip(compressible, numels) if not c)
        issued = self.latency_s * latency_terms("allgather", self.world_size)
        if always_dense and not self.dense_rides(always_dense):
            issued += self.latency_s * latency_terms("allreduce", self.world_size)
        return max(budget_s - issued, min_byte_share * budget_s), issued

    def dense_break_even_density(self, numel: int) -> float:
        """The top-k density ``k / numel`` above which a top-k allgather costs more than a dense fp32 allreduce.

        Derivation (bandwidth terms): a top-k message of ``m`` bytes costs ``(n-1) m`` bytes per link,
        dense fp32 costs ``2 (n-1)/n * D`` with ``D = 4 numel``, so sparse wins iff ``m < 2 D / n``
        (plus ``alpha * bandwidth / (8 framing)`` bytes, because the allgather pays ``n-1`` fewer latencies).
        With bfloat16 values and block16 offsets ``m ~ 4 k``, i.e. ``k / numel < 2 / n``; with the
        ``numel / 8``-byte bitmap ``m ~ 2 k + numel / 8``, i.e. ``k / numel < 4 / n - 1 / 16`` (the smaller
        message is sent, so the bitmap decides for ``n < 32``). Either way sparse only pays off below roughly
        ``2/n`` density (a message of at most ``2/n`` of the dense bytes). Returns the largest ``k / numel`` whose
        top-k time is <= the dense time (0.0 if even ``k = 0`` loses); 1.0 when ``n == 1`` (nothing is communicated).
        """
        if not isinstance(numel, int) or numel < 1:
            raise CostModelError(f"numel must be an int >= 1, got {numel!r}")
        if self.world_size == 1:
            return 1.0
        dense = self.option_time(MessageFormat.DENSE32, numel)

        def wins(k: int) -> bool:
            return self.option_time(MessageFormat.TOPK, numel, k=k) <= dense

        if not wins(0):
            return 0.0
        lo, hi = 0, numel  # message_bytes is non-decreasing in k: binary search the last winning k
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if wins(mid) else (lo, mid - 1)
        return lo / numel
