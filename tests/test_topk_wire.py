"""The top-k wire codec (kimad.compressors.topk): exact sizes, exact layout, lossless positions, values as
bfloat16, corrupt input rejected."""

import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kimad.compressors.topk import (
    INDEX_KIND_BITMAP,
    INDEX_KIND_BLOCK16,
    INDEX_KIND_INT32,
    decode_topk,
    encode_topk,
    wire_values,
)
from kimad.compressors.wire import HEADER_BYTES, IndexKind, message_bytes, topk_index_kind
from kimad.errors import CorruptMessageError, KimadError


def message(n: int, k: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    indices = torch.randperm(n, generator=g)[:k].sort().values.to(torch.int32)
    values = torch.randn(k, generator=g)
    return values, indices


def bf16(*values: float) -> bytes:
    """Little-endian bfloat16 bytes of values that bfloat16 holds exactly."""
    return torch.tensor(values, dtype=torch.bfloat16).view(torch.uint8).numpy().tobytes()


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 3000).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(0, 2**31))))
def test_round_trip_keeps_positions_and_rounds_values_to_bfloat16(nks):
    n, k, seed = nks
    values, indices = message(n, k, seed)
    wire = encode_topk(values, indices, n)
    assert wire.dtype == torch.uint8 and wire.numel() == message_bytes("topk", n, k=k)
    got_values, got_indices = decode_topk(wire, n)
    assert torch.equal(got_values, wire_values(values)) and torch.equal(got_indices, indices)
    assert torch.allclose(got_values, values, rtol=2**-8, atol=0)  # bfloat16: 8 significant bits


@settings(max_examples=30, deadline=None)
@given(st.integers(65_537, 300_000).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n // 40),
                                                                 st.integers(0, 2**31))))
def test_block16_round_trips_across_blocks(nks):
    n, k, seed = nks
    values, indices = message(n, k, seed)
    wire = encode_topk(values, indices, n)
    assert wire.numel() == message_bytes("topk", n, k=k)
    got_values, got_indices = decode_topk(wire, n)
    assert torch.equal(got_indices, indices) and torch.equal(got_values, wire_values(values))


def test_block16_layout_byte_by_byte():
    n = 70_000  # two blocks: 0..65535 and 65536..69999
    values = torch.tensor([1.5, -2.0, 0.25, 8.0, -0.5])
    indices = torch.tensor([3, 65_535, 65_536 + 700, 65_536 + 701, 69_999], dtype=torch.int32)
    assert topk_index_kind(n, 5) is IndexKind.BLOCK16  # 8 + 10 bytes against 20 of int32
    expected = (struct.pack("<IB3x", 5, INDEX_KIND_BLOCK16) + bf16(1.5, -2.0, 0.25, 8.0, -0.5)
                + struct.pack("<2I", 2, 3) + struct.pack("<5H", 3, 65_535, 700, 701, 4463))
    assert bytes(encode_topk(values, indices, n).tolist()) == expected


def test_int32_layout_byte_by_byte():
    n = 10_000_000  # 153 blocks: 612 bytes of block16 counts against 8 bytes of int32 indices
    values, indices = torch.tensor([1.5, -2.0]), torch.tensor([3, 9_999_999], dtype=torch.int32)
    assert topk_index_kind(n, 2) is IndexKind.INT32
    expected = struct.pack("<IB3x", 2, INDEX_KIND_INT32) + bf16(1.5, -2.0) + struct.pack("<2i", 3, 9_999_999)
    assert bytes(encode_topk(values, indices, n).tolist()) == expected
    got_values, got_indices = decode_topk(encode_topk(values, indices, n), n)
    assert got_values.tolist() == [1.5, -2.0] and got_indices.tolist() == [3, 9_999_999]


def test_bitmap_layout_is_lsb_first_with_zero_padding():
    n, indices = 10, torch.tensor([0, 3, 8, 9], dtype=torch.int32)
    values = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert topk_index_kind(n, 4) is IndexKind.BITMAP
    bitmap = bytes([0b0000_1001, 0b0000_0011])  # positions 0, 3 | 8, 9
    expected = struct.pack("<IB3x", 4, INDEX_KIND_BITMAP) + bf16(1.0, 2.0, 3.0, 4.0) + bitmap
    assert bytes(encode_topk(values, indices, n).tolist()) == expected


def test_values_are_rounded_to_nearest_and_clamped_to_bfloat16s_range():
    big = torch.finfo(torch.float32).max
    values = torch.tensor([1.0 + 2**-9, 1.0 + 3 * 2**-9, big, -big, 1e-30])
    got = wire_values(values)
    bf_max = torch.finfo(torch.bfloat16).max
    assert got.tolist() == [1.0, 1.0 + 2**-7, bf_max, -bf_max, torch.tensor(1e-30).bfloat16().item()]
    decoded, _ = decode_topk(encode_topk(values, torch.arange(5, dtype=torch.int32), 1000), 1000)
    assert torch.equal(decoded, got) and bool(torch.isfinite(decoded).all())


