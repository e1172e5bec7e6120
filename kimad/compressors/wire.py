"""The wire format of every Kimad message, and its exact size in bytes.

This module is the single source of truth for how many bytes a compressed tensor occupies on
the wire: the cost model (``kimad.control``) prices options with it and the encoders
(``kimad.ops`` / ``csrc``) must produce exactly these sizes. A tensor of ``n`` elements is
sent as one of:

``dense32``  n float32, by allreduce: ``4 n`` bytes, no header (shape is known to every rank).
``dense16``  n float16, by allreduce: ``2 n`` bytes, no header.
``topk``     k values of the corrected gradient, by allgather. Layout: an 8-byte header
             (uint32 k, uint8 index kind, 3 bytes zero), then k bfloat16 values (``2 k`` bytes;
             error feedback keeps what rounding drops, see :mod:`kimad.feedback`), then the
             positions in the smallest of three encodings (:func:`topk_index_kind`; ties go to
             the lower kind): ``INT32`` k int32 indices (``4 k`` bytes), ``BITMAP`` n bits
             (``ceil(n / 8)`` bytes), or ``BLOCK16``: one uint32 count per block of 65,536
             positions, then each position's uint16 offset in its block (``4 ceil(n / 65536) + 2 k``
             bytes). A position costs 2 + 2 = 4 bytes at low density (8 with float32 values and
             int32 indices) and 2 + 1 / (8 density) at high density.
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


TOPK_VALUE_BYTES = 2  # bfloat16
# Expected squared error of rounding a value to bfloat16, relative to its square: round to nearest with 8
# significant bits leaves a relative error of at most 2**-9, about uniform, so (2**-9)**2 / 3.
TOPK_ROUNDING_REL_SQ_ERROR = 2.0 ** -18 / 3
BLOCK16_SPAN = 1 << 16  # positions per BLOCK16 block


class IndexKind(enum.IntEnum):
    """How a top-k message encodes its positions (the header's index-kind byte)."""

    INT32 = 0
    BITMAP = 1
    BLOCK16 = 2


def topk_index_bytes(kind: IndexKind, n: int, k: int) -> int:
    """Bytes of the positions of a top-k message of ``k`` out of ``n`` positions in encoding ``kind``."""
    if kind is IndexKind.INT32:
        return 4 * k
    if kind is IndexKind.BITMAP:
        return (n + 7) // 8
    return 4 * ((n + BLOCK16_SPAN - 1) // BLOCK16_SPAN) + 2 * k


def topk_index_kind(n: int, k: int) -> IndexKind:
    """The encoding a top-k message of ``k`` out of ``n`` positions uses: the smallest (ties: the lower kind)."""
    kind, size = IndexKind.INT32, 4 * k
    if (n + 7) // 8 < size:
        kind, size = IndexKind.BITMAP, (n + 7) // 8
    if topk_index_bytes(IndexKind.BLOCK16, n, k) < size:
        kind = IndexKind.BLOCK16
    return kind


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
        return HEADER_BYTES + TOPK_VALUE_BYTES * k + topk_index_bytes(topk_index_kind(n, k), n, k)
    if bucket < 1:
        raise KimadError(f"bucket must be >= 1 element, got {bucket}")
    buckets = (n + bucket - 1) // bucket
    if fmt is MessageFormat.QSGD:
        if bits not in QSGD_BITS:
            raise KimadError(f"qsgd bits must be one of {QSGD_BITS}, got {bits}")
        return HEADER_BYTES + 4 * buckets + (n * bits + 7) // 8
    return HEADER_BYTES + 4 * buckets + (n + 7) // 8  # SIGN
