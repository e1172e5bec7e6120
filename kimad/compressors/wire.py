"""The wire format of every Kimad message, and its exact size in bytes.

This module is the single source of truth for how many bytes a compressed tensor occupies on
the wire: the cost model (``kimad.control``) prices options with it and the encoders
(``kimad.ops`` / ``csrc``) must produce exactly these sizes. A tensor of ``n`` elements is
sent as one of:

``dense32``  n float32, by allreduce: ``4 n`` bytes, no header (shape is known to every rank).
``dense16``  n float16, by allreduce: ``2 n`` bytes, no header.
``topk``     k values of the corrected gradient, by allgather. Layout: an 8-byte header
             (uint32 k, uint8 index kind, 3 bytes zero), then k float32 values, then the
             positions, as k int32 indices (``4 k`` bytes) or as a bitmap of n bits
             (``ceil(n / 8)`` bytes), whichever is smaller (ties: indices).
``qsgd``     stochastic quantisation with ``bits`` in {8, 4, 2} per element (1 sign bit and
             ``bits - 1`` level bits, ``s = 2**(bits-1) - 1`` levels), in buckets of
             ``bucket`` elements, by allgather. Layout: 8-byte header, one float32 norm per
             bucket, then ``ceil(n * bits / 8)`` bytes of packed codes.
``sign``     scaled sign (1 bit per element), by allgather. Layout: 8-byte header, one float32
             scale per bucket, then ``ceil(n / 8)`` bytes of sign bits.
"""

from __future__ import annotations

import enum

from kimad.errors import KimadError

HEADER_BYTES = 8
DEFAULT_BUCKET = 512
QSGD_BITS = (8, 4, 2)


class MessageFormat(str, enum.Enum):
    """How one tensor is encoded on the wire (see the module docstring for each layout)."""

    DENSE32 = "dense32"
    DENSE16 = "dense16"
    TOPK = "topk"
    QSGD = "qsgd"
    SIGN = "sign"

    @property
    def collective(self) -> str:
        """``"allreduce"`` for dense formats (they sum), ``"allgather"`` for the others."""
        return "allreduce" if self in (MessageFormat.DENSE32, MessageFormat.DENSE16) else "allgather"


def topk_uses_bitmap(n: int, k: int) -> bool:
    """Whether a top-k message of ``k`` out of ``n`` positions sends a bitmap rather than int32 indices."""
    return (n + 7) // 8 < 4 * k


def message_bytes(fmt: MessageFormat | str, n: int, *, k: int | None = None, bits: int | None = None,
                  bucket: int = DEFAULT_BUCKET) -> int:
    """Exact size in bytes of one rank's message for a tensor of ``n`` elements.

    Args:
        fmt: the message format.
        n: number of elements of the tensor (>= 0).
        k: for ``topk``, the number of entries sent (0 <= k <= n).
        bits: for ``qsgd``, bits per element (8, 4 or 2).
        bucket: for ``qsgd`` and ``sign``, elements per bucket (>= 1).

    Raises:
        KimadError: an unknown format or an argument out of range.
    """
    try:
        fmt = MessageFormat(fmt)
    except ValueError:
        raise KimadError(f"unknown message format {fmt!r}; known: {[f.value for f in MessageFormat]}") from None
    if n < 0:
        raise KimadError(f"a tensor has n >= 0 elements, got n={n}")
    if fmt is MessageFormat.DENSE32:
        return 4 * n
    if fmt is MessageFormat.DENSE16:
        return 2 * n
    if fmt is MessageFormat.TOPK:
        if k is None or not 0 <= k <= n:
            raise KimadError(f"topk needs 0 <= k <= n={n:,}, got k={k}")
        index_bytes = (n + 7) // 8 if topk_uses_bitmap(n, k) else 4 * k
        return HEADER_BYTES + 4 * k + index_bytes
    if bucket < 1:
        raise KimadError(f"bucket must be >= 1 element, got {bucket}")
    buckets = (n + bucket - 1) // bucket
    if fmt is MessageFormat.QSGD:
        if bits not in QSGD_BITS:
            raise KimadError(f"qsgd bits must be one of {QSGD_BITS}, got {bits}")
        return HEADER_BYTES + 4 * buckets + (n * bits + 7) // 8
    return HEADER_BYTES + 4 * buckets + (n + 7) // 8  # SIGN
