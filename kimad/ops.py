"""Typed, validating Python entry points of Kimad's native kernels (``kimad._C``).

One function per native op. Each checks what a user can get wrong (dtype, device, shape) and
raises a :class:`~kimad.errors.KimadError` naming the tensor, converts what it safely can
(non-contiguous views are copied), and then calls the kernel. Kernels themselves hold no policy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kimad._native import native
from kimad.errors import CorruptMessageError, KimadError, NonFiniteGradientError, StaleProfileError


def sparse_accumulate(
    out: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    *,
    scale: float = 1.0,
    name: str = "tensor",
) -> torch.Tensor:
    """Decode one sparse message into a dense tensor: ``out.view(-1)[indices] += scale * values``.

    Duplicate indices add up (unlike ``index_put_``). Every index is checked before anything is
    written, so a corrupt message leaves ``out`` unchanged.

    Args:
        out: float32 tensor of any shape, contiguous, updated in place (as a flat vector of
            ``out.numel()`` elements).
        values: 1-D float32 tensor of ``m`` values (other float dtypes are converted).
        indices: 1-D int32 or int64 tensor of ``m`` flat positions in ``[0, out.numel())``.
        scale: multiplier applied to every value (e.g. ``1 / world_size`` to average).
        name: the tensor's name, used in error messages.

    Returns:
        ``out``.

    Raises:
        KimadError: wrong dtype, device or shape.
        CorruptMessageError: an index lies outside ``[0, out.numel())``; ``out`` is unchanged.
    """
    if not all(isinstance(t, torch.Tensor) for t in (out, values, indices)):
        raise KimadError(f"sparse_accumulate for {name!r}: out, values and indices must be torch tensors")
    if out.dtype != torch.float32:
        raise KimadError(f"sparse_accumulate for {name!r}: out must be float32, got {out.dtype}")
    if not out.is_contiguous():
        raise KimadError(f"sparse_accumulate for {name!r}: out must be contiguous (it is updated in place)")
    if values.dim() != 1 or indices.dim() != 1:
        raise KimadError(
            f"sparse_accumulate for {name!r}: values and indices must be 1-D, got shapes "
            f"{tuple(values.shape)} and {tuple(indices.shape)}"
        )
    if values.numel() != indices.numel():
        raise CorruptMessageError(
            f"message for {name!r} has {values.numel():,} values but {indices.numel():,} indices"
        )
    if indices.dtype not in (torch.int32, torch.int64):
        raise KimadError(f"sparse_accumulate for {name!r}: indices must be int32 or int64, got {indices.dtype}")
    if not values.is_floating_point():
        raise KimadError(f"sparse_accumulate for {name!r}: values must be floating point, got {values.dtype}")
    if values.device != out.device or indices.device != out.device:
        raise KimadError(
            f"sparse_accumulate for {name!r}: out ({out.device}), values ({values.device}) and "
            f"indices ({indices.device}) must be on one device"
        )
    if out.numel() > torch.iinfo(torch.int32).max:
        raise KimadError(f"sparse_accumulate for {name!r}: {out.numel():,} elements exceed int32 indexing")
    if indices.dtype == torch.int64:
        bad = (indices < 0) | (indices >= out.numel())
        if bool(bad.any()):
            pos = int(bad.nonzero()[0, 0])
            raise CorruptMessageError(
                f"message for {name!r} has index {int(indices[pos]):,} at position {pos:,}; "
                f"the tensor has {out.numel():,} elements"
            )
        indices = indices.to(torch.int32)
    values = values.to(torch.float32).contiguous()
    indices = indices.contiguous()
    bad_pos = native().sparse_accumulate(out, values, indices, float(scale))
    if bad_pos >= 0:
        raise CorruptMessageError(
            f"message for {name!r} has index {int(indices[bad_pos]):,} at position {bad_pos:,}; "
            f"the tensor has {out.numel():,} elements"
        )
    return out


def bitmap_positions(bitmap: torch.Tensor, n: int, *, capacity: int, name: str = "tensor") -> tuple[torch.Tensor, int]:
    """The positions a top-k message's bitmap marks: bit ``j`` of byte ``i`` is position ``8 i + j``.

    Args:
        bitmap: 1-D uint8 CPU tensor of ``ceil(n / 8)`` bytes (non-contiguous views are copied).
        n: positions the bitmap covers (>= 0, <= 2**31); bits at ``n`` and past it (the last byte's padding) are
            not read.
        capacity: at most this many positions are returned (>= 0): a decoder expecting ``k`` passes ``k``.
        name: the tensor's name, used in error messages.

    Returns:
        ``(positions, count)``: the first ``min(count, capacity)`` set positions below ``n`` in ascending order
        (1-D int32), and ``count``, how many bits are set below ``n`` in all.

    Raises:
        KimadError: not a 1-D uint8 CPU tensor of ``ceil(n / 8)`` bytes, or ``n`` / ``capacity`` out of range.
    """
    if not isinstance(bitmap, torch.Tensor) or bitmap.dtype != torch.uint8 or bitmap.dim() != 1:
        raise KimadError(f"bitmap_positions for {name!r}: the bitmap must be a 1-D uint8 tensor")
    if not bitmap.is_cpu:
        raise KimadError(f"bitmap_positions for {name!r}: the bitmap must be on the CPU, got {bitmap.device}")
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= 2**31:
        raise KimadError(f"bitmap_positions for {name!r}: n must be an int in [0, 2**31], got {n!r}")
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
        raise KimadError(f"bitmap_positions for {name!r}: capacity must be an int >= 0, got {capacity!r}")
    if bitmap.numel() != (n + 7) // 8:
        raise KimadError(f"bitmap_positions for {name!r}: a bitmap of n={n:,} positions has {(n + 7) // 8:,} "
                         f"bytes, got {bitmap.numel():,}")
    out = torch.empty(min(capacity, n), dtype=torch.int32)
    count = native().bitmap_positions(bitmap.contiguous(), n, out)
    return (out if count >= out.numel() else out[:count]), count


def sparse_sum(
    out: torch.Tensor,
    messages: list[tuple[torch.Tensor, torch.Tensor]],
    *,
    scale: float = 1.0,
    accumulate: bool = False,
    sum_first: bool = False,
    name: str = "tensor",
) -> torch.Tensor:
    """Decode and sum several ranks' sparse messages in one native call.

    ``out = scale * sum_r messages[r]`` (``accumulate=False``: every element is overwritten, so
    ``out`` may be uninitialised) or ``out += scale * sum_r messages[r]`` (``accumulate=True``).
    Bitwise the same as zeroing ``out`` (unless accumulating) and calling :func:`sparse_accumulate`
    once per message in order, for any number of threads. Duplicate indices, within and across
    messages, add up. Every index of every message is checked before anything is written.
    Messages with non-decreasing indices (as :func:`topk_encode` emits them) are merged in one
    pass over ``out``; if any message is unsorted the batch is scattered message by message.

    Args:
        out: contiguous float32 tensor of any shape (addressed flat), the caller's buffer.
        messages: ``(values, indices)`` per rank, in rank order: 1-D ``values`` (float32; other
            float dtypes are converted) and 1-D int32 or int64 ``indices`` of one length, flat
            positions in ``[0, out.numel())``.
        scale: multiplier of every value (e.g. ``1 / world_size`` to average).
        accumulate: add to ``out`` instead of overwriting it.
        sum_first: ``out += c`` where ``c`` is the messages' sum formed first (``accumulate`` is then
            implied): bitwise the same as ``sparse_sum`` into a fresh buffer ``c`` and ``out += c``,
            but only the elements some message names are read or written (an untouched ``-0.0``
            stays ``-0.0``; adding ``c``'s ``+0.0`` would make it ``+0.0``). EF21's ``H += c``.
        name: the tensor's name, used in error messages.

    Returns:
        ``out``.

    Raises:
        KimadError: wrong dtype, device or shape.
        CorruptMessageError: a length mismatch or an index outside ``[0, out.numel())``; ``out``
            is unchanged.
    """
    if not isinstance(out, torch.Tensor):
        raise KimadError(f"sparse_sum for {name!r}: out must be a torch tensor")
    if out.dtype != torch.float32 or not out.is_contiguous():
        raise KimadError(f"sparse_sum for {name!r}: out must be a contiguous float32 tensor, got {out.dtype}"
                         f"{'' if out.is_contiguous() else ', non-contiguous'}")
    if out.numel() > torch.iinfo(torch.int32).max:
        raise KimadError(f"sparse_sum for {name!r}: {out.numel():,} elements exceed int32 indexing")
    all_values, all_indices = [], []
    for rank, message in enumerate(messages):
        if not isinstance(message, tuple | list) or len(message) != 2:
            raise KimadError(f"sparse_sum for {name!r}: message {rank} must be a (values, indices) pair")
        values, indices = message
        if not isinstance(values, torch.Tensor) or not isinstance(indices, torch.Tensor):
            raise KimadError(f"sparse_sum for {name!r}: message {rank} must hold torch tensors")
        if values.dim() != 1 or indices.dim() != 1:
            raise KimadError(f"sparse_sum for {name!r}: message {rank} values and indices must be 1-D, got shapes "
                             f"{tuple(values.shape)} and {tuple(indices.shape)}")
        if values.numel() != indices.numel():
            raise CorruptMessageError(f"message {rank} for {name!r} has {values.numel():,} values but "
                                      f"{indices.numel():,} indices")
        if not values.is_floating_point():
            raise KimadError(f"sparse_sum for {name!r}: message {rank} values must be floating point, "
                             f"got {values.dtype}")
        if indices.dtype not in (torch.int32, torch.int64):
            raise KimadError(f"sparse_sum for {name!r}: message {rank} indices must be int32 or int64, "
                             f"got {indices.dtype}")
        if values.device != out.device or indices.device != out.device:
            raise KimadError(f"sparse_sum for {name!r}: message {rank} ({values.device}, {indices.device}) is not on "
                             f"out's device ({out.device})")
        if indices.dtype == torch.int64:
            bad = (indices < 0) | (indices >= out.numel())
            if bool(bad.any()):
                pos = int(bad.nonzero()[0, 0])
                raise CorruptMessageError(f"message {rank} for {name!r} has index {int(indices[pos]):,} at position "
                                          f"{pos:,}; the tensor has {out.numel():,} elements")
            indices = indices.to(torch.int32)
        all_values.append(values.to(torch.float32).contiguous())
        all_indices.append(indices.contiguous())
    rank, pos = native().sparse_sum(out, all_values, all_indices, float(scale), bool(accumulate), bool(sum_first))
    if rank >= 0:
        raise CorruptMessageError(f"message {rank} for {name!r} has index {int(all_indices[rank][pos]):,} at position "
                                  f"{pos:,}; the tensor has {out.numel():,} elements")
    return out


_FEEDBACK_MODES = {"ef": 0, "ef21": 1}


@dataclass(frozen=True)
class TopKMessage:
    """One top-k message of a tensor, as produced by :func:`topk_encode`.

    Attributes:
        values: 1-D float32 tensor of the ``k`` sent entries of ``v``.
        indices: 1-D int32 tensor of their ``k`` flat positions, strictly ascending.
        sq_norm: ``||v||^2`` of the vector the message approximates.
        sq_error: ``||v - TopK_k(v)||^2``, the squared error of this message.
    """

    values: torch.Tensor
    indices: torch.Tensor
    sq_norm: float
    sq_error: float


def _feedback_operands(op: str, grad: torch.Tensor, state: torch.Tensor, mode: str, name: str):
    """Validated (flat grad: float32, float16 or bfloat16; flat state view; mode code) for the top-k ops."""
    if not isinstance(grad, torch.Tensor) or not isinstance(state, torch.Tensor):
        raise KimadError(f"{op} for {name!r}: grad and state must be torch tensors")
    if mode not in _FEEDBACK_MODES:
        raise KimadError(f"{op} for {name!r}: mode must be 'ef21' or 'ef', got {mode!r}")
    if not grad.is_floating_point():
        raise KimadError(f"{op} for {name!r}: grad must be floating point, got {grad.dtype}")
    if state.dtype != torch.float32 or not state.is_contiguous():
        raise KimadError(
            f"{op} for {name!r}: the error-feedback state must be a contiguous float32 tensor "
            f"(it is updated in place), got {state.dtype}{'' if state.is_contiguous() else ', non-contiguous'}"
        )
    if state.numel() != grad.numel():
        raise KimadError(
            f"{op} for {name!r}: grad has {grad.numel():,} elements but the state has {state.numel():,}"
        )
    if grad.device != state.device:
        raise KimadError(f"{op} for {name!r}: grad ({grad.device}) and state ({state.device}) must be on one device")
    if grad.numel() > torch.iinfo(torch.int32).max:
        raise KimadError(f"{op} for {name!r}: {grad.numel():,} elements exceed int32 indexing")
    # float16 and bfloat16 are read natively by the kernels (no float32 copy); others are converted.
    g = grad.detach()
    if g.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        g = g.to(torch.float32)
    flat_grad = g.contiguous().view(-1)
    return flat_grad, state.view(-1), _FEEDBACK_MODES[mode]


def topk_encode(
    grad: torch.Tensor,
    state: torch.Tensor,
    k: int,
    *,
    mode: str = "ef21",
    name: str = "tensor",
    profile: TopKProfile | None = None,
) -> TopKMessage:
    """Exact top-k compression with error feedback, fused in one native op.

    Forms ``v = grad - h`` (``mode="ef21"``, state is the estimate ``h``) or ``v = grad + e``
    (``mode="ef"``, state is the residual ``e``), sends the ``k`` entries of largest ``|v|``
    (ties go to the lower index) and updates the state in place: EF21 ``h += TopK_k(v)``; EF
    ``e = v - TopK_k(v)``. The result is bitwise deterministic (any thread count).

    Args:
        grad: gradient of any shape and float dtype; float32, float16 and bfloat16 are read as
            they are (computed with in float32), float64 is converted to a float32 copy, and
            non-contiguous views are copied.
        state: contiguous float32 tensor with ``grad.numel()`` elements, updated in place.
        k: number of entries to send, ``0 <= k <= grad.numel()``.
        mode: ``"ef21"`` (default) or ``"ef"``.
        name: the tensor's name, used in error messages.
        profile: a :func:`topk_profile` of these same ``grad`` and ``state`` objects, unchanged since;
            the encode then reuses its histogram and skips its own first pass over the data (the
            output is the same). A profile serves one encode.

    Returns:
        A :class:`TopKMessage` (values float32, indices int32 ascending, ``sq_norm``, ``sq_error``).

    Raises:
        KimadError: wrong dtype, device, shape or k.
        StaleProfileError: ``profile`` is of other tensors, of another mode, already used, or
            ``grad`` or ``state`` was modified in place since it was taken.
        NonFiniteGradientError: ``v`` holds NaN or Inf; the state is unchanged.
    """
    histogram = profile._take(grad, state, mode, name) if profile is not None else None
    flat_grad, flat_state, code = _feedback_operands("topk_encode", grad, state, mode, name)
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= flat_grad.numel():
        raise KimadError(
            f"topk_encode for {name!r}: k={k!r} must be an int in [0, {flat_grad.numel():,}] (the tensor's numel)"
        )
    values = torch.empty(k, dtype=torch.float32, device=grad.device)
    indices = torch.empty(k, dtype=torch.int32, device=grad.device)
    non_finite, sq_norm, sq_error = native().topk_encode(flat_grad, flat_state, k, code, values, indices, histogram)
    if non_finite:
        raise NonFiniteGradientError(
            f"gradient {name!r} ({'plus' if mode == 'ef' else 'minus'} its {mode.upper()} state) has "
            f"{non_finite:,} non-finite entries (NaN or Inf); nothing was sent and the state is unchanged"
        )
    return TopKMessage(values, indices, float(sq_norm), float(sq_error))


# Below this many elements the native top-k kernels sort instead of building a histogram (kTopKSmallN).
TOPK_SMALL_NUMEL = 4096


class TopKProfile:
    """The top-k error profile of one ``(grad, state)`` pair (:func:`topk_profile`).

    Attributes:
        errors: squared errors ``||v - TopK_k(v)||^2``, one per requested k, in request order.
        sq_norm: ``||v||^2``.
        buffer: the native first-pass histogram (CPU, tensors of >= 4096 elements; else ``None``),
            which :func:`topk_encode` of the same, unchanged tensors reuses (``profile=``). Pass it to
            a later :func:`topk_profile` (``buffer=``) to refill it without allocating; that makes
            this profile stale.
    """

    def __init__(self, errors: list[float], sq_norm: float, buffer, kept: bool, grad: torch.Tensor,
                 state: torch.Tensor, mode: str) -> None:
        self.errors = errors
        self.sq_norm = sq_norm
        self.buffer = buffer
        self._source = (grad, state, grad._version, state._version, mode, buffer.generation) if kept else None

    @property
    def nbytes(self) -> int:
        """Bytes of histogram an encode could reuse (0 if none, once used, or once its buffer was refilled)."""
        return 0 if self._source is None or self._source[5] != self.buffer.generation else int(self.buffer.nbytes)

    def describes(self, grad: torch.Tensor, state: torch.Tensor, mode: str) -> bool:
        """Whether this profile is unused and of exactly these tensors, unchanged since, in this mode."""
        return self._why_not(grad, state, mode) is None

    def _why_not(self, grad: torch.Tensor, state: torch.Tensor, mode: str) -> str | None:
        if self._source is None:
            return "it holds no histogram, or was already used by an encode (which changed the state)"
        src_grad, src_state, grad_version, state_version, src_mode, generation = self._source
        return ("its buffer was refilled by a later topk_profile" if generation != self.buffer.generation
                else "it was taken of another gradient tensor" if grad is not src_grad
                else "it was taken of another state tensor" if state is not src_state
                else f"it was taken for mode {src_mode!r}, not {mode!r}" if mode != src_mode
                else "the gradient was modified in place since" if grad._version != grad_version
                else "the state was modified in place since" if state._version != state_version else None)

    def _take(self, grad: torch.Tensor, state: torch.Tensor, mode: str, name: str):
        """The histogram for one encode of exactly these tensors; raises :class:`StaleProfileError` otherwise."""
        why = self._why_not(grad, state, mode)
        if why is not None:
            raise StaleProfileError(f"topk_encode for {name!r}: the profile does not describe these tensors: {why}")
        self._source = None
        return self.buffer


def topk_profile(
    grad: torch.Tensor,
    state: torch.Tensor,
    ks: list[int],
    *,
    mode: str = "ef21",
    name: str = "tensor",
    buffer=None,
) -> TopKProfile:
    """Squared top-k errors ``||v - TopK_k(v)||^2`` for several k at once; the state is unchanged.

    ``v`` is formed as in :func:`topk_encode`. Exact at ``k = 0`` (``||v||^2``, always exact) and
    ``k = numel`` (0), for tensors of fewer than :data:`TOPK_SMALL_NUMEL` (4096) elements (sorted squares),
    and when ``ks`` is empty (one pass summing squares). Otherwise from one histogram pass over the top 16
    bits of the float32 keys of ``|v|``, each unsent entry counted as the largest ``|v|`` of its bin: never
    an underestimate, and above the exact error by less than a factor ``1 + 2^-6 + 2^-14``
    (values within one bin differ by less than a factor ``1 + 2^-7``; entries below ``2^-126``
    add less than ``2^-252`` each), and never above ``||v||^2``. On the CPU the histogram is kept for
    :func:`topk_encode` (``profile=``), which then skips that pass.

    Args:
        grad, state, mode, name: as for :func:`topk_encode` (state is only read).
        ks: candidate numbers of sent entries, each in ``[0, grad.numel()]``.
        buffer: an earlier profile's :attr:`TopKProfile.buffer` to refill (no allocation when it
            already has the size); ``None`` allocates one when a histogram is built.

    Returns:
        A :class:`TopKProfile`.

    Raises:
        KimadError: wrong dtype, device, shape or a k out of range.
        NonFiniteGradientError: ``v`` holds NaN or Inf.
    """
    if buffer is None and grad.device.type == "cpu" and grad.numel() >= TOPK_SMALL_NUMEL and ks:
        buffer = native().TopKHistogram()
    return _profile(grad, state, ks, mode, name, buffer)


def error_profile(
    grad: torch.Tensor,
    state: torch.Tensor,
    ks: list[int],
    *,
    mode: str = "ef21",
    name: str = "tensor",
) -> tuple[list[float], float]:
    """:func:`topk_profile` without keeping the histogram: returns ``(errors, sq_norm)``."""
    profile = _profile(grad, state, ks, mode, name, None)
    return profile.errors, profile.sq_norm


def _profile(grad, state, ks, mode: str, name: str, buffer) -> TopKProfile:
    flat_grad, flat_state, code = _feedback_operands("error_profile", grad, state, mode, name)
    ks = list(ks)
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= flat_grad.numel():
            raise KimadError(
                f"error_profile for {name!r}: k={k!r} must be an int in [0, {flat_grad.numel():,}] (the tensor's numel)"
            )
    non_finite, sq_norm, errors, kept = native().error_profile(flat_grad, flat_state, ks, code, buffer)
    if non_finite:
        raise NonFiniteGradientError(
            f"gradient {name!r} ({'plus' if mode == 'ef' else 'minus'} its {mode.upper()} state) has "
            f"{non_finite:,} non-finite entries (NaN or Inf); no error profile"
        )
    return TopKProfile(list(errors), float(sq_norm), buffer, kept, grad, state, mode)


@dataclass(frozen=True)
class QuantMessage:
    """One QSGD or scaled-sign message of a tensor, as produced by :func:`qsgd_encode` / :func:`sign_encode`.

    Attributes:
        payload: 1-D uint8 tensor, the message bytes in the layout of
            :mod:`kimad.compressors.quant` (exactly ``wire.message_bytes(...)`` bytes).
        sq_norm: ``||v||^2`` of the vector the message approximates.
        sq_error: ``||v - Q(v)||^2``, the squared error of this message (this draw, for QSGD).
    """

    payload: torch.Tensor
    sq_norm: float
    sq_error: float


@dataclass(frozen=True)
class QuantErrorEstimate:
    """Squared errors of the quantised messages of one ``v``, for the allocator.

    Attributes:
        qsgd: bits (8, 4, 2) -> expected squared error ``E||v - Q(v)||^2`` of QSGD.
        sign: the (deterministic) squared error of the scaled-sign message.
        sq_norm: ``||v||^2``.
    """

    qsgd: dict[int, float]
    sign: float
    sq_norm: float


_QUANT_DECODE_REASONS = {
    1: "has {got:,} bytes but a {fmt} message of {numel:,} elements (bits={bits}, bucket={bucket}) has {want:,}",
    2: "header says {hdr:,} elements but the tensor has {numel:,}",
    3: "header has format tag 0x{tag:02x}, bits {hbits}; expected a {fmt} message with bits={bits}",
    4: "carries a bucket norm or scale that is negative, NaN or Inf",
    5: "header says bucket field {hbucket} but the receiver expects bucket={bucket} (field {want_bucket}; "
       "0 means one bucket spans the tensor)",
}


def _bucket_field(numel: int, bucket: int) -> int:
    """The header's bucket field (kimad.compressors.quant.bucket_field)."""
    return 0 if bucket >= numel else bucket


