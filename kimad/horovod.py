"""Kimad as a compression plugin of an unpatched Horovod (``horovod.torch``, tested with 0.28.1 / Gloo).

Usage::

    import horovod.torch as hvd, kimad
    hvd.init()
    compression = kimad.Kimad(model.named_parameters(), budget_s=0.05, allocator="layerwise",
                              compressors=("topk",), error_feedback="ef21")
    opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters(), compression=compression)

or ``kimad.horovod.DistributedOptimizer(opt, named_parameters=..., budget_s=..., ...)``, which does both.

How it fits Horovod's compression interface
-------------------------------------------
Horovod calls ``compress(tensor)`` once per gradient (from its backward hooks, or from
``optimizer.synchronize()`` for gradients not yet submitted), allreduces what it returns, and only
after every ``compress`` of the step calls ``decompress(output, ctx)`` for each gradient. Kimad
needs all gradients at once (one plan for the whole step), so:

1. ``compress(tensor)`` finds the parameter's name by identity (``tensor is p.grad`` over the
   named parameters given to :class:`Kimad`), stashes the gradient and returns an EMPTY tensor:
   Horovod's own allreduce then costs only its latency (0-element allreduces work in 0.28.1).
2. The first ``decompress`` of a step runs the whole Kimad step for all stashed gradients, in the
   order of ``named_parameters`` (the same on every rank, so every rank issues the same collectives
   in the same order and nothing deadlocks):

   a. error feedback (:mod:`kimad.feedback`) forms ``v`` per tensor (EF21 ``g - h``, EF ``g + e``, or ``g``);
   b. :func:`kimad.ops.topk_profile` gives ``||v||^2`` and the top-k errors at the controller's densities
      (and :func:`kimad.ops.quant_error_estimate` the QSGD 8/4/2-bit and sign errors, when offered); its
      histogram pass is kept (per tensor, in :class:`~kimad.feedback.ErrorFeedback`) for step d;
   c. ONE float64 allgather (name ``kimad.agree``; half the latency terms of a ring allreduce) of each
      rank's profiles, its timings of the previous step's allgather and allreduce, its compute time and a
      fingerprint of everything else its plan depends on (options, step, link estimate, budget, the step's
      tensors: :meth:`Kimad._fingerprint`); ranks whose fingerprints differ all raise
      :class:`PlanMismatchError` here. Every rank averages the rows in rank order, so all get bit-identical figures.
      A collective's time on a rank runs from its submission to completion, so it includes waiting for
      ranks that submitted later (compute skew); the rank that submitted last waited for nobody, so the
      MINIMUM over ranks is the link's time, and that is the sample every rank feeds to the
      :class:`~kimad.control.Controller`. The agree allgather of the previous step is such a sample
      too: being small, it pins the latency while the step's allgather pins the bandwidth. The dense
      allreduce (e) is timed but not fed after an allgather of messages: it starts right after the allgather,
      which ranks leave at different times, so the rank that starts it last finds its peers' first segments
      already sent and the minimum understates the link's time (4 emulated ranks, 100 Mbit/s: its samples
      implied 1.3-1.9x the shaped rate, the allgathers' 1.0-1.1x; timed alone, by
      ``benchmarks/ring_goodput.py``, an allreduce gets 0.9x). After an allgather of the digest prefix alone (an
      all-dense plan, the run's first step among them) the ranks start it nearly together, and it is the
      step's only sample with bits in it: fed (4 emulated ranks, 100 Mbit/s: plans 2-7 are then priced at
      0.90-1.07x the link; without it, in three runs, mostly at 0.01-0.5x, once at 1.7x).
      Every rank plans from the same averaged profiles and samples, so the plans are identical
      (:meth:`~kimad.control.Plan.digest`);
   d. top-k tensors are encoded with :func:`kimad.ops.topk_encode` (updating the local error-feedback
      state; it starts from step b's histogram, so v is read twice per step, not three times) into the exact
      wire format of :mod:`kimad.compressors.topk` (bfloat16 values, the state keeping their rounding; positions
      as int32, a bitmap or 16-bit block offsets, whichever is smallest); QSGD and sign tensors with
      :func:`kimad.ops.qsgd_encode` / :func:`kimad.ops.sign_encode` (same state update; QSGD's draws
      keyed by step, tensor and rank) into the layout of :mod:`kimad.compressors.quant`, in buckets of
      ``DEFAULT_BUCKET`` elements; dense tensors (``v``) are concatenated into one float32 buffer;
   e. ONE allgather (``kimad.sparse.<row bytes>``) of this rank's top-k and quantised messages, prefixed by
      the first 8 bytes of the plan digest and followed by the dense buffer when adding its bytes to the
      allgather costs less than a Sum allreduce of its own (always at 2 ranks; small buffers such as biases
      otherwise: a ring allreduce pays 2(n-1) latencies); else ONE Sum allreduce (``kimad.dense.<elements>``)
      of the dense buffer follows. The allgather's row (bytes per rank) is a size of a fixed geometric grid
      (:func:`row_grid`, ``ROW_GRID_PERCENT`` apart): the plan is priced to fill the largest grid row the byte
      budget holds and the message is zero-padded to the grid. Each row size has its own collective name, so
      Horovod's response cache (keyed by name, holding one shape per name) holds every row size once seen, and the
      ranks skip the coordinator's negotiation of the shape. Each collective is timed from submission to
      completion; its bytes per rank are exact. Kimad waits for its collectives with :func:`synchronize` (polls
      with short sleeps), not Horovod's own, which spins and so takes a core from the ranks that are still
      working when ranks outnumber cores.
      Kimad's collectives do not overlap the backward pass (they run after it) and the skew between
      ranks is removed as in (c), so these timings are honest throughput samples;
   f. every rank checks every rank's digest prefix in the gathered bytes; any mismatch makes all
      ranks raise :class:`PlanMismatchError` (all see the same gathered bytes, so all raise, none hangs). The
      fingerprint (c) stops ranks with different options or state before their row sizes, and so their
      collectives' names, can differ; this check catches plans that differ all the same (a bug: plans are
      functions of the fingerprinted inputs and the agreed figures);
   g. each rank's top-k message is decoded and summed with :func:`kimad.ops.sparse_sum` (a
      quantised one with :func:`kimad.ops.quant_decode_accumulate`) into the tensor's aggregate ``c``
      (scaled by ``1 / size`` for Average; for EF21 in a buffer reused across tensors and steps); dense
      tensors come from the allreduce, or from the ranks' gathered dense buffers summed in rank order.
      EF21: the optimizer sees (a copy of) the global estimate ``H += c``; EF / None: it sees ``c``.
3. ``decompress`` returns the tensor's result, reshaped and cast to the gradient's dtype.

A static plan (``allocator="static"``: top-k at one fixed density, the GRACE/DGC baseline) depends on nothing the
ranks would agree on, so it skips b and c: no error profiles, no agree allgather (on 4 emulated nodes at
100 Mbit/s that collective alone took 9-17 ms of a 137 ms step), no link samples (the cost model that routes the
dense tensors stays at the prior, or the fixed link, on every rank alike). Its row is the same size every step
(aligned, not padded to the grid) and gathered under one name, ``kimad.static``: ranks whose options differ gather
rows of different sizes or digests, and (f) stops them all with :class:`PlanMismatchError`.

Budget and batching (:meth:`~kimad.control.cost.CostModel.batched_byte_budget`): Kimad sends a whole
step in one allgather (and an allreduce only for a dense part too large to ride along, see e), so
the controller is ``batched``: it prices every option by its bytes only, and the allocator gets the
user's budget less the latencies of the collectives actually issued. Pricing each tensor as its own
collective instead would make a model of many tensors look latency-bound (and compress it far more
than the link requires) and would favour a top-k message larger than the dense tensor for its
allgather's fewer latencies. When the issued latencies alone take more than ``1 - min_byte_share``
of the budget, ``min_byte_share`` of the budget is still given to bytes: the step overruns
(``over_budget``) rather than sending nearly nothing, which would stall training and leave the
link's bandwidth unobservable. The ``kimad.agree`` allgather is overhead outside the budget. With
one rank nothing crosses a link: every plan is dense.

Reduction op: read from the calling ``DistributedOptimizer`` (``self.op`` of the frame that calls
``compress``), falling back to ``Kimad(op=...)`` (default Average). Average and Sum are supported
(Adasum is not). ``gradient_predivide_factor`` only scales Horovod's allreduce of the empty tensor;
Kimad averages exactly (``1 / size``), so the factor cancels out for Average as it does in Horovod.

Gradients are consumed as Horovod hands them over: with ``backward_passes_per_step > 1`` Horovod
accumulates locally and calls ``compress`` once. Frozen parameters never reach ``compress``; a
parameter without a gradient is given a zero one by Horovod. Process sets other than the global one
are not supported.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass
from typing import Iterable, NamedTuple

import torch

from kimad.compressors.topk import decode_topk, encode_topk
from kimad.compressors.wire import DEFAULT_BUCKET, QSGD_BITS, MessageFormat
from kimad.control import AutoBudget, BandwidthEstimator, Controller, Plan, TensorProfile
from kimad.control.cost import TCP_ETHERNET_FRAMING, CostModel
from kimad.errors import KimadError
from kimad.feedback import ErrorFeedback

SUPPORTED_COMPRESSORS = ("topk", "qsgd", "sign")
DIGEST_PREFIX_BYTES = 8
# The step's figures written as TensorBoard scalars ``kimad/<key>`` (see ``Kimad(tensorboard_dir=...)``).
TENSORBOARD_SCALARS = ("bandwidth_bps", "latency_s", "budget_s", "predicted_bytes", "actual_bytes", "predicted_comm_s",
                       "actual_comm_s", "agree_s", "compute_s", "overhead_s", "kimad_step_s", "predicted_error")
_STATE_VERSION = 1
# How long a rank sleeps between polls of its own collective: Horovod's synchronize() spins (yield in a loop),
# so a rank waiting for slower ones took a core from them; at 4 ranks on 2 cores the waiting ranks' spinning
# stretched every collective (4-22 kB allgathers at 20 Mbit/s took 40-155 ms, the network needs 2-10).
# It sleeps 2% of the time waited so far, between these bounds: a timing off by at most 2% (or 0.1 ms), and a
# long wait (a rank idle while rank 0 evaluates) costs ~1,000 wake-ups a second, not 10,000.
POLL_INTERVAL_S = 1e-4
MAX_POLL_INTERVAL_S = 1e-3
# The step's allgather row is a size of a fixed grid, and each size has its own collective name: Horovod's response
# cache holds a collective's shape under its name, and a new shape under a known name misses it, so the ranks
# negotiate through the coordinator again (more latency-bound messages). Measured on 4 idle emulated ranks
# (benchmarks/ring_goodput.py): a new size each time took 2-3 ms more at 20 Mbit/s (4 kB: 8.6 ms against 5.4) and
# 1.1-1.7x as long at 100 Mbit/s (30 kB: 21.7 ms against 12.5); and the estimator, whose small agree allgather
# (the same size every step) pins the latency, read that overhead as a slower link. A plan's bytes change a little
# every step, so with one name nearly every step missed; keeping last step's size within a band (session 11) kept
# it on 9-59% of steps. On the grid a plan loses on average half a grid step of its byte budget (2.5%).
_FLOAT32_BYTES = 4  # a dense buffer riding in a row starts at a multiple of this
_ROW_ALIGN = 8  # an all-dense plan's row is its message rounded up to this (grid rows are multiples of it too)
ROW_GRID_PERCENT = 5  # consecutive grid rows are this many percent apart (at least 8 bytes)
_ROW_GRID = [8]


def row_grid(nbytes: int) -> int:
    """The allgather row grid's size at or above ``nbytes``: sizes from 8 bytes up, each ``ROW_GRID_PERCENT``
    percent (rounded down to a multiple of 8, at least 8) above the last. Built with integers only, so every rank
    on every machine has the same grid."""
    if not isinstance(nbytes, int) or nbytes < 0:
        raise KimadError(f"a row holds an int >= 0 of bytes, got {nbytes!r}")
    while _ROW_GRID[-1] < nbytes:
        last = _ROW_GRID[-1]
        _ROW_GRID.append(last + max(8, last * ROW_GRID_PERCENT // 100 // 8 * 8))
    return _ROW_GRID[bisect.bisect_left(_ROW_GRID, nbytes)]


def _aligned(nbytes: int, to: int) -> int:
    """``nbytes`` rounded up to a multiple of ``to``."""
    return nbytes + (-nbytes % to)


def synchronize(handle):
    """``hvd.synchronize(handle)`` without spinning: the async collective's result, after polling it with
    sleeps in between (2% of the time waited so far, within ``POLL_INTERVAL_S`` .. ``MAX_POLL_INTERVAL_S``),
    so a rank that waits leaves the CPU to ranks still working."""
    hvd = _horovod()
    started = time.perf_counter()
    while not hvd.poll(handle):
        waited = time.perf_counter() - started
        time.sleep(min(max(POLL_INTERVAL_S, 0.02 * waited), MAX_POLL_INTERVAL_S))
    return hvd.synchronize(handle)


class PlanMismatchError(KimadError, RuntimeError):
    """Ranks computed different plans for one step (their digests differ); the step is abandoned."""


class UnknownGradientError(KimadError, LookupError):
    """``compress`` was given a tensor that is not the ``.grad`` of any parameter registered with Kimad."""


class _BytesBudget:
    """The allocator's view of the user's budget: the seconds left for bytes this step (``bytes_s``, set per
    step from :meth:`~kimad.control.cost.CostModel.batched_byte_budget`); the user's budget until then."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.bytes_s: float | None = None

    def observe_compute(self, seconds: float) -> None:
        self.inner.observe_compute(seconds)

    def budget_s(self) -> float:
        return self.inner.budget_s() if self.bytes_s is None else self.bytes_s