def test_int64_indices_and_float16_values_are_converted():
    values, indices = message(500, 7)
    wire = encode_topk(values.half(), indices.long(), 500)
    got_values, got_indices = decode_topk(wire, 500)
    assert torch.equal(got_values, wire_values(values.half())) and torch.equal(got_indices, indices)


def test_mismatched_values_and_indices_are_rejected():
    with pytest.raises(KimadError, match="equal length"):
        encode_topk(torch.zeros(3), torch.zeros(2, dtype=torch.int32), 10)


def test_a_truncated_message_is_corrupt():
    wire = encode_topk(*message(1000, 5), 1000)
    with pytest.raises(CorruptMessageError, match="bytes"):
        decode_topk(wire[:-1], 1000)


@pytest.mark.parametrize("kind", [INDEX_KIND_INT32, INDEX_KIND_BITMAP, 3])
def test_a_wrong_index_kind_is_corrupt(kind):
    wire = encode_topk(*message(1000, 5), 1000).clone()  # block16 (4 + 10 bytes)
    wire[4] = kind
    with pytest.raises(CorruptMessageError, match="index kind"):
        decode_topk(wire, 1000)


def test_block16_counts_that_do_not_add_up_to_k_are_corrupt():
    n, k = 70_000, 5
    wire = encode_topk(*message(n, k), n).clone()
    counts = HEADER_BYTES + 2 * k
    wire[counts] += 1  # the first block claims one position more
    with pytest.raises(CorruptMessageError, match="do not add up to k=5"):
        decode_topk(wire, n)


def test_block16_offsets_out_of_order_are_corrupt():
    n = 1000
    wire = encode_topk(torch.ones(3), torch.tensor([5, 6, 7], dtype=torch.int32), n).clone()
    offsets = HEADER_BYTES + 2 * 3 + 4
    wire[offsets] = 9  # position 5 -> 9, after 6 and 7
    with pytest.raises(CorruptMessageError, match="ascending"):
        decode_topk(wire, n)


def test_a_block16_position_past_n_is_corrupt():
    n = 1000
    wire = encode_topk(torch.ones(3), torch.tensor([1, 2, 999], dtype=torch.int32), n).clone()
    wire[-1] = 0x10  # offset 999 = 0x03e7 -> 0x10e7
    with pytest.raises(CorruptMessageError, match="ascending in"):
        decode_topk(wire, n)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_value_that_is_not_finite_is_corrupt(bad):
    wire = encode_topk(torch.ones(2), torch.tensor([1, 2], dtype=torch.int32), 1000).clone()
    wire[HEADER_BYTES: HEADER_BYTES + 2] = torch.tensor([bad], dtype=torch.bfloat16).view(torch.uint8)
    with pytest.raises(CorruptMessageError, match="not finite"):
        decode_topk(wire, 1000)


def test_indices_out_of_order_are_corrupt():
    values, indices = torch.tensor([1.0, 2.0]), torch.tensor([9, 4], dtype=torch.int32)
    with pytest.raises(CorruptMessageError, match="ascending"):
        decode_topk(encode_topk(values, indices, 10_000_000), 10_000_000)  # int32 indices


def test_a_bitmap_with_padding_bits_set_is_corrupt():
    wire = encode_topk(*message(10, 4), 10).clone()
    wire[-1] |= 0b1000_0000  # position 15 >= n
    with pytest.raises(CorruptMessageError, match="padding"):
        decode_topk(wire, 10)


def test_a_bitmap_whose_popcount_is_not_k_is_corrupt():
    values, indices = message(10, 4)
    wire = encode_topk(values, indices, 10).clone()
    wire[-2] = 0  # clears the positions 0..7
    with pytest.raises(CorruptMessageError, match="marks"):
        decode_topk(wire, 10)


def test_a_bitmap_marking_more_than_k_positions_is_corrupt():
    values, indices = message(100, 20)
    wire = encode_topk(values, indices, 100).clone()
    free = next(p for p in range(100) if p not in indices.tolist())
    wire[-(13 - free // 8)] |= 1 << (free % 8)  # one more position than the header's k
    with pytest.raises(CorruptMessageError, match="marks 21 positions, header says k=20"):
        decode_topk(wire, 100)


@pytest.mark.parametrize("n", [8, 13, 100_003])
def test_all_positions_sent_round_trips_through_an_all_ones_bitmap(n):
    values, indices = torch.randn(n), torch.arange(n, dtype=torch.int32)
    wire = encode_topk(values, indices, n)
    assert bool(wire[HEADER_BYTES + 2 * n:][: n // 8].eq(255).all())
    got_values, got_indices = decode_topk(wire, n)
    assert torch.equal(got_values, wire_values(values)) and torch.equal(got_indices, indices)


@pytest.mark.parametrize("byte, bit", [(0, 0), (1, 4), (-1, 7)])
def test_all_positions_sent_with_a_cleared_or_padding_bit_is_rejected(byte, bit):
    n = 13  # 2 bitmap bytes, 3 padding bits in the last
    wire = encode_topk(torch.randn(n), torch.arange(n, dtype=torch.int32), n).clone()
    wire[HEADER_BYTES + 2 * n + (byte % 2)] ^= 1 << bit
    with pytest.raises(CorruptMessageError, match="all ones"):
        decode_topk(wire, n)