def _quant_operands(op: str, grad, state, mode: str, bucket, name: str):
    if isinstance(bucket, bool) or not isinstance(bucket, int) or bucket < 1:
        raise KimadError(f"{op} for {name!r}: bucket must be an int >= 1 element, got {bucket!r}")
    return _feedback_operands(op, grad, state, mode, name)


def _quant_encode(op: str, grad, state, bits: int, bucket: int, seed: int, mode: str, name: str) -> QuantMessage:
    flat_grad, flat_state, code = _quant_operands(op, grad, state, mode, bucket, name)
    if bucket > 0xFFFF and bucket < flat_grad.numel():
        raise KimadError(f"{op} for {name!r}: bucket={bucket:,} does not fit the message header's 16-bit bucket "
                         f"field: use at most 65,535 elements (or >= numel={flat_grad.numel():,}, one bucket)")
    nbytes = native().quant_message_bytes(flat_grad.numel(), bits, bucket)
    payload = torch.empty(nbytes, dtype=torch.uint8, device=grad.device)
    if bits == 1:
        non_finite, sq_norm, sq_error = native().sign_encode(flat_grad, flat_state, bucket, code, payload)
    else:
        non_finite, sq_norm, sq_error = native().qsgd_encode(flat_grad, flat_state, bits, bucket, seed, code, payload)
    if non_finite:
        raise NonFiniteGradientError(
            f"gradient {name!r} ({'plus' if mode == 'ef' else 'minus'} its {mode.upper()} state) has "
            f"{non_finite:,} non-finite entries (NaN or Inf, or a bucket norm beyond float32); nothing was sent "
            "and the state is unchanged"
        )
    return QuantMessage(payload, float(sq_norm), float(sq_error))


