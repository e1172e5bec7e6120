"""The top-k wire codec: one tensor's top-k message <-> exactly ``message_bytes("topk", n, k=k)`` bytes.

Layout (see :mod:`kimad.compressors.wire`), little-endian:

* 8-byte header: uint32 ``k``, uint8 index kind (:class:`~kimad.compressors.wire.IndexKind`: 0 = int32
  indices, 1 = bitmap, 2 = block16), 3 zero bytes;
* ``k`` bfloat16 values, in ascending order of their positions (:func:`wire_values` gives what a float32
  value becomes; a sender's error feedback keeps the difference);
* the positions, in the kind :func:`~kimad.compressors.wire.topk_index_kind` says: ``k`` int32 indices
  (ascending); an ``n``-bit bitmap (bit ``i`` of byte ``j`` is position ``8 j + i``, least significant bit
  first; padding bits zero); or block16: ``ceil(n / 65536)`` uint32 counts (positions sent in each block of
  65,536), then every position's uint16 offset in its block, ascending.

Torch ops (bitmaps are packed by multiplying rows of 8 bits with the bit weights), so the codec runs on
the tensor's device; only a CPU bitmap is decoded natively (:func:`kimad.ops.bitmap_positions`: one scan
of 64-bit words, where unpacking the bits and ``nonzero`` write and read a byte per position).
"""

from __future__ import annotations

import sys

import torch

from kimad import ops
from kimad.compressors.wire import (
    BLOCK16_SPAN,
    HEADER_BYTES,
    TOPK_VALUE_BYTES,
    IndexKind,
    message_bytes,
    topk_index_kind,
)
from kimad.errors import CorruptMessageError, KimadError

INDEX_KIND_INT32 = int(IndexKind.INT32)
INDEX_KIND_BITMAP = int(IndexKind.BITMAP)
INDEX_KIND_BLOCK16 = int(IndexKind.BLOCK16)
_BFLOAT16_MAX = torch.finfo(torch.bfloat16).max

if sys.byteorder != "little":  # the wire is little-endian and values are reinterpreted in place
    raise ImportError("kimad.compressors.topk supports little-endian machines only")


# Bytes b_0..b_7 of an int64 (each 0 or 1, b_0 least significant) times this constant hold b_i at bit 56 + i
# (every partial product is a distinct power of two, so nothing carries): one multiply packs 8 positions.
_PACK_MULTIPLIER = 0x0102040810204080


def _bit_shifts(device: torch.device) -> torch.Tensor:
    return torch.arange(8, dtype=torch.uint8, device=device)


def _header(k: int, kind: int, device: torch.device) -> torch.Tensor:
    return torch.tensor(list(int(k).to_bytes(4, "little")) + [kind, 0, 0, 0], dtype=torch.uint8, device=device)


def wire_values(values: torch.Tensor) -> torch.Tensor:
    """The float32 values a receiver decodes for these sent values: each rounded to bfloat16 (to nearest, ties to
    even; finite values beyond bfloat16's range are clamped to its largest finite value, not sent as infinity).

    A sender with error feedback keeps ``values - wire_values(values)`` (:meth:`kimad.feedback.ErrorFeedback.
    encode_topk`), so the rounding is sent later rather than lost. :func:`encode_topk` sends exactly these.
    """
    return values.detach().to(torch.float32).clamp(-_BFLOAT16_MAX, _BFLOAT16_MAX).to(torch.bfloat16).to(torch.float32)


def _block16(indices: torch.Tensor, n: int) -> torch.Tensor:
    """Block16 positions of ascending ``indices``: per block of 65,536 its uint32 count, then uint16 offsets."""
    blocks = (n + BLOCK16_SPAN - 1) // BLOCK16_SPAN
    idx = indices.to(torch.int32)
    counts = torch.bincount((idx >> 16).long(), minlength=blocks).to(torch.int32)
    offsets = (idx & 0xFFFF).contiguous().view(torch.uint8).view(-1, 4)[:, :2].reshape(-1)  # low 2 bytes (LE)
    return torch.cat([counts.view(torch.uint8), offsets])


