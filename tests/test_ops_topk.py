"""Specification of kimad.ops.topk_encode and kimad.ops.error_profile against plain torch references."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kimad.errors import KimadError, NonFiniteGradientError, StaleProfileError
from kimad.ops import error_profile, topk_encode, topk_profile


def form_v(grad: torch.Tensor, state: torch.Tensor, mode: str) -> torch.Tensor:
    g = grad.detach().cpu().to(torch.float32).reshape(-1)
    s = state.detach().cpu().reshape(-1)
    return g + s if mode == "ef" else g - s


def reference(grad, state, k, mode):
    """(values, indices, new state, sq_error): stable sort by (-|v|, index), take k, sort by index."""
    v = form_v(grad, state, mode)
    order = torch.argsort(-v.abs(), stable=True)
    idx = order[:k].sort().values
    vals = v[idx]
    new = state.detach().cpu().reshape(-1).clone()
    if mode == "ef":
        new = v.clone()
        new[idx] = 0.0
    else:
        new[idx] += vals
    rest = v.clone().double()
    rest[idx] = 0.0
    return vals, idx.to(torch.int32), new, float((rest * rest).sum())


def assert_encoded_like_reference(grad, state, k, mode):
    vals, idx, new_state, sq_error = reference(grad, state, k, mode)
    msg = topk_encode(grad, state, k, mode=mode)
    assert torch.equal(msg.indices.cpu(), idx)
    assert torch.equal(msg.values.cpu(), vals)
    assert torch.equal(state.cpu().reshape(-1), new_state)
    assert msg.sq_error == pytest.approx(sq_error, rel=1e-9, abs=1e-12)
    assert msg.values.dtype == torch.float32 and msg.indices.dtype == torch.int32


@st.composite
def cases(draw):
    n = draw(st.one_of(st.sampled_from([0, 1, 2, 3, 7, 101]), st.integers(0, 5000)))
    k = draw(st.one_of(st.sampled_from([0, 1, n]), st.integers(0, n)))
    k = min(k, n)
    kind = draw(st.sampled_from(["normal", "ties", "zeros"]))
    seed = draw(st.integers(0, 2**31 - 1))
    mode = draw(st.sampled_from(["ef", "ef21"]))
    return n, k, kind, seed, mode


def make(n: int, kind: str, gen: torch.Generator) -> torch.Tensor:
    if kind == "zeros":
        return torch.zeros(n)
    if kind == "ties":  # values from a tiny set: most of |v| ties
        return torch.randint(-2, 3, (n,), generator=gen).to(torch.float32) * 0.5
    return torch.randn(n, generator=gen)


@settings(max_examples=150, deadline=None)
@given(cases())
def test_matches_stable_sort_reference_bit_for_bit(case):
    n, k, kind, seed, mode = case
    gen = torch.Generator().manual_seed(seed)
    grad, state = make(n, kind, gen), make(n, kind, gen)
    assert_encoded_like_reference(grad, state, k, mode)


@pytest.mark.parametrize("mode", ["ef", "ef21"])
def test_state_after_several_steps_equals_reference(device, mode):
    gen = torch.Generator().manual_seed(1)
    n = 300_000  # above the parallel grain: threaded path
    state = torch.zeros(n, device=device)
    ref_state = torch.zeros(n)
    for step, k in enumerate([n // 100, n // 1000, n // 3, 0, n]):
        grad = make(n, "ties" if step == 1 else "normal", gen)
        vals, idx, ref_state_new, _ = reference(grad, ref_state, k, mode)
        msg = topk_encode(grad.to(device), state, k, mode=mode)
        assert torch.equal(msg.indices.cpu(), idx) and torch.equal(msg.values.cpu(), vals)
        ref_state = ref_state_new
        assert torch.equal(state.cpu(), ref_state), f"state differs after step {step}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_grads_are_converted_to_float32(dtype):
    grad = torch.randn(1000, generator=torch.Generator().manual_seed(2)).to(dtype)
    state = torch.randn(1000, generator=torch.Generator().manual_seed(3))
    assert_encoded_like_reference(grad, state, 37, "ef21")


def every_finite(dtype: torch.dtype) -> torch.Tensor:
    """Every finite value of a 16-bit float dtype (both zeros, subnormals, the extremes), once each."""
    patterns = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    return patterns[torch.isfinite(patterns)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_every_half_precision_value_is_read_exactly(device, dtype):
    grad = every_finite(dtype)
    state = torch.zeros(grad.numel(), device=device)
    msg = topk_encode(grad.to(device), state, grad.numel(), mode="ef21")  # sends v = grad - 0 = grad, in index order
    assert torch.equal(msg.values.cpu().view(torch.int32), grad.to(torch.float32).view(torch.int32))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["ef", "ef21"])
def test_half_precision_grads_on_the_threaded_path_equal_a_float32_copy(device, dtype, mode):
    gen = torch.Generator().manual_seed(7)
    n = 300_000
    grad = torch.randn(n, generator=gen)
    grad[::3] *= 1e-6  # float16 subnormals too
    grad = grad.to(dtype)
    start = 0.1 * torch.randn(n, generator=gen)
    state, ref_state = start.clone().to(device), start.clone()
    vals, idx, ref_state, sq_error = reference(grad, ref_state, n // 100, mode)
    errors, sq_norm = error_profile(grad.to(device), state, [0, n // 1000, n // 100, n], mode=mode)
    ref_errors, ref_norm = error_profile(grad.to(torch.float32).to(device), state, [0, n // 1000, n // 100, n],
                                         mode=mode)
    assert errors == ref_errors and sq_norm == ref_norm
    msg = topk_encode(grad.to(device), state, n // 100, mode=mode)
    assert torch.equal(msg.indices.cpu(), idx) and torch.equal(msg.values.cpu(), vals)
    assert torch.equal(state.cpu(), ref_state)
    assert msg.sq_error == pytest.approx(sq_error, rel=1e-9)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inf_is_a_non_finite_gradient(dtype):
    grad = torch.zeros(100_000, dtype=dtype)
    grad[99_999] = float("inf")
    state = torch.zeros(100_000)
    with pytest.raises(NonFiniteGradientError, match="1 non-finite"):
        topk_encode(grad, state, 10, name="emb")
    assert torch.equal(state, torch.zeros(100_000))


def test_non_contiguous_and_multidimensional_grads_are_addressed_flat():
    base = torch.randn(40, 30, generator=torch.Generator().manual_seed(4))
    grad = base.t()  # non-contiguous view: flat order is that of grad.contiguous()
    state = torch.zeros(30, 40)
    assert_encoded_like_reference(grad, state, 50, "ef")


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("mode", ["ef", "ef21"])
def test_non_finite_gradient_raises_and_leaves_state_unchanged(device, bad, mode):
    grad = torch.randn(200_000, generator=torch.Generator().manual_seed(5))
    grad[123_457] = bad
    state = torch.full((200_000,), 0.5, device=device)
    with pytest.raises(NonFiniteGradientError, match=r"'layer4.conv' .* 1 non-finite"):
        topk_encode(grad.to(device), state, 10, mode=mode, name="layer4.conv")
    assert torch.equal(state.cpu(), torch.full((200_000,), 0.5))
    with pytest.raises(NonFiniteGradientError, match="'layer4.conv'"):
        error_profile(grad.to(device), state, [1], mode=mode, name="layer4.conv")


def test_message_reports_norm_and_error():
    msg = topk_encode(torch.tensor([3.0, -4.0, 1.0]), torch.zeros(3), 1, mode="ef")
    assert msg.sq_norm == 26.0 and msg.sq_error == 10.0
    assert msg.indices.tolist() == [1] and msg.values.tolist() == [-4.0]


# The documented bound: the profile never underestimates and is above the exact error by less than a
# factor 1 + 2^-6 + 2^-14, plus < 2^-252 per entry below 2^-126 (covered by the absolute slack).
UPPER = 1 + 2**-6 + 2**-14


@settings(max_examples=40, deadline=None)
@given(cases(), st.lists(st.floats(0, 1), min_size=1, max_size=16), st.booleans())
def test_error_profile_is_within_the_documented_bound(case, fractions, large):
    n, _, kind, seed, mode = case
    n = n + 4096 if large else n  # sorted path below 4096 elements, histogram path above
    gen = torch.Generator().manual_seed(seed)
    grad, state = make(n, kind, gen), make(n, kind, gen)
    ks = [round(f * n) for f in fractions] + [0, n]
    before = state.clone()
    errors, sq_norm = error_profile(grad, state, ks, mode=mode)
    assert torch.equal(state, before)
    v = form_v(grad, state, mode)
    assert sq_norm == pytest.approx(float((v.double() ** 2).sum()), rel=1e-12, abs=1e-30)
    for k, err in zip(ks, errors):
        exact = reference(grad, state, k, mode)[3]
        if k == 0:
            assert err == sq_norm
        elif k == n:
            assert err == 0.0
        else:
            assert exact * (1 - 1e-12) - 1e-30 <= err <= exact * UPPER * (1 + 1e-12) + 1e-30, f"k={k}"
            assert err <= sq_norm


def test_error_profile_of_a_small_tensor_is_exact():
    gen = torch.Generator().manual_seed(3)
    grad, state = torch.randn(3000, generator=gen), torch.randn(3000, generator=gen)
    ks = [1, 17, 300, 2999]
    errors, _ = error_profile(grad, state, ks, mode="ef")
    for k, err in zip(ks, errors):
        assert err == pytest.approx(reference(grad, state, k, "ef")[3], rel=1e-12)


def test_an_encode_reusing_its_profile_equals_a_plain_encode():
    gen = torch.Generator().manual_seed(4)
    grad = torch.randn(300_000, generator=gen)
    start = 0.1 * torch.randn(300_000, generator=gen)
    for mode in ("ef", "ef21"):
        state, plain_state = start.clone(), start.clone()
        profile = topk_profile(grad, state, [3000], mode=mode)
        assert profile.nbytes > 0
        msg = topk_encode(grad, state, 3000, mode=mode, profile=profile)
        plain = topk_encode(grad, plain_state, 3000, mode=mode)
        assert torch.equal(msg.indices, plain.indices) and torch.equal(msg.values, plain.values)
        assert torch.equal(state, plain_state) and msg.sq_error == plain.sq_error
        assert profile.errors[0] >= msg.sq_error and profile.nbytes == 0


def test_a_stale_profile_is_refused():
    gen = torch.Generator().manual_seed(5)
    grad, state = torch.randn(10_000, generator=gen), torch.zeros(10_000)
    profile = topk_profile(grad, state, [100], name="fc.weight")
    grad.mul_(2.0)  # changed in place since
    with pytest.raises(StaleProfileError, match=r"'fc.weight'.*gradient was modified in place"):
        topk_encode(grad, state, 100, profile=profile, name="fc.weight")
    profile = topk_profile(grad, state, [100])
    with pytest.raises(StaleProfileError, match="another gradient tensor"):
        topk_encode(grad.clone(), state, 100, profile=profile)
    with pytest.raises(StaleProfileError, match="for mode 'ef21', not 'ef'"):
        topk_encode(grad, state, 100, profile=profile, mode="ef")
    topk_encode(grad, state, 100, profile=profile)
    with pytest.raises(StaleProfileError, match="already used"):
        topk_encode(grad, state, 100, profile=profile)
    first = topk_profile(grad, state, [100])
    second = topk_profile(grad, state, [100], buffer=first.buffer)  # refills first's histogram
    assert first.nbytes == 0 and second.nbytes > 0
    with pytest.raises(StaleProfileError, match="refilled by a later topk_profile"):
        topk_encode(grad, state, 100, profile=first)
    topk_encode(grad, state, 100, profile=second)


def test_error_profile_is_exact_at_bin_boundaries():
    # Four distinct magnitudes far apart: every k falls on a bin boundary.
    grad = torch.tensor([1.0, -8.0, 64.0, 0.5, 8.0])
    errors, sq_norm = error_profile(grad, torch.zeros(5), [0, 1, 2, 3, 4, 5], mode="ef")
    assert sq_norm == 1 + 64 + 4096 + 0.25 + 64
    assert errors == [sq_norm, sq_norm - 4096, 1 + 64 + 0.25, 1 + 0.25, 0.25, 0.0]


@pytest.mark.parametrize(
    "grad, state, k, mode, match",
    [
        (torch.zeros(4), torch.zeros(4, dtype=torch.float64), 1, "ef21", "contiguous float32"),
        (torch.zeros(4), torch.zeros(4, 2).t(), 1, "ef21", "contiguous float32"),
        (torch.zeros(4), torch.zeros(5), 1, "ef21", "4 elements but the state has 5"),
        (torch.zeros(4, dtype=torch.int32), torch.zeros(4), 1, "ef21", "floating point"),
        (torch.zeros(4), torch.zeros(4), 5, "ef21", r"k=5 must be an int in \[0, 4\]"),
        (torch.zeros(4), torch.zeros(4), -1, "ef21", r"k=-1"),
        (torch.zeros(4), torch.zeros(4), 1, "ef22", "mode must be 'ef21' or 'ef'"),
    ],
)
def test_bad_arguments_raise_named_errors(grad, state, k, mode, match):
    with pytest.raises(KimadError, match=match):
        topk_encode(grad, state, k, mode=mode, name="fc.bias")


def test_error_profile_rejects_k_out_of_range():
    with pytest.raises(KimadError, match=r"error_profile for 'fc.bias': k=9"):
        error_profile(torch.zeros(4), torch.zeros(4), [1, 9], name="fc.bias")