class _StepInputs(NamedTuple):
    """What a step's plan is made from: :meth:`Kimad._agree` (steps b and c) or, for a static plan,
    :meth:`Kimad._local_inputs`."""

    profile_values: list[float]  # per tensor: ||v||^2, top-k errors, quantiser errors (averaged over ranks)
    profile_s: float  # seconds spent on error feedback and profiles
    agree_s: float  # the agree allgather's seconds on this rank (0: none)
    agree_bytes: int  # its bytes per rank
    compute_s: float | None  # compute time of the step (averaged over ranks); None when not measured
    link_s: dict[str, float]  # the previous step's collectives' link seconds (minimum over ranks), by kind
    fed: list  # the [collective, bytes per rank, link seconds] samples fed to the estimator this step


@dataclass(frozen=True)
class _Ctx:
    name: str
    step: int


def _horovod():
    try:
        import horovod.torch as hvd
    except ImportError as exc:
        raise KimadError(f"kimad.Kimad needs horovod.torch ({exc}); install Horovod with Gloo or MPI") from None
    return hvd


class Kimad:
    """Horovod compression plugin running Kimad's bandwidth-aware adaptive compression (module docstring).

    Args:
        named_parameters: ``(name, parameter)`` pairs, usually ``model.named_parameters()``; the same
            names and order on every rank.
        budget_s: seconds of communication per step (> 0), ``"auto"`` (half the measured compute time of a
            step), or a :class:`kimad.control.FixedBudget` / :class:`kimad.control.AutoBudget` (e.g.
            ``AutoBudget(fraction=1.0)``: as long as the compute).
        allocator: ``"layerwise"`` (Kimad+), ``"uniform"`` (Kimad), ``"lagrangian"``, or ``"static"`` (top-k at
            the one density of ``densities`` for every tensor of at least ``min_compress_numel`` elements, dense
            below: the GRACE/DGC baseline; it skips profiling and the agree allgather, module docstring).
        compressors: besides dense, which compressors plans may use: ``"topk"`` (at ``densities``),
            ``"qsgd"`` (8, 4 and 2 bits) and ``"sign"`` (scaled sign), in buckets of ``DEFAULT_BUCKET`` elements.
        error_feedback: ``"ef21"`` (default), ``"ef"`` or ``None``.
        densities: top-k densities the menus offer (default: 16 geometric from 1e-4 to 1).
        min_compress_numel: tensors with fewer elements are always sent dense.
        op: reduction when it cannot be read from the calling optimizer: ``hvd.Average`` (default) or ``hvd.Sum``.
        bandwidth_bps, latency_s: a fixed link model (wire bits/s, seconds) instead of learning it from timed
            collectives; plans then depend only on gradients and budget (reproducible runs).
        framing: wire bytes per payload byte of the network's transport (default
            :data:`~kimad.control.cost.TCP_ETHERNET_FRAMING`, 1514 / 1448: TCP over IPv4 and Ethernet, MTU 1500;
            e.g. ``9014 / 8948`` for MTU 9000, 1 to count payload only). It makes the bandwidth estimate the
            link's own rate, headers included, comparable with a NIC's or a shaper's; learned plans do not
            depend on it (the estimate and the prices scale together), a fixed ``bandwidth_bps`` is read
            in wire bits.
        min_byte_share: the share of the budget always left for bytes when the collectives' latencies alone
            would eat more (default 0.5): the step then overruns the budget (``over_budget`` in
            :attr:`metrics`) instead of sending nearly nothing. 0 keeps to the budget strictly.
        fill_budget: grow the plan's top-k messages by one common factor into what the allocator left of the
            budget (:func:`kimad.control.controller.fill_budget`; default True): the density grid is
            geometric, so without it a plan can land up to a grid step under the budget.
        hedge_trigger, lift_trigger: when a collective ran this many times slower (hedge) or faster (lift) than
            the last plan predicted, the next plan is priced at that collective's own rate until the estimator
            follows (:class:`kimad.control.Controller`; defaults 2.5 and 2.0; ``math.inf`` turns either off).
        metrics_path: append one JSON line of :attr:`metrics` per step (rank 0 only, unless the path
            contains ``{rank}``). Besides plan and link figures, :attr:`metrics` times this rank's step,
            seconds: ``profile_s`` (error feedback + error profiles), ``plan_s`` (controller),
            ``encode_s`` (top-k encode + dense concatenation), ``decode_s`` (decode, aggregate, estimate),
            ``overhead_s`` (their sum: Kimad's own work), ``agree_s``, ``allgather_s``, ``allreduce_s``
            (collectives, this rank's wall time; ``actual_comm_s`` = allgather + allreduce; ``agree_bytes``
            the agree allgather's bytes per rank), ``framing`` (the estimate's), ``dense_route``
            (``"allgather"`` when the dense tensors rode in the allgather, ``"allreduce"``, or ``None``),
            ``row`` (the allgather's bytes per rank, a size of :func:`row_grid`), ``row_cached`` (whether an
            earlier step of this process gathered that row size, so Horovod's response cache holds its shape
            unless it evicted it: it holds ``HOROVOD_CACHE_CAPACITY`` names, 1024 by default, Horovod's own
            per-parameter allreduces included),
            ``hedge`` (whether the plan priced a link that had just turned much slower at the rate its slow
            collective showed), ``lift`` (whether it priced a link that had just turned much faster at the rate
            its fast collective showed), ``probe`` (whether the plan priced a faster link it had just found at
            ``probe_factor`` times its estimate: :class:`kimad.control.Controller`), ``plan_bandwidth_bps`` (the
            bandwidth the plan was priced at: ``bandwidth_bps``, the hedge's, the lift's or the probe's rate),
            ``prev_link_comm_s`` (the previous step's allgather + allreduce time on the link: the minimum
            over ranks, without the wait for slower ranks; ``None`` at the first step), ``link_samples``
            (the ``[collective, bytes per rank, link seconds]`` samples this step fed the bandwidth estimator:
            the previous step's collectives; empty when none) and ``kimad_step_s`` (all of it).
        log_every: rank 0 prints a summary line every this many steps (0: never).
        tensorboard_dir: rank 0 also writes the step's figures as TensorBoard scalars there (needs the
            ``tensorboard`` package): ``kimad/`` + bandwidth_bps, latency_s, budget_s, predicted_bytes,
            actual_bytes, predicted_comm_s, actual_comm_s, agree_s, compute_s, overhead_s, kimad_step_s,
            predicted_error, and per tensor ``kimad/density/<name>`` (fraction of entries sent: k / n for
            top-k, 1 otherwise) and ``kimad/bits/<name>`` (message bits per element).

    Raises:
        KimadError (a named subclass): unknown allocator, compressor or error feedback, bad budget or framing,
            ``tensorboard_dir`` without the ``tensorboard`` package.
    """

    def __init__(self, named_parameters: Iterable, *, budget_s: float | str = "auto", allocator: str = "layerwise",
                 compressors: Iterable[str] = ("topk",), error_feedback: str | None = "ef21",
                 densities: Iterable[float] | None = None, min_compress_numel: int = 1024, op=None,
                 bandwidth_bps: float | None = None, latency_s: float | None = None,
                 framing: float = TCP_ETHERNET_FRAMING, min_byte_share: float = 0.5, fill_budget: bool = True,
                 hedge_trigger: float = 2.5, lift_trigger: float = 2.0,
                 metrics_path: str | None = None, log_every: int = 0, tensorboard_dir: str | None = None) -> None:
        compressors = tuple(compressors)
        densities = None if densities is None else tuple(densities)
        unknown = [c for c in compressors if c not in SUPPORTED_COMPRESSORS]
        if unknown:
            raise KimadError(f"compressor(s) {unknown} are not supported by the Horovod plugin; "
                             f"supported: {SUPPORTED_COMPRESSORS}")
        if isinstance(budget_s, (int, float)) and not isinstance(budget_s, bool) and not budget_s > 0:
            raise KimadError(f"budget_s must be > 0 seconds or 'auto', got {budget_s!r}")
        if not (isinstance(min_byte_share, (int, float)) and 0.0 <= min_byte_share <= 1.0):
            raise KimadError(f"min_byte_share must be a fraction in [0, 1], got {min_byte_share!r}")
        self.min_byte_share = float(min_byte_share)
        if not isinstance(log_every, int) or log_every < 0:
            raise KimadError(f"log_every must be an int >= 0 steps, got {log_every!r}")
        self._feedback = ErrorFeedback(error_feedback)
        hvd = _horovod()
        self._hvd = hvd
        self.world_size = hvd.size()
        self.rank = hvd.rank()
        self.fixed_link = bandwidth_bps is not None
        if self.fixed_link:
            estimator = BandwidthEstimator(initial_bandwidth_bps=bandwidth_bps,
                                           initial_latency_s=latency_s if latency_s is not None else 50e-6,
                                           framing=framing)
        elif latency_s is not None:
            raise KimadError("latency_s is only used with bandwidth_bps (a fixed link model)")
        else:
            estimator = BandwidthEstimator(framing=framing)
        self.controller = Controller(world_size=self.world_size, budget=budget_s, allocator=allocator,
                                     compressors=compressors, densities=densities,
                                     min_compress_numel=min_compress_numel, estimator=estimator, batched=True,
                                     fill=fill_budget, hedge_trigger=hedge_trigger, lift_trigger=lift_trigger)
        self.budget = self.controller.budget  # the user's: FixedBudget or AutoBudget
        # a static plan needs nothing from the other ranks: no profiles, no agree allgather (module docstring)
        self._static = allocator == "static"
        # the options a plan depends on, in every step's fingerprint (_fingerprint)
        self._options = repr((self.budget, allocator, compressors, error_feedback, densities, min_compress_numel,
                              bandwidth_bps, latency_s, framing, self.min_byte_share, fill_budget,
                              self.controller.hedge_trigger, self.controller.lift_trigger))
        self.controller.budget = _BytesBudget(self.budget)
        if op is None:
            op = hvd.Average
        self._check_op(op)
        self._default_op = op
        self._params: list[tuple[str, torch.nn.Parameter]] = []
        seen: set[int] = set()
        for item in named_parameters:
            if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
                raise KimadError(f"named_parameters must yield (name, parameter) pairs, got {item!r}")
            if id(item[1]) not in seen:  # a tied parameter is one tensor: keep its first name
                seen.add(id(item[1]))
                self._params.append(item)
        self._order = {name: i for i, (name, _) in enumerate(self._params)}
        self._param_names = {id(q): name for name, q in self._params}
        self._grad_names: dict[int, str] = {}
        self._pending: dict[str, torch.Tensor] = {}
        self._results: dict[str, torch.Tensor] = {}
        self._op = None
        self.step = 0
        self._last_end: float | None = None
        # ("allgather" | "allreduce" | "agree", bytes per rank, seconds) of the last step's collectives
        self._last_samples: list[tuple[str, int, float]] = []
        # (bytes per rank, dense bytes riding in it) of the last step's allgather row (see _target_row)
        self._row: tuple[int, int] | None = None
        self._rows_seen: set[int] = set()  # row sizes this process has gathered (Horovod's cache holds them)
        self._row_cached = False
        self.metrics: dict = {}
        self.metrics_path = metrics_path
        self.log_every = log_every
        self._tensorboard = None
        if tensorboard_dir is not None:
            try:  # on every rank, so that all of them refuse rather than rank 0 alone
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise KimadError(f"tensorboard_dir={tensorboard_dir!r} needs the tensorboard package ({exc}); "
                                 "pip install tensorboard, or leave tensorboard_dir unset") from None
            if self.rank == 0:
                self._tensorboard = SummaryWriter(str(tensorboard_dir))

    # -- Horovod's Compressor interface --------------------------------------------------------
    def compress(self, tensor: torch.Tensor):
        """Stash ``tensor`` (a registered parameter's ``.grad``) for this step; returns ``(empty tensor, ctx)``."""
        owner, param = self._caller()
        op = self._default_op if getattr(owner, "op", None) is None else owner.op
        self._check_op(op)
        name = self._name_of(tensor, param)
        if self._pending and op != self._op:
            raise KimadError(f"gradient {name!r} is reduced with op {op!r}, others this step with {self._op!r}")
        self._op = op
        self._pending[name] = tensor
        return tensor.new_zeros(0), _Ctx(name, self.step)

    def decompress(self, tensor: torch.Tensor, ctx: _Ctx | None) -> torch.Tensor:
        """The aggregated gradient of ``ctx``'s tensor; the first call of a step runs the Kimad step.

        ``ctx`` is ``None`` for sparse gradients, which Horovod reduces itself without ``compress``:
        they are returned as they are.
        """
        if ctx is None:
            return tensor
        if ctx.name not in self._results:
            if not self._pending:
                raise KimadError(f"decompress of {ctx.name!r} without a matching compress this step")
            self._run_step()
        return self._results.pop(ctx.name)

    # -- lookup --------------------------------------------------------------------------------
    def _name_of(self, tensor: torch.Tensor, param=None) -> str:
        # the calling optimizer's parameter names it: its own .grad is the common case
        by_param = self._param_names.get(id(param)) if param is not None else None
        if by_param is not None and param.grad is tensor:
            return by_param
        name = self._grad_names.get(id(tensor))
        if name is not None and self._params[self._order[name]][1].grad is tensor:
            return name
        # Gradients are new objects after zero_grad(set_to_none=True): rebuild the identity map.
        self._grad_names = {id(p.grad): n for n, p in self._params if p.grad is not None}
        name = self._grad_names.get(id(tensor))
        if name is None or self._params[self._order[name]][1].grad is not tensor:
            # sparse_as_dense hands over a dense copy: the calling optimizer's `p` still names it.
            if by_param is not None and tensor.shape == param.shape:
                return by_param
            raise UnknownGradientError(
                f"compress got a tensor of shape {tuple(tensor.shape)} that is not the .grad of any of the "
                f"{len(self._params)} parameters given to kimad.Kimad; pass the same named_parameters to "
                "Kimad and to hvd.DistributedOptimizer")
        return name

    def _check_op(self, op) -> None:
        if op not in (self._hvd.Average, self._hvd.Sum):
            raise KimadError(f"Kimad supports op=hvd.Average or hvd.Sum, got {op!r}")

    def _caller(self):
        """``(optimizer, parameter)`` of the Horovod optimizer calling ``compress`` (``_allreduce_grad_async(self, p)``,
        or a list comprehension inside ``_grouped_allreduce_grad_async``), or ``(None, None)`` when called otherwise."""
        frame = sys._getframe(2)
        for _ in range(3):
            if frame is None:
                break
            owner = frame.f_locals.get("self")
            if getattr(owner, "_compression", None) is self:
                return owner, frame.f_locals.get("p")
            frame = frame.f_back
        return None, None

    # -- one step --------------------------------------------------------------------------------
    def _ks(self, numel: int) -> list[int]:
        if "topk" not in self.controller.compressors or numel < self.controller.min_compress_numel:
            return []
        return [min(numel, max(1, round(d * numel))) for d in self.controller.densities]

    def _compressible(self, numel: int) -> bool:
        """Whether the tensor's menu offers more than dense (the plan may send it by allgather)."""
        return bool(self.controller.compressors) and numel >= self.controller.min_compress_numel

    def _quantized(self, numel: int) -> bool:
        """Whether the tensor's menu offers QSGD and sign (both are profiled together)."""
        return numel >= self.controller.min_compress_numel and bool({"qsgd", "sign"} & set(self.controller.compressors))

    def _quant_errors(self, name: str, g: torch.Tensor) -> list[float]:
        """``[qsgd8, qsgd4, qsgd2, sign]`` squared errors of ``v`` when the menu offers quantisers, else ``[]``."""
        if not self._quantized(g.numel()):
            return []
        estimate = self._feedback.quant_profile(name, g, DEFAULT_BUCKET)
        return [estimate.qsgd[b] for b in QSGD_BITS] + [estimate.sign]

    def _profile_size(self, numel: int) -> int:
        """Figures a tensor of ``numel`` elements has in the agree row: ``||v||^2``, a top-k error per density
        offered, and the QSGD 8/4/2-bit and sign errors when offered."""
        return 1 + len(self._ks(numel)) + 4 * self._quantized(numel)

    def _seed(self, index: int) -> int:
        """QSGD's draw key of tensor ``index`` this step on this rank: distinct per (step, tensor, rank), < 2**64."""
        return ((self.step % 2**24) << 40) | ((index % 2**24) << 16) | (self.rank % 2**16)

    def _run_step(self) -> None:
        hvd, fb, world = self._hvd, self._feedback, self.world_size
        started = time.perf_counter()
        names = sorted(self._pending, key=self._order.__getitem__)
        grads = [self._pending[n] for n in names]
        self._pending = {}
        scale = 1.0 / world if self._op == hvd.Average else 1.0

        # b + c: profiles and last step's measurements, averaged over ranks in one collective (static: local only).
        inputs = (self._local_inputs if self._static else self._agree)(names, grads, started)
        t_plan = time.perf_counter()
        profiles, pos = [], 0
        for name, g in zip(names, grads):
            m, quant = len(self._ks(g.numel())), self._quantized(g.numel())
            values = [max(0.0, e) for e in inputs.profile_values[pos: pos + self._profile_size(g.numel())]]
            qsgd = dict(zip(QSGD_BITS, values[1 + m: 4 + m])) if quant else None
            profiles.append(TensorProfile(name, g.numel(), values[0], tuple(values[1: 1 + m]), qsgd_errors=qsgd,
                                          sign_error=values[4 + m] if quant else None))
            pos += len(values)
        cost = CostModel.from_estimate(self.controller.estimate(), world)
        user_budget = self.budget.budget_s()
        bytes_s, issued = cost.batched_byte_budget(
            [self._compressible(g.numel()) for g in grads], [g.numel() for g in grads], user_budget,
            self.min_byte_share)
        target = None if self._static else self._target_row(  # (batched, as the plan prices)
            self.controller.cost_model(), bytes_s, _FLOAT32_BYTES * sum(g.numel() for g in grads))
        # (a static plan ignores the budget; priced at inf, it holds nothing one rank measured alone, as the budget
        # from this rank's compute time, and so plans the same on every rank)
        self.controller.budget.bytes_s = math.inf if self._static else (bytes_s if target is None else target[1])
        plan = self.controller.plan(profiles, step=self.step)
        digest = plan.digest()
        t_encode = time.perf_counter()
        plan_s = t_encode - t_plan

        # d: encode per plan.
        prefix = torch.tensor(list(bytes.fromhex(digest[: 2 * DIGEST_PREFIX_BYTES])), dtype=torch.uint8)
        sparse, dense, local_errors = [prefix], [], {}
        for index, (entry, name, g) in enumerate(zip(plan.entries, names, grads)):
            if entry.fmt is MessageFormat.TOPK:
                msg = fb.encode_topk(name, g, entry.k)
                sparse.append(encode_topk(msg.values, msg.indices, g.numel(), name=name).cpu())
                local_errors[name] = msg.sq_error
            elif entry.fmt in (MessageFormat.QSGD, MessageFormat.SIGN):
                quantized = fb.encode_quantized(name, g, entry.fmt.value, bits=entry.bits, bucket=DEFAULT_BUCKET,
                                                seed=self._seed(index))
                sparse.append(quantized.payload.cpu())
                local_errors[name] = quantized.sq_error
            elif entry.fmt is MessageFormat.DENSE32:
                v = fb.correct(name, g)
                fb.sent_dense(name, v)
                dense.append(v.view(-1))
                local_errors[name] = 0.0
            else:
                raise KimadError(f"plan chose {entry.fmt.value} for {name!r}; the Horovod plugin sends topk, qsgd, "
                                 "sign or dense32")

        # e + f: one allgather (digest prefix, sparse messages, and the dense buffer when riding along is cheaper
        # than an allreduce of its own), verified before any dense allreduce.
        buffer = torch.cat(dense) if dense else None
        dense_bytes = 0 if buffer is None else _FLOAT32_BYTES * buffer.numel()
        rides = buffer is not None and cost.dense_rides(dense_bytes)
        message = sum(m.numel() for m in sparse)
        if rides:
            dense_start = _aligned(message, _FLOAT32_BYTES)  # float32-aligned in every rank's row
            sparse.append(torch.zeros(dense_start - message, dtype=torch.uint8))
            sparse.append(buffer.view(torch.uint8))
            message = dense_start + dense_bytes
        # the grid's row at or above the message (zero-padded): the target row when the plan filled it. An all-dense
        # or a static plan has the same size every step (cached under its name as it is): no padding.
        all_dense = all(entry.fmt is MessageFormat.DENSE32 for entry in plan.entries)
        per_rank = _aligned(message, _ROW_ALIGN) if all_dense or self._static else row_grid(message)
        sparse.append(torch.zeros(per_rank - message, dtype=torch.uint8))
        send = torch.cat(sparse)
        self._row = (per_rank, dense_bytes if rides else 0)
        self._row_cached = per_rank in self._rows_seen
        self._rows_seen.add(per_rank)
        # the padding's time (what the plan left of the row it was priced to fill, or up to a grid step)
        predicted_comm_s = plan.total_time_s + issued + (
            cost.allgather(per_rank) - cost.allgather(message) if world > 1 else 0.0)
        t0 = time.perf_counter()
        encode_s = t0 - t_encode
        # (static: one name whatever the size, so that ranks whose plans differ gather rows of different sizes, which
        # _verify rejects, instead of waiting in collectives of different names)
        row_name = "kimad.static" if self._static else f"kimad.sparse.{per_rank}"
        gathered = synchronize(hvd.allgather_async(send, name=row_name))
        gather_s = time.perf_counter() - t0
        self._verify(gathered, prefix, per_rank, plan)
        samples = [("allgather", per_rank, gather_s)]
        self._dense_route = None if buffer is None else ("allgather" if rides else "allreduce")
        dense_sum = None
        if rides:
            dense_rows = gathered.view(world, per_rank)[:, dense_start: dense_start + dense_bytes]
            dense_rows = dense_rows.view(torch.float32)
            dense_sum = dense_rows[0].clone()
            for r in range(1, world):  # in rank order on every rank: bit-identical sums everywhere
                dense_sum += dense_rows[r]
        elif buffer is not None:
            t0 = time.perf_counter()
            # named by size as the allgather is: Horovod's cache holds each set of dense tensors' shape once seen
            dense_sum = synchronize(hvd.allreduce_async(buffer, op=hvd.Sum, name=f"kimad.dense.{buffer.numel()}"))
            samples.append(("allreduce", dense_bytes, time.perf_counter() - t0))

        # g + h: decode, aggregate, hand back in the gradients' shapes and dtypes.
        t_decode = time.perf_counter()
        sparse_pos, dense_pos = DIGEST_PREFIX_BYTES, 0
        for entry, name, g in zip(plan.entries, names, grads):
            n = g.numel()
            if entry.fmt is MessageFormat.DENSE32:
                c = dense_sum[dense_pos: dense_pos + n] * scale
                dense_pos += n
                estimate = fb.estimate(name, c.view(g.shape))
            else:
                segments = [gathered[r * per_rank + sparse_pos: r * per_rank + sparse_pos + entry.bytes].to(g.device)
                            for r in range(world)]
                sparse_pos += entry.bytes
                if entry.fmt is MessageFormat.TOPK:
                    messages = [decode_topk(seg, n, name=name) for seg in segments]
                    estimate = fb.estimate_topk(name, messages, g, scale)
                else:
                    estimate = fb.estimate_quantized(name, segments, g, scale, fmt=entry.fmt.value, bits=entry.bits,
                                                     bucket=DEFAULT_BUCKET)
            self._results[name] = estimate.to(g.dtype).view(g.shape)

        ended = time.perf_counter()
        timing = {"profile_s": inputs.profile_s, "plan_s": plan_s, "encode_s": encode_s,
                  "decode_s": ended - t_decode}
        self._record(plan, digest, samples, inputs, local_errors, ended - started, timing, predicted_comm_s,
                     user_budget, issued)
        # The agree allgather is a sample too (next step, like the others): small, so it pins the latency.
        self._last_samples = samples + ([] if self._static else [("agree", inputs.agree_bytes, inputs.agree_s)])
        self._last_end = ended
        self.step += 1

    def _agree(self, names: list[str], grads: list[torch.Tensor], started: float) -> _StepInputs:
        """Steps b and c: this rank's profiles, its timings of the last step and its fingerprint, allgathered; every
        rank averages the rows alike and feeds the same link samples."""
        hvd, fb, world = self._hvd, self._feedback, self.world_size
        agree: list[float] = []
        t_profile = time.perf_counter()
        for name, g in zip(names, grads):
            errors, sq_norm = fb.error_profile(name, g, self._ks(g.numel()))
            agree += [sq_norm, *errors]
            agree += self._quant_errors(name, g)
        timings = {kind: (nbytes, s) for kind, nbytes, s in self._last_samples}
        have_prev = self._last_end is not None and bool(self._last_samples)
        compute_s = started - self._last_end if self._last_end is not None else 0.0
        slots = ("allgather", "allreduce", "agree")
        agree += [timings.get(k, (0, 0.0))[1] for k in slots] + [compute_s, 1.0 if have_prev else 0.0]
        agree.append(self._fingerprint(names, grads))
        t0 = time.perf_counter()
        profile_s = t0 - t_profile
        # An allgather, not an allreduce: half the latency terms of a ring allreduce, and every rank sees every
        # rank's timings. Every rank sums the rows in rank order, so all get bit-identical averages.
        rows = synchronize(hvd.allgather_async(torch.tensor([agree], dtype=torch.float64), name="kimad.agree"))
        agree_s = time.perf_counter() - t0
        agree_bytes = 8 * len(agree)
        if not bool((rows[:, -1] == rows[0, -1]).all()):
            raise PlanMismatchError(
                f"plan mismatch at step {self.step} on rank {self.rank}: the ranks' plan inputs differ (fingerprints "
                f"{[int(f) for f in rows[:, -1].tolist()]} by rank; options, parameters, step, link estimate or "
                "budget). Every rank must use the same Kimad options and parameters (and load the same state)")
        rows = rows[:, :-1]
        profile_values = (rows[:, : -len(slots) - 2].sum(0) / world).tolist()
        per_rank_s = rows[:, -len(slots) - 2: -2]
        avg_compute_s = float(rows[:, -2].sum()) / world
        link_s, fed = {}, []
        # the dense allreduce's minimum understates the link's time after an allgather of messages (module docstring,
        # c): fed only after one of the digest prefix alone
        after_prefix = timings.get("allgather", (0, 0.0))[0] <= DIGEST_PREFIX_BYTES
        if bool((rows[:, -1] == 1.0).all()):  # every rank measured the previous step: feed the same samples everywhere
            for i, kind in enumerate(slots):
                if kind not in timings:
                    continue
                # The rank that submitted last waited for nobody: its time is the link's (the others' include
                # the compute skew of the slowest rank). Every rank takes the same minimum.
                link_s[kind] = float(per_rank_s[:, i].min())
                # One rank has no link to measure (and the estimator cannot fit zero samples after a step).
                if not self.fixed_link and world > 1 and (kind != "allreduce" or after_prefix):
                    collective = "allreduce" if kind == "allreduce" else "allgather"  # (agree is an allgather too)
                    self.controller.observe_collective(collective, timings[kind][0], link_s[kind], self.step)
                    fed.append([collective, timings[kind][0], link_s[kind]])
            self.controller.observe_compute(avg_compute_s)
        else:
            avg_compute_s = None
        return _StepInputs(profile_values, profile_s, agree_s, agree_bytes, avg_compute_s, link_s, fed)

    def _local_inputs(self, names: list[str], grads: list[torch.Tensor], started: float) -> _StepInputs:
        """A static plan's inputs, from this rank alone (what :meth:`_agree` returns): no profiles (zeros: a static
        plan does not read them), no collective, no link sample (the cost model stays at its prior or fixed link,
        the same on every rank, so the dense route is too); the local compute time feeds the budget (metrics)."""
        compute_s = None if self._last_end is None else started - self._last_end
        if compute_s is not None:
            self.controller.observe_compute(compute_s)
        values = [0.0] * sum(self._profile_size(g.numel()) for g in grads)
        return _StepInputs(values, 0.0, 0.0, 0, compute_s, {}, [])

    def _target_row(self, cost: CostModel, bytes_s: float, dense_bytes: int) -> tuple[int, float] | None:
        """``(row bytes, seconds)``: the largest row of :func:`row_grid` whose contents the batched ``cost``
        prices at most ``bytes_s`` (the dense bytes that rode in last step's row priced as the plan prices dense
        tensors, the rest as top-k bytes, less the digest prefix and alignment), and that price. ``None`` (the
        plan gets the whole budget) when one rank sends nothing over a link, when no row fits, or when the budget
        holds a row of ``dense_bytes`` (all the step's tensors dense) as well."""
        if self.world_size == 1:
            return None
        riding = 0 if self._row is None else self._row[1]
        dense_s = cost.message_time(MessageFormat.DENSE32, riding)

        def seconds(row: int) -> float:
            # (less the most the riding buffer's alignment can take)
            message = row - riding - DIGEST_PREFIX_BYTES - (_FLOAT32_BYTES - 1)
            return cost.message_time(MessageFormat.TOPK, max(0, message)) + dense_s

        # the row of an all-dense plan: the prefix, the dense buffer float32-aligned after it, aligned to _ROW_ALIGN
        top = row_grid(_aligned(_aligned(DIGEST_PREFIX_BYTES, _FLOAT32_BYTES) + dense_bytes, _ROW_ALIGN))
        if not seconds(_ROW_GRID[0]) <= bytes_s or seconds(top) <= bytes_s:
            return None
        # prices rise with the row: the insertion point of bytes_s among the rows' prices, less one
        i = bisect.bisect_right(_ROW_GRID, bytes_s, hi=bisect.bisect_left(_ROW_GRID, top), key=seconds) - 1
        return _ROW_GRID[i], seconds(_ROW_GRID[i])

    def _fingerprint(self, names: list[str], grads: list[torch.Tensor]) -> float:
        """48 bits (exact in float64) of a hash of what this rank's plan depends on besides the figures the ranks
        agree on: its options, step, last step's row, link estimate and budget, and the step's tensors and op.
        Ranks whose fingerprints differ would plan differently, and so gather rows of different sizes under
        different names and wait for each other forever: :meth:`_run_step` stops them first."""
        est = self.controller.estimate()
        text = repr((self._options, self.step, self._row, est.bandwidth_bps, est.latency_s, self.budget.budget_s(),
                     str(self._op), [(n, g.numel()) for n, g in zip(names, grads)]))
        return float(int.from_bytes(hashlib.blake2b(text.encode(), digest_size=6).digest(), "big"))

    def _verify(self, gathered: torch.Tensor, prefix: torch.Tensor, per_rank: int, plan: Plan) -> None:
        expected = self.world_size * per_rank
        bad = []
        if gathered.numel() != expected:
            bad.append(f"gathered {gathered.numel():,} bytes, expected {expected:,}")
        else:
            for r in range(self.world_size):
                if not torch.equal(gathered[r * per_rank: r * per_rank + DIGEST_PREFIX_BYTES], prefix):
                    bad.append(f"rank {r} digest {bytes(gathered[r * per_rank: r * per_rank + 8].tolist()).hex()}")
        if bad:
            raise PlanMismatchError(
                f"plan mismatch at step {self.step} on rank {self.rank}: this rank's plan digest "
                f"{bytes(prefix.tolist()).hex()} (budget {plan.budget_s!r} s, {plan.total_bytes:,} bytes) but "
                f"{'; '.join(bad)}. Every rank must use the same Kimad options and parameters")

    # -- metrics -----------------------------------------------------------------------------------
    def _record(self, plan: Plan, digest: str, samples, inputs: _StepInputs, local_errors, step_s: float,
                timing: dict, predicted_comm_s: float, budget_s: float, issued_s: float) -> None:
        est, link_s = self.controller.estimate(), inputs.link_s
        comm = {kind: s for kind, _, s in samples}
        self.metrics = {
            "step": plan.step, "bandwidth_bps": est.bandwidth_bps, "latency_s": est.latency_s, "framing": est.framing,
            "budget_s": budget_s, "issued_latency_s": issued_s,
            "over_budget": plan.over_budget or predicted_comm_s > budget_s * (1 + 1e-9), "plan_digest": digest,
            "predicted_bytes": plan.total_bytes, "actual_bytes": sum(nbytes for _, nbytes, _ in samples),
            "predicted_comm_s": predicted_comm_s,
            "actual_comm_s": comm.get("allgather", 0.0) + comm.get("allreduce", 0.0),
            "agree_s": inputs.agree_s, "agree_bytes": inputs.agree_bytes, "compute_s": inputs.compute_s,
            "kimad_step_s": step_s,
            "allgather_s": comm.get("allgather", 0.0), "allreduce_s": comm.get("allreduce", 0.0),
            "prev_link_comm_s": (sum(link_s.get(k, 0.0) for k in ("allgather", "allreduce"))
                                 if "allgather" in link_s else None),
            "prev_link_agree_s": link_s.get("agree"), "link_samples": inputs.fed,
            "row": self._row[0], "row_cached": self._row_cached, "dense_route": self._dense_route,
            "probe": self.controller.probing, "hedge": self.controller.hedging, "lift": self.controller.lifting,
            "plan_bandwidth_bps": self.controller.planned_bandwidth_bps,
            **timing, "overhead_s": sum(timing.values()),
            "predicted_error": plan.total_error,
            "tensors": {e.name: {"option": e.label, "bytes": e.bytes, "predicted_error": e.error,
                                 "local_error": local_errors[e.name], **self._density_and_bits(e)}
                        for e in plan.entries},
        }
        if self.metrics_path and (self.rank == 0 or "{rank}" in self.metrics_path):
            with open(self.metrics_path.format(rank=self.rank), "a") as f:
                f.write(json.dumps(self.metrics, allow_nan=True) + "\n")
        if self._tensorboard is not None:
            self._write_tensorboard(self.metrics)
        if self.log_every and self.rank == 0 and (plan.step + 1) % self.log_every == 0:
            m = self.metrics
            sparse = sum(e.fmt is MessageFormat.TOPK for e in plan.entries)
            print(f"kimad step {m['step']}: {m['bandwidth_bps'] / 1e9:.2f} Gbit/s, "
                  f"budget {m['budget_s'] * 1e3:.2f} ms, {m['actual_bytes']:,} B ({sparse}/{len(plan.entries)} top-k), "
                  f"comm {m['actual_comm_s'] * 1e3:.2f} ms (predicted {m['predicted_comm_s'] * 1e3:.2f})"
                  f"{' OVER BUDGET' if plan.over_budget else ''}", flush=True)

    def _density_and_bits(self, entry) -> dict:
        """``density``: fraction of the tensor's entries sent (k / n for top-k, else 1); ``bits``: message bits per
        element."""
        numel = self._params[self._order[entry.name]][1].numel()
        density = entry.k / numel if entry.fmt is MessageFormat.TOPK else 1.0
        return {"density": density, "bits": 8 * entry.bytes / numel}

    def _write_tensorboard(self, m: dict) -> None:
        """The step's figures as TensorBoard scalars (rank 0; see ``tensorboard_dir``), flushed every step."""
        writer, step = self._tensorboard, m["step"]
        for key in TENSORBOARD_SCALARS:
            if m[key] is not None:  # compute_s is unknown on the first step
                writer.add_scalar(f"kimad/{key}", m[key], step)
        for name, t in m["tensors"].items():
            writer.add_scalar(f"kimad/density/{name}", t["density"], step)
            writer.add_scalar(f"kimad/bits/{name}", t["bits"], step)
        writer.flush()

    # -- checkpointing -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything Kimad holds: error-feedback states per name, controller (estimator, auto-budget window),
        step counter, the last step's measured collectives and its allgather row (plans depend on all of it)."""
        budget = self.budget
        return {"version": _STATE_VERSION, "step": self.step, "feedback": self._feedback.state_dict(),
                "controller": self.controller.state_dict(),
                "compute_window": list(budget._compute) if isinstance(budget, AutoBudget) else None,
                "last_samples": list(self._last_samples), "row": self._row}

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict` (same options and parameters)."""
        if state.get("version") != _STATE_VERSION:
            raise KimadError(f"not a Kimad {_STATE_VERSION} state dict (version {state.get('version')!r})")
        self.step = int(state["step"])
        self._feedback.load_state_dict(state["feedback"])
        self.controller.load_state_dict(state["controller"])
        budget = self.budget
        if isinstance(budget, AutoBudget) and state["compute_window"] is not None:
            budget._compute.clear()
            budget._compute.extend(state["compute_window"])
        self._last_samples = [tuple(s) for s in state["last_samples"]]
        row = state.get("row")  # (states saved before the row was kept have none: a new row is set)
        self._row = None if row is None else (int(row[0]), int(row[1]))
        self._last_end = None  # the compute time across a restart is not a measurement
        self._pending, self._results = {}, {}


_HOROVOD_OPTIONS = ("backward_passes_per_step", "op", "gradient_predivide_factor", "groups", "sparse_as_dense")


def DistributedOptimizer(optimizer: torch.optim.Optimizer, named_parameters, **options):
    """``hvd.DistributedOptimizer`` with a :class:`Kimad` compression built from ``options``.

    Horovod's own options (``backward_passes_per_step``, ``op``, ``gradient_predivide_factor``,
    ``groups``, ``sparse_as_dense``) go to Horovod (``op`` to Kimad too); the rest to :class:`Kimad`.
    The plugin is reachable as ``optimizer.kimad``.
    """
    hvd = _horovod()
    named_parameters = list(named_parameters)
    hvd_options = {k: options.pop(k) for k in _HOROVOD_OPTIONS if k in options}
    compression = Kimad(named_parameters, op=hvd_options.get("op"), **options)
    wrapped = hvd.DistributedOptimizer(optimizer, named_parameters=named_parameters, compression=compression,
                                       **hvd_options)
    wrapped.kimad = compression
    return wrapped


__all__ = ["DistributedOptimizer", "Kimad", "PlanMismatchError", "UnknownGradientError", "row_grid"]
