"""The top-k wire codec (kimad.compressors.topk): exact sizes, exact layout, lossless round trip, corrupt input
rejected."""

import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kimad.compressors.topk import INDEX_KIND_BITMAP, INDEX_KIND_INT32, decode_topk, encode_topk
from kimad.compressors.wire import HEADER_BYTES, message_bytes, topk_uses_bitmap
from kimad.errors import CorruptMessageError, KimadError


def message(n: int, k: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    indices = torch.randperm(n, generator=g)[:k].sort().values.to(torch.int32)
    values = torch.randn(k, generator=g)
    return values, indices


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 3000).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(0, 2**31))))
def test_round_trip_is_lossless_and_exactly_message_bytes(nks):
    n, k, seed = nks
    values, indices = message(n, k, seed)
    wire = encode_topk(values, indices, n)
    assert wire.dtype == torch.uint8 and wire.numel() == message_bytes("topk", n, k=k)
    got_values, got_indices = decode_topk(wire, n)
    assert torch.equal(got_values, values) and torch.equal(got_indices, indices)


def test_int32_layout_byte_by_byte():
    values, indices = torch.tensor([1.5, -2.0]), torch.tensor([3, 70], dtype=torch.int32)
    assert not topk_uses_bitmap(100, 2)
    expected = struct.pack("<IB3x2f2i", 2, INDEX_KIND_INT32, 1.5, -2.0, 3, 70)
    assert bytes(encode_topk(values, indices, 100).tolist()) == expected


def test_bitmap_layout_is_lsb_first_with_zero_padding():
    n, indices = 10, torch.tensor([0, 3, 8, 9], dtype=torch.int32)
    values = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert topk_uses_bitmap(n, 4)
    bitmap = bytes([0b0000_1001, 0b0000_0011])  # positions 0, 3 | 8, 9
    expected = struct.pack("<IB3x4f", 4, INDEX_KIND_BITMAP, 1.0, 2.0, 3.0, 4.0) + bitmap
    assert bytes(encode_topk(values, indices, n).tolist()) == expected


def test_int64_indices_and_float16_values_are_converted():
    values, indices = message(500, 7)
    wire = encode_topk(values.half(), indices.long(), 500)
    got_values, got_indices = decode_topk(wire, 500)
    assert torch.equal(got_values, values.half().float()) and torch.equal(got_indices, indices)


def test_mismatched_values_and_indices_are_rejected():
    with pytest.raises(KimadError, match="equal length"):
        encode_topk(torch.zeros(3), torch.zeros(2, dtype=torch.int32), 10)


def test_a_truncated_message_is_corrupt():
    wire = encode_topk(*message(1000, 5), 1000)
    with pytest.raises(CorruptMessageError, match="bytes"):
        decode_topk(wire[:-1], 1000)


def test_a_wrong_index_kind_is_corrupt():
    wire = encode_topk(*message(1000, 5), 1000).clone()
    wire[4] = INDEX_KIND_BITMAP
    with pytest.raises(CorruptMessageError, match="index kind"):
        decode_topk(wire, 1000)


def test_indices_out_of_order_are_corrupt():
    values, indices = torch.tensor([1.0, 2.0]), torch.tensor([9, 4], dtype=torch.int32)
    with pytest.raises(CorruptMessageError, match="ascending"):
        decode_topk(encode_topk(values, indices, 100), 100)


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
    assert bool(wire[HEADER_BYTES + 4 * n:][: n // 8].eq(255).all())
    got_values, got_indices = decode_topk(wire, n)
    assert torch.equal(got_values, values) and torch.equal(got_indices, indices)


@pytest.mark.parametrize("byte, bit", [(0, 0), (1, 4), (-1, 7)])
def test_all_positions_sent_with_a_cleared_or_padding_bit_is_rejected(byte, bit):
    n = 13  # 2 bitmap bytes, 3 padding bits in the last
    wire = encode_topk(torch.randn(n), torch.arange(n, dtype=torch.int32), n).clone()
    wire[HEADER_BYTES + 4 * n + (byte % 2)] ^= 1 << bit
    with pytest.raises(CorruptMessageError, match="all ones"):
        decode_topk(wire, n)
