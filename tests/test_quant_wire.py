"""The QSGD and sign messages the encoders produce have exactly the sizes and header of the wire format."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kimad.compressors.quant import (
    QSGD_TAG,
    SIGN_TAG,
    bucket_field,
    qsgd_levels,
    qsgd_payload_bytes,
    read_header,
    sign_payload_bytes,
)
from kimad.compressors.wire import MessageFormat, message_bytes
from kimad.errors import CorruptMessageError, KimadError
from kimad.ops import qsgd_encode, sign_encode


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 5000), st.sampled_from([1, 2, 5, 64, 512, 10_000]), st.sampled_from([8, 4, 2]))
def test_encoders_produce_exactly_the_wire_sizes(n, bucket, bits):
    grad = torch.randn(n, generator=torch.Generator().manual_seed(n))
    q = qsgd_encode(grad, torch.zeros(n), bits=bits, bucket=bucket, seed=1).payload
    s = sign_encode(grad, torch.zeros(n), bucket=bucket).payload
    assert q.numel() == message_bytes("qsgd", n, bits=bits, bucket=bucket) == qsgd_payload_bytes(n, bits, bucket)
    assert s.numel() == message_bytes("sign", n, bucket=bucket) == sign_payload_bytes(n, bucket)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_qsgd_header_names_numel_format_and_bits(bits):
    payload = qsgd_encode(torch.randn(1234), torch.zeros(1234), bits=bits, seed=0).payload
    raw = bytes(payload.tolist())
    assert raw[:8] == (1234).to_bytes(4, "little") + bytes([QSGD_TAG, bits]) + (512).to_bytes(2, "little")
    head = read_header(payload.tolist())
    assert (head.numel, head.fmt, head.bits, head.bucket) == (1234, MessageFormat.QSGD, bits, 512)


def test_header_bucket_field_is_zero_when_one_bucket_spans_the_tensor():
    assert bucket_field(1000, 512) == 512
    assert bucket_field(1000, 1000) == bucket_field(1000, 70_000) == 0
    head = read_header(bytes(sign_encode(torch.randn(300), torch.zeros(300), bucket=300).payload.tolist()))
    assert head.bucket == 0


def test_sign_header_names_numel_format_and_one_bit():
    head = read_header(bytes(sign_encode(torch.randn(77), torch.zeros(77)).payload.tolist()))
    assert (head.numel, head.fmt, head.bits, head.bucket) == (77, MessageFormat.SIGN, 1, 0)  # 512 >= 77: one bucket
    assert bytes(sign_encode(torch.randn(77), torch.zeros(77)).payload.tolist())[4] == SIGN_TAG


def test_an_empty_tensor_sends_only_the_header():
    payload = qsgd_encode(torch.zeros(0), torch.zeros(0), bits=4, seed=0).payload
    assert payload.tolist() == [0, 0, 0, 0, QSGD_TAG, 4, 0, 0]


def test_levels_per_bit_width():
    assert [qsgd_levels(b) for b in (8, 4, 2)] == [127, 7, 1]


@pytest.mark.parametrize(
    "raw", [b"\x01\x00\x00", b"\x01\x00\x00\x00\x00\x04\x00\x01", b"\x01\x00\x00\x00\x54\x04\x00\x00"]
)
def test_read_header_rejects_short_or_unknown_headers(raw):
    with pytest.raises(CorruptMessageError):
        read_header(raw)


def test_payload_sizes_reject_bad_bits():
    with pytest.raises(KimadError, match="bits"):
        qsgd_payload_bytes(10, 3)
