"""Specification of kimad.control.cost: the alpha-beta ring model, checked against hand computation."""

import math
from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kimad import KimadError
from kimad.compressors.wire import MessageFormat, message_bytes
from kimad.control import BandwidthEstimate
from kimad.control.cost import TCP_ETHERNET_FRAMING, CostModel, CostModelError, latency_terms, link_bytes


def test_allreduce_is_two_n_minus_one_latencies_plus_two_n_minus_one_over_n_of_the_bytes():
    cm = CostModel(bandwidth_bps=8e9, latency_s=1e-5, world_size=4)
    # 2*3 latencies + 2*3/4 * 1e6 bytes * 8 bits / 8e9 bits/s
    assert cm.allreduce(1_000_000) == pytest.approx(6 * 1e-5 + 1.5e6 * 8 / 8e9, rel=1e-12)


def test_allgather_is_n_minus_one_latencies_plus_n_minus_one_messages():
    cm = CostModel(bandwidth_bps=8e9, latency_s=1e-5, world_size=4)
    assert cm.allgather(1_000_000) == pytest.approx(3 * 1e-5 + 3e6 * 8 / 8e9, rel=1e-12)


def test_framing_charges_the_headers_at_the_wire_rate():
    # a 20 Mbit/s TCP/Ethernet link carries 1448 payload bytes per 1514-byte frame
    cm = CostModel(bandwidth_bps=20e6, latency_s=1e-3, world_size=4, framing=TCP_ETHERNET_FRAMING)
    assert TCP_ETHERNET_FRAMING == pytest.approx(1514 / 1448)
    assert cm.allgather(1448) == pytest.approx(3 * 1e-3 + 3 * 1514 * 8 / 20e6, rel=1e-12)
    payload = CostModel(bandwidth_bps=20e6 / TCP_ETHERNET_FRAMING, latency_s=1e-3, world_size=4)
    assert cm.allreduce(10**6) == pytest.approx(payload.allreduce(10**6), rel=1e-12)  # same link, two units
    assert cm.dense_break_even_density(10**5) == payload.dense_break_even_density(10**5)


def test_a_model_built_from_an_estimate_prices_with_the_estimate_s_framing():
    est = BandwidthEstimate(1e9, 1e-5, 0.01, 100.0, True, framing=1.25)
    assert CostModel.from_estimate(est, 4).framing == 1.25
    assert CostModel.from_estimate(SimpleNamespace(bandwidth_bps=1e9, latency_s=1e-5), 4).framing == 1.0


def test_link_bytes_and_latency_terms_are_the_ring_formulas():
    assert link_bytes("allreduce", 8, 800) == pytest.approx(2 * 7 / 8 * 800)
    assert link_bytes("allgather", 8, 800) == 7 * 800
    assert latency_terms("allreduce", 8) == 14
    assert latency_terms("allgather", 8) == 7


def test_a_single_rank_communicates_nothing():
    cm = CostModel(1e9, 1e-3, 1)
    assert cm.allreduce(10**9) == 0.0
    assert cm.allgather(10**9) == 0.0
    assert cm.option_time("topk", 10**6, k=10) == 0.0
    assert cm.option_link_bytes("dense32", 10**6) == 0.0
    assert cm.dense_break_even_density(10**6) == 1.0


def test_option_time_prices_dense_by_allreduce_and_the_rest_by_allgather_of_the_wire_size():
    cm = CostModel(1e9, 2e-5, 8)
    assert cm.option_time("dense32", 5000) == pytest.approx(cm.allreduce(4 * 5000))
    assert cm.option_time("topk", 5000, k=50) == pytest.approx(cm.allgather(message_bytes("topk", 5000, k=50)))
    assert cm.option_time("qsgd", 5000, bits=4) == pytest.approx(cm.allgather(message_bytes("qsgd", 5000, bits=4)))
    assert cm.option_bytes("sign", 5000) == message_bytes("sign", 5000)
    assert cm.option_link_bytes("topk", 5000, k=50) == 7 * message_bytes("topk", 5000, k=50)


@given(st.integers(2, 256), st.integers(1, 10**7))
def test_break_even_density_is_the_last_k_where_sparse_is_not_slower(n, numel):
    cm = CostModel(1e9, 0.0, n)
    d = cm.dense_break_even_density(numel)
    k = round(d * numel)
    dense = cm.option_time("dense32", numel)
    if d > 0:
        assert cm.option_time("topk", numel, k=k) <= dense
    if k < numel:
        assert cm.option_time("topk", numel, k=k + 1) > dense