def _unblock16(positions: torch.Tensor, n: int, k: int, name: str) -> torch.Tensor:
    """Ascending int32 positions of block16 bytes (inverse of :func:`_block16`), checked against ``n`` and ``k``."""
    blocks = (n + BLOCK16_SPAN - 1) // BLOCK16_SPAN
    counts = positions[: 4 * blocks].clone().view(torch.int32)
    if blocks and (bool((counts < 0).any()) or int(counts.sum()) != k):
        raise CorruptMessageError(f"top-k message for {name!r}: block16 counts {counts.tolist()[:8]}... do not add "
                                  f"up to k={k:,}")
    pairs = positions[4 * blocks:].view(-1, 2).to(torch.int32)
    offsets = pairs[:, 0] | (pairs[:, 1] << 8)
    bases = torch.repeat_interleave(torch.arange(blocks, dtype=torch.int32, device=positions.device) * BLOCK16_SPAN,
                                    counts.long(), output_size=k)
    return bases + offsets


def encode_topk(values: torch.Tensor, indices: torch.Tensor, n: int, *, name: str = "tensor") -> torch.Tensor:
    """Pack a top-k message of a tensor of ``n`` elements.

    Args:
        values: 1-D float tensor of the ``k`` sent values, sent as :func:`wire_values` of them (bfloat16).
        indices: 1-D int32/int64 tensor of their ``k`` flat positions, strictly ascending, in ``[0, n)``.
        n: number of elements of the tensor.
        name: the tensor's name, for error messages.

    Returns:
        A 1-D uint8 tensor of exactly ``message_bytes("topk", n, k=k)`` bytes, on ``values``' device.

    Raises:
        KimadError: shapes or dtypes do not fit, or ``k > n``.
    """
    if values.dim() != 1 or indices.dim() != 1 or values.numel() != indices.numel():
        raise KimadError(f"top-k message for {name!r}: values and indices must be 1-D of equal length, got "
                         f"{tuple(values.shape)} and {tuple(indices.shape)}")
    if not values.is_floating_point() or indices.dtype not in (torch.int32, torch.int64):
        raise KimadError(f"top-k message for {name!r}: values must be float and indices int32/int64, got "
                         f"{values.dtype} and {indices.dtype}")
    k = values.numel()
    if not 0 <= k <= n:
        raise KimadError(f"top-k message for {name!r}: k={k:,} entries for a tensor of n={n:,}")
    device = values.device
    body = wire_values(values).to(torch.bfloat16).contiguous().view(torch.uint8)
    kind = topk_index_kind(n, k)
    if kind is IndexKind.BITMAP:
        bits = torch.zeros(((n + 7) // 8) * 8, dtype=torch.uint8, device=device)
        bits.index_fill_(0, indices.long(), 1)
        positions = ((bits.view(torch.int64) * _PACK_MULTIPLIER) >> 56).to(torch.uint8)
    elif kind is IndexKind.BLOCK16:
        positions = _block16(indices, n)
    else:
        positions = indices.to(torch.int32).contiguous().view(torch.uint8)
    out = torch.cat([_header(k, int(kind), device), body, positions])
    if out.numel() != message_bytes("topk", n, k=k):  # the wire module is the source of truth
        raise KimadError(f"top-k message for {name!r} packed to {out.numel():,} bytes, the wire format says "
                         f"{message_bytes('topk', n, k=k):,}; this is a bug in kimad.compressors.topk")
    return out


def decode_topk(message: torch.Tensor, n: int, *, name: str = "tensor") -> tuple[torch.Tensor, torch.Tensor]:
    """Unpack :func:`encode_topk`'s bytes for a tensor of ``n`` elements.

    Returns:
        ``(values, indices)``: 1-D float32 (decoded from bfloat16) and int32 tensors of ``k`` entries, indices
        ascending.

    Raises:
        CorruptMessageError: wrong length for its ``k``, an index kind that does not match ``(n, k)``,
            nonzero padding, a bitmap whose popcount is not ``k``, block16 counts that do not add up to ``k``,
            indices not ascending in ``[0, n)``, or a value that is not finite.
    """
    if message.dtype != torch.uint8 or message.dim() != 1:
        raise KimadError(f"top-k message for {name!r} must be a 1-D uint8 tensor, got {message.dtype} "
                         f"{tuple(message.shape)}")
    if message.numel() < HEADER_BYTES:
        raise CorruptMessageError(f"top-k message for {name!r} has {message.numel()} bytes, less than its header")
    header = message[:HEADER_BYTES].tolist()
    k = int.from_bytes(bytes(header[:4]), "little")
    kind = header[4]
    if k > n:
        raise CorruptMessageError(f"top-k message for {name!r} says k={k:,} but the tensor has {n:,} elements")
    if message.numel() != message_bytes("topk", n, k=k):
        raise CorruptMessageError(f"top-k message for {name!r} has {message.numel():,} bytes; k={k:,} of "
                                  f"n={n:,} needs {message_bytes('topk', n, k=k):,}")
    expected_kind = int(topk_index_kind(n, k))
    if kind != expected_kind or any(header[5:]):
        raise CorruptMessageError(f"top-k message for {name!r}: header {header} does not match k={k:,}, n={n:,} "
                                  f"(index kind must be {expected_kind}, padding zero)")
    body = message[HEADER_BYTES:]
    values = body[: TOPK_VALUE_BYTES * k].clone().view(torch.bfloat16).to(torch.float32)
    if not bool(torch.isfinite(values).all()):
        raise CorruptMessageError(f"top-k message for {name!r} carries a value that is not finite")
    positions = body[TOPK_VALUE_BYTES * k:]
    if kind == INDEX_KIND_BITMAP and k == n:  # every position sent: the bitmap must be all ones up to n
        full, rest = divmod(n, 8)
        if not (bool(positions[:full].eq(255).all()) and (not rest or int(positions[full]) == (1 << rest) - 1)):
            raise CorruptMessageError(f"top-k message for {name!r}: header says all k=n={n:,} positions are sent "
                                      "but the bitmap is not all ones up to n (or its padding is not zero)")
        indices = torch.arange(n, dtype=torch.int32, device=message.device)
    elif kind == INDEX_KIND_BITMAP:
        if n % 8 and int(positions[-1]) >> (n % 8):  # the padding bits past n are all in the last byte
            raise CorruptMessageError(f"top-k message for {name!r}: bitmap padding bits past n={n:,} are set")
        if positions.is_cpu:  # native scan: 17-40x torch's unpack + nonzero at 0.4-1M positions, 10% set
            indices, count = ops.bitmap_positions(positions, n, capacity=k, name=name)
        else:
            bits = ((positions.unsqueeze(1) >> _bit_shifts(message.device)) & 1).view(-1).view(torch.bool)
            indices = bits[:n].nonzero().view(-1).to(torch.int32)
            count = indices.numel()
        if count != k:
            raise CorruptMessageError(f"top-k message for {name!r}: bitmap marks {count:,} positions, "
                                      f"header says k={k:,}")
    else:
        if kind == INDEX_KIND_BLOCK16:
            indices = _unblock16(positions, n, k, name)
        else:
            indices = positions.clone().view(torch.int32)
        if k and (int(indices[0]) < 0 or int(indices[-1]) >= n or bool((indices[1:] <= indices[:-1]).any())):
            raise CorruptMessageError(f"top-k message for {name!r}: indices are not strictly ascending in "
                                      f"[0, {n:,})")
    return values, indices
