"""The QSGD and scaled-sign messages: their byte layout, sizes and header.

Both are sent by allgather; every rank decodes every other rank's message with
:func:`kimad.ops.quant_decode_accumulate`. Layout of one message of a tensor of ``n`` elements
in buckets of ``bucket`` consecutive elements (``B = ceil(n / bucket)`` buckets):

``[0, 8)``           header: uint32 ``n`` (little-endian), uint8 format tag (``0x51`` = ``'Q'``
                     for QSGD, ``0x53`` = ``'S'`` for sign), uint8 bits (8, 4 or 2 for QSGD; 1 for
                     sign), uint16 bucket field (little-endian, :func:`bucket_field`: the
                     bucket size, or 0 when one bucket spans the tensor), so that a receiver
                     expecting another bucket size refuses the message.
``[8, 8 + 4 B)``     one little-endian float32 per bucket: its L2 norm ``N`` (QSGD) or its mean
                     ``|v|`` ``S`` (sign).
then                 ``ceil(n * bits / 8)`` code bytes: element ``i`` occupies bits
                     ``[i * bits, (i + 1) * bits)`` of the code bytes, LSB first (bit ``p`` is bit
                     ``p % 8`` of byte ``p // 8``); unused high bits of the last byte are zero.

A QSGD code is ``level | negative << (bits - 1)``, ``level`` in ``[0, s]``,
``s = 2**(bits-1) - 1``, decoded as ``-+level * (N / s)``. A sign code is 1 for ``v < 0``,
decoded as ``-+S``. The total is exactly :func:`kimad.compressors.wire.message_bytes`.
"""

from __future__ import annotations

from dataclasses import dataclass

from kimad.compressors.wire import HEADER_BYTES, MessageFormat, message_bytes
from kimad.errors import CorruptMessageError

QSGD_TAG = 0x51
SIGN_TAG = 0x53


def qsgd_levels(bits: int) -> int:
    """Number of nonzero levels ``s = 2**(bits-1) - 1`` of a QSGD code of ``bits`` bits."""
    return 2 ** (bits - 1) - 1


def bucket_field(n: int, bucket: int) -> int:
    """The header's bucket field of a message of ``n`` elements in buckets of ``bucket``: ``bucket``,
    or 0 when ``bucket >= n`` (one bucket, whatever its nominal size). Fits 16 bits when
    ``bucket <= 65535`` or ``bucket >= n``, which the encoders require."""
    return 0 if bucket >= n else bucket


def qsgd_payload_bytes(n: int, bits: int, bucket: int = 512) -> int:
    """Exact bytes of a QSGD message of ``n`` elements (delegates to :func:`wire.message_bytes`)."""
    return message_bytes(MessageFormat.QSGD, n, bits=bits, bucket=bucket)


def sign_payload_bytes(n: int, bucket: int = 512) -> int:
    """Exact bytes of a scaled-sign message of ``n`` elements (delegates to :func:`wire.message_bytes`)."""
    return message_bytes(MessageFormat.SIGN, n, bucket=bucket)


@dataclass(frozen=True)
class QuantHeader:
    """The 8-byte header of a QSGD or sign message (``bucket``: the bucket field, see :func:`bucket_field`)."""

    numel: int
    fmt: MessageFormat
    bits: int
    bucket: int


def read_header(payload: bytes) -> QuantHeader:
    """Parse the header of a QSGD or sign message (bytes, or anything ``bytes()`` accepts).

    Raises:
        CorruptMessageError: fewer than 8 bytes, or an unknown tag.
    """
    head = bytes(payload[:HEADER_BYTES])
    if len(head) < HEADER_BYTES:
        raise CorruptMessageError(f"a quantised message has at least {HEADER_BYTES} bytes, got {len(head)}")
    tags = {QSGD_TAG: MessageFormat.QSGD, SIGN_TAG: MessageFormat.SIGN}
    if head[4] not in tags:
        raise CorruptMessageError(f"not a QSGD or sign message header: {head.hex()}")
    return QuantHeader(int.from_bytes(head[:4], "little"), tags[head[4]], head[5], int.from_bytes(head[6:8], "little"))
