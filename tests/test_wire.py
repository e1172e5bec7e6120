"""Specification of the wire sizes in kimad.compressors.wire (what the cost model prices)."""

import math

import pytest

from kimad import KimadError
from kimad.compressors.wire import HEADER_BYTES, IndexKind, MessageFormat, message_bytes, topk_index_kind


def test_dense_formats_have_no_header():
    assert message_bytes("dense32", 1000) == 4000
    assert message_bytes("dense16", 1000) == 2000
    assert message_bytes("dense32", 0) == 0


@pytest.mark.parametrize("n, k", [(0, 0), (1, 1), (1000, 0), (1000, 10), (1000, 31), (1000, 32), (1000, 1000),
                                  (10**7, 10**5)])
def test_topk_sends_bfloat16_values_plus_the_smallest_position_encoding(n, k):
    sizes = {IndexKind.INT32: 4 * k, IndexKind.BITMAP: math.ceil(n / 8),
             IndexKind.BLOCK16: 4 * math.ceil(n / 65536) + 2 * k}
    assert message_bytes("topk", n, k=k) == HEADER_BYTES + 2 * k + min(sizes.values())
    smallest = [kind for kind in IndexKind if sizes[kind] == min(sizes.values())]
    assert topk_index_kind(n, k) is smallest[0]  # ties: the lower kind


def test_a_low_density_position_costs_four_bytes():
    n, k = 1_000_000, 10_000  # 1%
    assert topk_index_kind(n, k) is IndexKind.BLOCK16
    assert message_bytes("topk", n, k=k) == HEADER_BYTES + 4 * k + 4 * 16


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_qsgd_has_one_norm_per_bucket_and_packed_codes(bits):
    assert message_bytes("qsgd", 1025, bits=bits, bucket=512) == HEADER_BYTES + 4 * 3 + math.ceil(1025 * bits / 8)


def test_sign_sends_one_bit_per_element_and_one_scale_per_bucket():
    assert message_bytes("sign", 1000, bucket=100) == HEADER_BYTES + 40 + 125


def test_collectives():
    assert MessageFormat.DENSE32.collective == "allreduce"
    assert MessageFormat.TOPK.collective == "allgather"


@pytest.mark.parametrize("kwargs, match", [
    (dict(fmt="zip", n=3), "unknown message format"),
    (dict(fmt="topk", n=3, k=4), "0 <= k <= n"),
    (dict(fmt="topk", n=3), "0 <= k <= n"),
    (dict(fmt="qsgd", n=3, bits=3), "bits must be one of"),
    (dict(fmt="sign", n=3, bucket=0), "bucket must be >= 1"),
    (dict(fmt="dense32", n=-1), "n >= 0"),
])
def test_bad_arguments_raise_named_errors(kwargs, match):
    with pytest.raises(KimadError, match=match):
        message_bytes(**kwargs)
