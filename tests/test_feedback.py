"""Error feedback (kimad.feedback): the corrected vector, the state updates and what the optimizer sees, per mode."""

import pytest
import torch

from kimad.errors import KimadError
from kimad.feedback import ErrorFeedback, FeedbackError


def topk_ref(v: torch.Tensor, k: int) -> torch.Tensor:
    """TopK_k(v) written plainly: keep the k largest |v| (ties to the lower index), zero the rest."""
    flat = v.reshape(-1)
    order = sorted(range(flat.numel()), key=lambda i: (-abs(float(flat[i])), i))[:k]
    out = torch.zeros_like(flat)
    out[order] = flat[order]
    return out.view_as(v)


def sent_ref(v: torch.Tensor, k: int) -> torch.Tensor:
    """What the wire carries of TopK_k(v): the kept values rounded to bfloat16."""
    return topk_ref(v, k).to(torch.bfloat16).to(torch.float32)


def grads(seed: int, shape=(4, 6)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_unknown_mode_is_a_named_error():
    with pytest.raises(FeedbackError, match="unknown error_feedback 'ef3'"):
        ErrorFeedback("ef3")
    assert issubclass(FeedbackError, KimadError)


def test_ef21_top_k_sends_g_minus_h_and_h_tracks_it():
    fb, h = ErrorFeedback("ef21"), torch.zeros(4, 6)
    for step in range(3):
        g = grads(step)
        msg = fb.encode_topk("w", g, 5)
        sent = sent_ref(g - h, 5)
        assert torch.equal(torch.zeros(24).index_put_((msg.indices.long(),), msg.values).view(4, 6), sent)
        h = h + sent
        assert torch.allclose(fb.local["w"], h)


def test_ef_top_k_sends_g_plus_e_and_keeps_the_residual():
    fb, e = ErrorFeedback("ef"), torch.zeros(4, 6)
    for step in range(3):
        g = grads(step)
        msg = fb.encode_topk("w", g, 5)
        v = g + e
        sent = sent_ref(v, 5)
        assert torch.equal(torch.zeros(24).index_put_((msg.indices.long(),), msg.values).view(4, 6), sent)
        e = v - sent
        assert torch.allclose(fb.local["w"], e)


def test_no_feedback_sends_top_k_of_g_and_keeps_no_state():
    fb = ErrorFeedback(None)
    for step in range(2):
        g = grads(step)
        msg = fb.encode_topk("w", g, 5)
        assert torch.equal(torch.zeros(24).index_put_((msg.indices.long(),), msg.values).view(4, 6), sent_ref(g, 5))
    assert fb.local == {} and fb.global_estimate == {}


@pytest.mark.parametrize("mode", ["ef21", "ef"])
def test_the_state_keeps_what_bfloat16_rounding_drops(mode):
    """Over many steps the sent messages plus the state account for every gradient exactly (up to float32
    rounding): EF21 h is the sum of what was sent; EF's residual plus all sent is the sum of the gradients."""
    fb = ErrorFeedback(mode)
    total_g, total_sent = torch.zeros(4, 6, dtype=torch.float64), torch.zeros(4, 6, dtype=torch.float64)
    for step in range(50):
        g = grads(step) * 3.3
        msg = fb.encode_topk("w", g, 3)
        sent = torch.zeros(24).index_put_((msg.indices.long(),), msg.values).view(4, 6)
        assert torch.equal(sent, sent.to(torch.bfloat16).to(torch.float32))  # exactly what the wire holds
        total_g += g.double()
        total_sent += sent.double()
    if mode == "ef21":
        assert torch.allclose(fb.local["w"].double(), total_sent, atol=1e-4)
    else:
        assert torch.allclose(fb.local["w"].double() + total_sent, total_g, atol=1e-4)


def test_the_error_counts_the_rounding():
    fb = ErrorFeedback(None)
    g = grads(0) * 3.3
    msg = fb.encode_topk("w", g, 24)  # everything sent: only the rounding is lost
    assert msg.sq_error == pytest.approx(float((g - g.bfloat16().float()).double().square().sum()), rel=1e-9)
    assert msg.sq_error > 0


@pytest.mark.parametrize("mode", ["ef21", "ef", None])
def test_correct_forms_v_per_mode(mode):
    fb = ErrorFeedback(mode)
    fb.encode_topk("w", grads(0), 3)  # gives the state something nonzero
    state = fb.local.get("w", torch.zeros(4, 6)).clone()
    g = grads(1)
    expected = {"ef21": g - state, "ef": g + state, None: g}[mode]
    assert torch.allclose(fb.correct("w", g), expected)


def test_sending_dense_makes_ef21_h_catch_up_and_clears_ef_residual():
    ef21, ef = ErrorFeedback("ef21"), ErrorFeedback("ef")
    for fb in (ef21, ef):
        fb.encode_topk("w", grads(0), 3)
        fb.sent_dense("w", fb.correct("w", grads(1)))
    assert torch.allclose(ef21.local["w"], grads(1))  # h + (g - h) = g
    assert torch.equal(ef.local["w"], torch.zeros(4, 6))


def test_ef21_optimizer_sees_the_running_sum_of_aggregates():
    fb = ErrorFeedback("ef21")
    c1, c2 = grads(0), grads(1)
    first = fb.estimate("w", c1.clone())
    second = fb.estimate("w", c2.clone())
    assert torch.allclose(first, c1) and torch.allclose(second, c1 + c2)
    second.zero_()  # the optimizer may modify what it was given; H must not change
    assert torch.allclose(fb.global_estimate["w"], c1 + c2)


@pytest.mark.parametrize("mode", ["ef", None])
def test_ef_and_none_pass_the_aggregate_through(mode):
    c = grads(0)
    assert ErrorFeedback(mode).estimate("w", c) is c


def test_float16_and_non_contiguous_gradients_use_float32_state():
    fb = ErrorFeedback("ef21")
    g = grads(0, (6, 4)).t()  # non-contiguous
    fb.encode_topk("w", g.half(), 4)
    assert fb.local["w"].dtype == torch.float32 and fb.local["w"].shape == (4, 6)
    assert torch.allclose(fb.local["w"], sent_ref(g.half().float(), 4))


def test_a_state_of_the_wrong_size_is_reported_with_the_name():
    fb = ErrorFeedback("ef21")
    fb.encode_topk("layer.weight", grads(0), 3)
    with pytest.raises(FeedbackError, match="layer.weight"):
        fb.correct("layer.weight", torch.zeros(5))


def test_state_dict_round_trip_restores_the_same_updates():
    fb = ErrorFeedback("ef21")
    fb.encode_topk("w", grads(0), 3)
    fb.estimate("w", grads(1))
    restored = ErrorFeedback("ef21")
    restored.load_state_dict(fb.state_dict())
    a, b = fb.encode_topk("w", grads(2), 4), restored.encode_topk("w", grads(2), 4)
    assert torch.equal(a.values, b.values) and torch.equal(a.indices, b.indices)
    assert torch.equal(fb.estimate("w", grads(3)), restored.estimate("w", grads(3)))


def test_state_dict_is_a_copy():
    fb = ErrorFeedback("ef")
    fb.encode_topk("w", grads(0), 3)
    state = fb.state_dict()
    fb.encode_topk("w", grads(1), 3)
    assert not torch.equal(state["local"]["w"], fb.local["w"])


def test_loading_another_modes_state_is_refused():
    with pytest.raises(FeedbackError, match="ef21"):
        ErrorFeedback("ef").load_state_dict(ErrorFeedback("ef21").state_dict())


def test_error_profile_matches_the_message_error_and_leaves_state_alone():
    fb = ErrorFeedback("ef21")
    fb.encode_topk("w", grads(0), 3)
    before = fb.local["w"].clone()
    errors, sq_norm = fb.error_profile("w", grads(1), [0, 24])
    assert torch.equal(fb.local["w"], before)
    v = grads(1) - before
    assert sq_norm == pytest.approx(float(v.pow(2).sum()), rel=1e-5)
    assert errors == pytest.approx([float(v.pow(2).sum()), 0.0], rel=1e-5)


@pytest.mark.parametrize("mode", ["ef21", "ef", None])
def test_an_encode_after_its_profile_equals_one_without(mode):
    # The encode reuses the profile's histogram (10,000 elements: the histogram path); the message and
    # the state must be exactly those of an encode that never saw a profile.
    profiled, plain = ErrorFeedback(mode), ErrorFeedback(mode)
    for step in range(3):
        g = grads(10 + step, (100, 100))
        profiled.error_profile("w", g, [100])
        got, want = profiled.encode_topk("w", g, 100), plain.encode_topk("w", g, 100)
        assert torch.equal(got.indices, want.indices) and torch.equal(got.values, want.values)
        if mode is not None:
            assert torch.equal(profiled.local["w"], plain.local["w"])


def test_a_profile_is_not_reused_after_the_state_changed():
    fb, plain = ErrorFeedback("ef21"), ErrorFeedback("ef21")
    g = grads(20, (100, 100))
    fb.error_profile("w", g, [100])
    v = fb.correct("w", g)
    fb.sent_dense("w", v)  # h += v: the profile no longer describes g - h
    plain.sent_dense("w", plain.correct("w", g))
    got, want = fb.encode_topk("w", g, 100), plain.encode_topk("w", g, 100)
    assert torch.equal(got.indices, want.indices) and torch.equal(got.values, want.values)


def ranks_messages(world: int, n: int, k: int, seed: int):
    """Each rank's top-k message (values, ascending int32 indices) for a tensor of n elements; positions overlap."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(k, generator=g), torch.randperm(n, generator=g)[:k].sort().values.to(torch.int32))
            for _ in range(world)]


def dense_aggregate(messages, n: int, scale: float) -> torch.Tensor:
    c = torch.zeros(n)
    for values, indices in messages:  # rank by rank, as the plugin sums them
        c.index_add_(0, indices.long(), scale * values)
    return c


@pytest.mark.parametrize("mode", ["ef21", "ef", None])
def test_estimate_topk_is_bitwise_estimate_of_the_dense_aggregate(mode):
    fast, plain = ErrorFeedback(mode), ErrorFeedback(mode)
    like = torch.zeros(4, 6)
    for step in range(3):
        messages = ranks_messages(3, 24, 10, step)
        got = fast.estimate_topk("w", messages, like, 1 / 3)
        expected = plain.estimate("w", dense_aggregate(messages, 24, 1 / 3).view(4, 6))
        assert got.shape == (4, 6) and got.dtype == torch.float32
        assert torch.equal(got, expected)


def test_estimate_topk_hands_out_a_copy_of_ef21_h():
    fb = ErrorFeedback("ef21")
    messages = ranks_messages(2, 24, 5, 0)
    got = fb.estimate_topk("w", messages, torch.zeros(24), 0.5)
    got.zero_()  # the optimizer may modify what it was given; H must not change
    assert torch.allclose(fb.global_estimate["w"], dense_aggregate(messages, 24, 0.5))


def test_estimate_topk_is_bitwise_reproducible_for_the_same_messages_in_the_same_order():
    a, b = ErrorFeedback("ef21"), ErrorFeedback("ef21")  # two ranks
    for step in range(3):
        messages = ranks_messages(4, 1000, 300, step)
        assert torch.equal(a.estimate_topk("w", messages, torch.zeros(1000), 0.25),
                           b.estimate_topk("w", messages, torch.zeros(1000), 0.25))


def test_estimate_topk_of_a_smaller_tensor_after_a_larger_one_starts_from_zero():
    fb, plain = ErrorFeedback("ef21"), ErrorFeedback("ef21")
    big, small = ranks_messages(2, 1000, 400, 0), ranks_messages(2, 24, 10, 1)
    fb.estimate_topk("big", big, torch.zeros(1000), 0.5)  # leaves nonzero sums behind if the buffer were not cleared
    assert torch.equal(fb.estimate_topk("small", small, torch.zeros(24), 0.5),
                       plain.estimate("small", dense_aggregate(small, 24, 0.5)))


def quant_payloads(world: int, n: int, bits: int, seed: int):
    from kimad import ops

    g = torch.Generator().manual_seed(seed)
    return [ops.qsgd_encode(torch.randn(n, generator=g), torch.zeros(n), bits=bits, seed=seed + r).payload
            for r in range(world)]


@pytest.mark.parametrize("mode", ["ef21", "ef", None])
def test_estimate_quantized_is_bitwise_estimate_of_the_decoded_sum(mode):
    from kimad import ops

    fast, plain = ErrorFeedback(mode), ErrorFeedback(mode)
    fast.estimate_topk("big", ranks_messages(2, 2000, 500, 9), torch.zeros(2000), 0.5)  # the buffer was used before
    for step in range(3):
        payloads = quant_payloads(3, 1000, 4, step)
        c = torch.zeros(1000)
        for payload in payloads:  # rank by rank, as the plugin sums them
            ops.quant_decode_accumulate(c, payload, fmt="qsgd", numel=1000, bits=4, scale=1 / 3)
        got = fast.estimate_quantized("w", payloads, torch.zeros(10, 100), 1 / 3, fmt="qsgd", bits=4, bucket=512)
        assert got.shape == (10, 100) and torch.equal(got, plain.estimate("w", c.view(10, 100)))


def test_a_corrupt_message_leaves_nothing_behind_for_the_next_decode():
    from kimad.errors import CorruptMessageError

    fb, fresh = ErrorFeedback("ef21"), ErrorFeedback("ef21")
    good, bad = quant_payloads(2, 1000, 8, 0)
    with pytest.raises(CorruptMessageError):
        fb.estimate_quantized("w", [good, bad[:-1]], torch.zeros(1000), 0.5, fmt="qsgd", bits=8, bucket=512)
    with pytest.raises(CorruptMessageError):
        fb.estimate_topk("w", [(torch.ones(2), torch.tensor([3, 1000], dtype=torch.int32))], torch.zeros(1000), 1.0)
    results = [(f.estimate_quantized("q", [good, good], torch.zeros(1000), 0.5, fmt="qsgd", bits=8, bucket=512),
                f.estimate_topk("s", [(torch.ones(2), torch.tensor([3, 7], dtype=torch.int32))], torch.zeros(1000),
                                1.0))
               for f in (fb, fresh)]
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    assert float(results[0][1].sum()) == 2.0 and float(results[0][0].abs().sum()) > 0


@pytest.mark.parametrize("mode", ["ef21", "ef"])
def test_quantized_messages_update_the_state_as_top_k_does(mode):
    from kimad import ops

    fb = ErrorFeedback(mode)
    fb.encode_topk("w", grads(0, (40, 30)), 50)  # a nonzero state
    g = grads(1, (40, 30))
    for fmt, bits in (("qsgd", 2), ("sign", None)):
        before = fb.local["w"].clone()
        v = g - before if mode == "ef21" else g + before
        msg = fb.encode_quantized("w", g, fmt, bits=bits, bucket=512, seed=7)
        sent = ops.quant_decode_accumulate(torch.zeros(1200), msg.payload, fmt=fmt, numel=1200, bits=bits).view(40, 30)
        expected = before + sent if mode == "ef21" else v - sent
        assert torch.allclose(fb.local["w"], expected, atol=1e-6)
        assert msg.sq_error == pytest.approx(float((v - sent).pow(2).sum()), rel=1e-4)


def test_quant_profile_reads_v_and_leaves_the_state_alone():
    fb = ErrorFeedback("ef21")
    fb.encode_topk("w", grads(0, (40, 30)), 50)
    before = fb.local["w"].clone()
    estimate = fb.quant_profile("w", grads(1, (40, 30)), 512)
    assert torch.equal(fb.local["w"], before)
    assert estimate.sq_norm == pytest.approx(float((grads(1, (40, 30)) - before).pow(2).sum()), rel=1e-5)
    assert set(estimate.qsgd) == {8, 4, 2} and estimate.qsgd[8] < estimate.qsgd[4] < estimate.qsgd[2]