def reference_break_even(numel, n, alpha, bandwidth_bps):
    """Largest k / numel with (n-1) alpha + (n-1) m(k) 8 / bw <= 2 (n-1) alpha + 2 (n-1)/n 4 numel 8 / bw.

    Found by trying every k, with m(k) = 8 + 2 k + min(4 k, ceil(numel / 8), 4 ceil(numel / 65536) + 2 k) bytes.
    """
    best = -1
    for k in range(numel + 1):
        m = 8 + 2 * k + min(4 * k, (numel + 7) // 8, 4 * ((numel + 65535) // 65536) + 2 * k)
        sparse = (n - 1) * alpha + (n - 1) * m * 8 / bandwidth_bps
        dense = 2 * (n - 1) * alpha + 2 * (n - 1) / n * 4 * numel * 8 / bandwidth_bps
        if sparse <= dense:
            best = k
    return max(best, 0) / numel


@pytest.mark.parametrize("n", [2, 3, 8, 16, 64])
@pytest.mark.parametrize("alpha", [0.0, 1e-5])
def test_break_even_density_matches_trying_every_k(n, alpha):
    assert CostModel(1e8, alpha, n).dense_break_even_density(5000) == reference_break_even(5000, n, alpha, 1e8)


def test_break_even_density_falls_like_one_over_world_size():
    numel = 10**6
    d = {n: CostModel(1e9, 0.0, n).dense_break_even_density(numel) for n in (2, 4, 8, 16, 32, 64, 128)}
    assert d[2] > d[4] > d[8] > d[16] > d[32] > d[64] > d[128]
    assert d[2] == 1.0  # 2 ranks: even every entry (bfloat16 + bitmap) costs less than the float32 allreduce
    for n in (32, 64, 128):  # block16 offsets: 4 k < 8 numel / n (less its 4 bytes a block)
        assert d[n] == pytest.approx(2 / n, rel=2e-3)
    for n in (4, 8, 16):  # bitmap: 2 k + numel / 8 < 8 numel / n
        assert d[n] == pytest.approx(4 / n - 1 / 16, rel=1e-3)


def test_break_even_counts_the_latencies_the_allgather_saves():
    numel = 10**6
    without = CostModel(1e9, 0.0, 64).dense_break_even_density(numel)
    with_latency = CostModel(1e9, 1e-4, 64).dense_break_even_density(numel)
    # 63 latencies fewer: alpha * bandwidth / 8 = 12,500 more bytes, 4 bytes per top-k entry (block16)
    assert with_latency == pytest.approx(without + 12_500 / 4 / numel, rel=1e-3)


@pytest.mark.parametrize("kwargs", [dict(bandwidth_bps=0.0), dict(bandwidth_bps=math.nan), dict(latency_s=-1e-6),
                                    dict(world_size=0), dict(world_size=2.0), dict(framing=0.9),
                                    dict(framing=math.inf), dict(framing=math.nan), dict(framing=True)])
def test_impossible_models_raise_a_named_error(kwargs):
    args = dict(bandwidth_bps=1e9, latency_s=1e-5, world_size=2) | kwargs
    with pytest.raises(CostModelError):
        CostModel(**args)


def test_unknown_collective_and_negative_bytes_raise():
    cm = CostModel(1e9, 1e-5, 2)
    with pytest.raises(CostModelError):
        cm.collective_time("broadcast", 10)
    with pytest.raises(CostModelError):
        cm.allreduce(-1)
    assert issubclass(CostModelError, KimadError)


def test_dense_buffers_ride_in_the_allgather_when_that_costs_less_than_an_allreduce():
    # 2 ranks: the same link bytes either way and no extra latency, so always.
    assert CostModel(1e9, 1e-3, 2).dense_rides(10**9)
    # 4 ranks, 1 ms, 1 Gbit/s: up to 2 * latency * bandwidth * n / (n - 2) = 4e6 bits = 500 kB.
    cost = CostModel(1e9, 1e-3, 4)
    assert cost.dense_rides(100_000) and cost.dense_rides(499_000)
    assert not cost.dense_rides(501_000) and not cost.dense_rides(10**7)


def test_a_batched_step_gives_bytes_the_budget_less_its_issued_latencies_but_at_least_min_byte_share():
    cost = CostModel(1e9, 1e-3, 4)  # allgather 3 latencies (3 ms), allreduce 6 (6 ms)
    compressible, numels = [True, True, False], [10**6, 10**6, 100]  # 400 bytes of biases ride along
    assert cost.batched_byte_budget(compressible, numels, budget_s=0.1, min_byte_share=0.5) == \
        pytest.approx((0.1 - 3e-3, 3e-3))
    # Latency eats the budget: strict leaves nothing for bytes, the default keeps half the budget.
    assert cost.batched_byte_budget(compressible, numels, budget_s=2e-3, min_byte_share=0.0) == pytest.approx((0, 3e-3))
    assert cost.batched_byte_budget(compressible, numels, budget_s=2e-3, min_byte_share=0.5) == \
        pytest.approx((1e-3, 3e-3))
    # Too many always-dense bytes to ride: the allreduce's latencies are issued too.
    assert cost.batched_byte_budget([True, False], [10**6, 10**7], budget_s=0.1, min_byte_share=0.5) == \
        pytest.approx((0.1 - 9e-3, 9e-3))
    # One rank: nothing crosses a link.
    assert CostModel(1e9, 1e-3, 1).batched_byte_budget([True], [10], budget_s=0.1, min_byte_share=0.5) == (0.1, 0.0)


def test_a_batched_model_prices_options_by_their_bytes_only():
    plain, batched = CostModel(1e9, 1e-3, 2), CostModel(1e9, 1e-3, 2, batched=True)
    for fmt, k in ((MessageFormat.DENSE32, None), (MessageFormat.TOPK, 1000)):
        bits = 8 * link_bytes(fmt.collective, 2, message_bytes(fmt, 10**5, k=k))
        assert batched.option_time(fmt, 10**5, k=k) == pytest.approx(bits / 1e9)
        assert plain.option_time(fmt, 10**5, k=k) == pytest.approx(bits / 1e9 + latency_terms(fmt.collective, 2) * 1e-3)
    # Top-k of every element (bfloat16 values + bitmap) puts more on each link than the dense allreduce at 4
    # ranks (3 x 2.125 n against 1.5 x 4 n bytes): unbatched, its allgather's fewer latencies made it look
    # cheaper; batched (one collective for all), it is not.
    plain, batched = CostModel(1e9, 1e-3, 4), CostModel(1e9, 1e-3, 4, batched=True)
    n = 10**5
    assert link_bytes("allgather", 4, message_bytes(MessageFormat.TOPK, n, k=n)) > link_bytes("allreduce", 4, 4 * n)
    assert plain.option_time(MessageFormat.TOPK, n, k=n) < plain.option_time(MessageFormat.DENSE32, n)
    assert batched.option_time(MessageFormat.TOPK, n, k=n) > batched.option_time(MessageFormat.DENSE32, n)


def test_the_batched_byte_budget_refuses_mismatched_inputs_and_shares_outside_zero_to_one():
    cost = CostModel(1e9, 1e-3, 4)
    with pytest.raises(CostModelError, match="2 compressible flags for 1 tensors"):
        cost.batched_byte_budget([True, False], [10], budget_s=0.1, min_byte_share=0.5)
    with pytest.raises(CostModelError, match="min_byte_share"):
        cost.batched_byte_budget([True], [10], budget_s=0.1, min_byte_share=1.5)


@pytest.mark.parametrize("world_size", [1, 2, 5])
@pytest.mark.parametrize("batched", [False, True])
def test_message_time_is_option_time_of_the_message_size(world_size, batched):
    cm = CostModel(bandwidth_bps=3e7, latency_s=2e-3, world_size=world_size, batched=batched,
                   framing=TCP_ETHERNET_FRAMING)
    for fmt, kw in (("dense32", {}), ("dense16", {}), ("topk", {"k": 70}), ("qsgd", {"bits": 2}), ("sign", {})):
        nbytes = message_bytes(fmt, 9000, **kw)
        assert cm.message_time(fmt, nbytes) == pytest.approx(cm.option_time(fmt, 9000, **kw), rel=1e-12, abs=1e-15)
        assert cm.message_time(MessageFormat(fmt), nbytes) == cm.message_time(fmt, nbytes)
    for bad in (-1, math.nan, math.inf):
        with pytest.raises(CostModelError, match="finite number >= 0 of bytes"):
            cm.message_time("topk", bad)