def qsgd_encode(
    grad: torch.Tensor,
    state: torch.Tensor,
    *,
    bits: int,
    bucket: int = 512,
    seed: int,
    mode: str = "ef21",
    name: str = "tensor",
) -> QuantMessage:
    """QSGD stochastic quantisation with error feedback, fused in one native op.

    Forms ``v`` as :func:`topk_encode` does, and per bucket of ``bucket`` elements sends the
    float32 norm ``N`` and, per element, the sign and a level ``l = floor(|v| / N * s + u)`` in
    ``[0, s]``, ``s = 2**(bits-1) - 1``, ``u`` the counter-based draw :func:`uniform_draws` of
    ``(seed, index)`` (so ``E[Q(v)] = v``, and the message depends only on ``v`` and ``seed``).
    State update: EF21 ``h += Q(v)``; EF ``e = v - Q(v)``.

    Args:
        grad, state, mode, name: as for :func:`topk_encode`.
        bits: bits per element: 8, 4 or 2.
        bucket: elements per bucket: 1 to 65,535, or any size >= numel (one bucket); the
            message header records it, so a receiver expecting another bucket refuses it.
        seed: the draws' key, an int in ``[0, 2**64)``; use a fresh one per step and rank.

    Returns:
        A :class:`QuantMessage` of ``wire.message_bytes("qsgd", n, bits=bits, bucket=bucket)`` bytes.

    Raises:
        KimadError: wrong dtype, device, shape, bits, bucket or seed.
        NonFiniteGradientError: ``v`` holds NaN or Inf; the state is unchanged.
    """
    if bits not in (8, 4, 2) or isinstance(bits, bool):
        raise KimadError(f"qsgd_encode for {name!r}: bits must be 8, 4 or 2, got {bits!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise KimadError(f"qsgd_encode for {name!r}: seed must be an int in [0, 2**64), got {seed!r}")
    return _quant_encode("qsgd_encode", grad, state, bits, bucket, seed, mode, name)


def sign_encode(
    grad: torch.Tensor,
    state: torch.Tensor,
    *,
    bucket: int = 512,
    mode: str = "ef21",
    name: str = "tensor",
) -> QuantMessage:
    """Scaled sign (EF-SignSGD) with error feedback, fused in one native op.

    Per bucket sends ``S = mean |v|`` (float32) and one bit per element (1 for ``v < 0``); the
    decoded value is ``-S`` or ``+S``. State update as in :func:`qsgd_encode`.

    Returns:
        A :class:`QuantMessage` of ``wire.message_bytes("sign", n, bucket=bucket)`` bytes.

    Raises:
        KimadError: wrong dtype, device, shape or bucket.
        NonFiniteGradientError: ``v`` holds NaN or Inf; the state is unchanged.
    """
    return _quant_encode("sign_encode", grad, state, 1, bucket, 0, mode, name)


def quant_decode_accumulate(
    out: torch.Tensor,
    payload: torch.Tensor,
    *,
    fmt: str,
    numel: int,
    bits: int | None = None,
    bucket: int = 512,
    scale: float = 1.0,
    name: str = "tensor",
) -> torch.Tensor:
    """Decode one QSGD or sign message into a dense tensor: ``out += scale * decoded``.

    The length, the header (element count, format, bits, bucket) and every bucket norm / scale are checked
    before anything is written, so a corrupt message leaves ``out`` unchanged.

    Args:
        out: contiguous float32 tensor of ``numel`` elements, updated in place.
        payload: 1-D uint8 tensor, the message as produced by the encoder.
        fmt: ``"qsgd"`` or ``"sign"``.
        numel: the tensor's number of elements (must equal ``out.numel()``).
        bits: for ``qsgd``, 8, 4 or 2 (ignored for ``sign``).
        bucket: elements per bucket the sender used (checked against the header's bucket field).
        scale: multiplier of every decoded value (e.g. ``1 / world_size``).
        name: the tensor's name, used in error messages.

    Returns:
        ``out``.

    Raises:
        KimadError: wrong dtype, device, shape or argument.
        CorruptMessageError: the message does not match the expected layout; ``out`` is unchanged.
    """
    op = "quant_decode_accumulate"
    if not isinstance(out, torch.Tensor) or not isinstance(payload, torch.Tensor):
        raise KimadError(f"{op} for {name!r}: out and payload must be torch tensors")
    if out.dtype != torch.float32 or not out.is_contiguous():
        raise KimadError(f"{op} for {name!r}: out must be a contiguous float32 tensor (it is updated in place)")
    if out.numel() != numel:
        raise KimadError(f"{op} for {name!r}: out has {out.numel():,} elements, expected numel={numel:,}")
    if fmt == "qsgd":
        if bits not in (8, 4, 2) or isinstance(bits, bool):
            raise KimadError(f"{op} for {name!r}: qsgd bits must be 8, 4 or 2, got {bits!r}")
        code_bits = bits
    elif fmt == "sign":
        code_bits = 1
    else:
        raise KimadError(f"{op} for {name!r}: fmt must be 'qsgd' or 'sign', got {fmt!r}")
    if isinstance(bucket, bool) or not isinstance(bucket, int) or bucket < 1:
        raise KimadError(f"{op} for {name!r}: bucket must be an int >= 1 element, got {bucket!r}")
    if payload.dtype != torch.uint8 or payload.dim() != 1:
        raise KimadError(f"{op} for {name!r}: payload must be a 1-D uint8 tensor, got {payload.dtype} "
                         f"of shape {tuple(payload.shape)}")
    if payload.device != out.device:
        raise KimadError(f"{op} for {name!r}: out ({out.device}) and payload ({payload.device}) must be on one device")
    if numel > torch.iinfo(torch.int32).max:
        raise KimadError(f"{op} for {name!r}: {numel:,} elements exceed int32 indexing")
    payload = payload.contiguous()
    status = native().quant_decode_accumulate(out.view(-1), payload, code_bits, bucket, float(scale))
    if status:
        head = payload[:8].cpu().tolist() if payload.numel() >= 8 else [0] * 8
        raise CorruptMessageError(f"{fmt} message for {name!r} " + _QUANT_DECODE_REASONS[status].format(
            got=payload.numel(), fmt=fmt, numel=numel, bits=code_bits, bucket=bucket,
            want=native().quant_message_bytes(numel, code_bits, bucket),
            hdr=int.from_bytes(bytes(head[:4]), "little"), tag=head[4], hbits=head[5],
            hbucket=int.from_bytes(bytes(head[6:8]), "little"), want_bucket=_bucket_field(numel, bucket)))
    return out


def quant_error_estimate(
    grad: torch.Tensor,
    state: torch.Tensor,
    *,
    bucket: int = 512,
    mode: str = "ef21",
    name: str = "tensor",
) -> QuantErrorEstimate:
    """Expected squared QSGD errors (bits 8, 4, 2) and the sign error of ``v``, in one pass.

    Per element of a bucket of norm ``N``: ``(N / s)**2 * p * (1 - p)`` with ``p`` the rounding
    probability of its level (the variance of the stochastic rounding), summed. The state is only
    read.

    Raises:
        KimadError: wrong dtype, device, shape or bucket.
        NonFiniteGradientError: ``v`` holds NaN or Inf.
    """
    flat_grad, flat_state, code = _quant_operands("quant_error_estimate", grad, state, mode, bucket, name)
    non_finite, sq_norm, errors = native().quant_error_estimate(flat_grad, flat_state, bucket, code)
    if non_finite:
        raise NonFiniteGradientError(
            f"gradient {name!r} ({'plus' if mode == 'ef' else 'minus'} its {mode.upper()} state) has "
            f"{non_finite:,} non-finite entries (NaN or Inf); no error estimate"
        )
    return QuantErrorEstimate({8: errors[0], 4: errors[1], 2: errors[2]}, errors[3], float(sq_norm))


def uniform_draws(seed: int, n: int) -> torch.Tensor:
    """The ``n`` uniform draws in ``[0, 1)`` (float32, CPU) that :func:`qsgd_encode` uses under ``seed``.

    Draw ``i`` depends only on ``(seed, i)`` (a counter-based hash), so references can reproduce
    the encoder's rounding exactly.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise KimadError(f"uniform_draws: seed must be an int in [0, 2**64), got {seed!r}")
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n < 2**32:
        raise KimadError(f"uniform_draws: n must be an int in [0, 2**32), got {n!r}")
    return native().uniform_draws(seed, n)
