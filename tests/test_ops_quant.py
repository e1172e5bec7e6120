"""Specification of kimad.ops qsgd_encode, sign_encode, quant_decode_accumulate and
quant_error_estimate against plain torch references (layout: kimad.compressors.quant)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kimad.errors import CorruptMessageError, KimadError, NonFiniteGradientError
from kimad.ops import (
    qsgd_encode,
    quant_decode_accumulate,
    quant_error_estimate,
    sign_encode,
    uniform_draws,
)

FLT_MAX = torch.finfo(torch.float32).max


def form_v(grad: torch.Tensor, state: torch.Tensor, mode: str) -> torch.Tensor:
    g = grad.detach().cpu().to(torch.float32).reshape(-1)
    s = state.detach().cpu().reshape(-1)
    return g + s if mode == "ef" else g - s


def per_element(stat: torch.Tensor, n: int, bucket: int) -> torch.Tensor:
    return stat.repeat_interleave(bucket)[:n]


def bucket_sums(x: torch.Tensor, bucket: int) -> torch.Tensor:
    n = x.numel()
    buckets = -(-n // bucket)
    padded = torch.zeros(buckets * bucket, dtype=x.dtype)
    padded[:n] = x
    return padded.view(buckets, bucket).sum(1)


def pack(codes: torch.Tensor, bits: int) -> bytes:
    per = 8 // bits
    c = torch.zeros(-(-codes.numel() // per) * per, dtype=torch.int64)
    c[: codes.numel()] = codes
    shifts = torch.arange(per) * bits
    return bytes((c.view(-1, per) << shifts).sum(1).to(torch.uint8).tolist())


def header(n: int, tag: int, bits: int, bucket: int) -> bytes:
    """numel, tag, bits and the bucket field (0 when one bucket spans the tensor)."""
    return n.to_bytes(4, "little") + bytes([tag, bits]) + (0 if bucket >= n else bucket).to_bytes(2, "little")


def reference_qsgd(v: torch.Tensor, bits: int, bucket: int, seed: int):
    """(payload bytes, decoded q) as the layout documents, in plain torch."""
    n, s = v.numel(), 2 ** (bits - 1) - 1
    norms = bucket_sums(v.double() ** 2, bucket).sqrt().float()
    inv = torch.where(norms > 0, torch.tensor(float(s)) / norms, torch.zeros(())).clamp(max=FLT_MAX)
    x = (v.abs() * per_element(inv, n, bucket)).clamp(max=float(s))  # float32, as documented
    fl = torch.floor(x)
    level = (fl + (uniform_draws(seed, n) < x - fl).float()).to(torch.int64)
    negative = v < 0
    magnitude = level.float() * per_element(norms / torch.tensor(float(s)), n, bucket)
    q = torch.where(negative, -magnitude, magnitude)
    codes = level | (negative.to(torch.int64) << (bits - 1))
    payload = header(n, 0x51, bits, bucket) + norms.numpy().tobytes() + pack(codes, bits)
    return payload, q


def reference_sign(v: torch.Tensor, bucket: int):
    n = v.numel()
    counts = bucket_sums(torch.ones(n, dtype=torch.float64), bucket)
    scales = (bucket_sums(v.double().abs(), bucket) / counts).float()
    negative = v < 0
    se = per_element(scales, n, bucket)
    q = torch.where(negative, -se, se)
    payload = header(n, 0x53, 1, bucket) + scales.numpy().tobytes() + pack(negative.to(torch.int64), 1)
    return payload, q


def updated_state(state: torch.Tensor, v: torch.Tensor, q: torch.Tensor, mode: str) -> torch.Tensor:
    return v - q if mode == "ef" else state.detach().cpu().reshape(-1) + q


def make(n: int, kind: str, gen: torch.Generator, bucket: int) -> torch.Tensor:
    if kind == "zeros":
        return torch.zeros(n)
    x = torch.randn(n, generator=gen)
    if kind == "zero_buckets":  # every other bucket all zero
        x.view(-1)[(torch.arange(n) // bucket) % 2 == 0] = 0.0
    return x


@st.composite
def cases(draw):
    bucket = draw(st.sampled_from([1, 3, 7, 8, 64, 512]))
    n = draw(st.one_of(st.sampled_from([0, 1, 2, 7, bucket - 1, bucket, bucket + 1, 2 * bucket, 3 * bucket + 5]),
                       st.integers(0, 3000)))
    n = max(n, 0)
    kind = draw(st.sampled_from(["normal", "zeros", "zero_buckets"]))
    return n, bucket, kind, draw(st.integers(0, 2**31 - 1)), draw(st.sampled_from(["ef", "ef21"]))


def test_uniform_draws_follow_the_documented_hash():
    def lowbias32(x):
        x ^= x >> 16
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)

    def splitmix64(z):
        m = 2**64 - 1
        z = (z + 0x9E3779B97F4A7C15) & m
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
        return z ^ (z >> 31)

    for seed in (0, 1, 12345, 2**64 - 1):
        z = splitmix64(seed)
        k1, k2 = z & 0xFFFFFFFF, z >> 32
        expected = [(lowbias32(lowbias32(i ^ k1) ^ k2) >> 8) / 2**24 for i in range(100)]
        assert uniform_draws(seed, 100).tolist() == expected


def test_uniform_draws_are_uniform_and_differ_between_seeds():
    u = uniform_draws(7, 200_000).double()
    assert 0.0 <= float(u.min()) and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 5 * math.sqrt(1 / 12 / u.numel())
    counts = torch.histc(u, bins=10, min=0, max=1)
    assert float(((counts - 20_000) ** 2 / 20_000).sum()) < 40  # chi-square, 9 dof
    assert not torch.equal(uniform_draws(7, 1000), uniform_draws(8, 1000))


@settings(max_examples=120, deadline=None)
@given(cases(), st.sampled_from([8, 4, 2]))
def test_qsgd_matches_reference_byte_for_byte(case, bits):
    n, bucket, kind, seed, mode = case
    gen = torch.Generator().manual_seed(seed)
    grad, state = make(n, kind, gen, bucket), 0.1 * make(n, kind, gen, bucket)
    v = form_v(grad, state, mode)
    payload, q = reference_qsgd(v, bits, bucket, seed)
    new_state = updated_state(state, v, q, mode)
    msg = qsgd_encode(grad, state, bits=bits, bucket=bucket, seed=seed, mode=mode)
    assert bytes(msg.payload.tolist()) == payload
    assert torch.equal(state, new_state)
    assert not torch.isnan(state).any()
    assert msg.sq_norm == pytest.approx(float((v.double() ** 2).sum()), rel=1e-12, abs=1e-30)
    assert msg.sq_error == pytest.approx(float(((v - q).double() ** 2).sum()), rel=1e-12, abs=1e-30)


@settings(max_examples=100, deadline=None)
@given(cases())
def test_sign_matches_reference_byte_for_byte(case):
    n, bucket, kind, seed, mode = case
    gen = torch.Generator().manual_seed(seed)
    grad, state = make(n, kind, gen, bucket), 0.1 * make(n, kind, gen, bucket)
    v = form_v(grad, state, mode)
    payload, q = reference_sign(v, bucket)
    new_state = updated_state(state, v, q, mode)
    msg = sign_encode(grad, state, bucket=bucket, mode=mode)
    assert bytes(msg.payload.tolist()) == payload
    assert torch.equal(state, new_state)
    assert msg.sq_error == pytest.approx(float(((v - q).double() ** 2).sum()), rel=1e-12, abs=1e-30)


@pytest.mark.parametrize("fmt, bits", [("qsgd", 8), ("qsgd", 4), ("qsgd", 2), ("sign", None)])
def test_decode_accumulates_what_ef21_added_to_the_state(device, fmt, bits):
    n, bucket = 300_001, 500  # threaded path, a short last bucket
    grad = torch.randn(n, generator=torch.Generator().manual_seed(3)).to(device)
    h = torch.zeros(n, device=device)
    if fmt == "qsgd":
        msg = qsgd_encode(grad, h, bits=bits, bucket=bucket, seed=99, mode="ef21")
    else:
        msg = sign_encode(grad, h, bucket=bucket, mode="ef21")
    out = torch.full((n,), 2.0, device=device)
    quant_decode_accumulate(out, msg.payload, fmt=fmt, numel=n, bits=bits, bucket=bucket, scale=0.25)
    torch.testing.assert_close(out.cpu(), 2.0 + 0.25 * h.cpu(), rtol=1e-6, atol=1e-6)
    exact = torch.zeros(n, device=device)
    quant_decode_accumulate(exact, msg.payload, fmt=fmt, numel=n, bits=bits, bucket=bucket)
    assert torch.equal(exact.cpu(), h.cpu())  # the receivers' estimate is bitwise the sender's


@pytest.mark.parametrize("mode", ["ef", "ef21"])
def test_state_after_several_steps_equals_reference(device, mode):
    gen = torch.Generator().manual_seed(1)
    n, bucket = 200_003, 512
    state = torch.zeros(n, device=device)
    ref_state = torch.zeros(n)
    for step, bits in enumerate([4, 8, 2, None, 4]):
        grad = torch.randn(n, generator=gen)
        v = form_v(grad, ref_state, mode)
        if bits is None:
            payload, q = reference_sign(v, bucket)
            msg = sign_encode(grad.to(device), state, bucket=bucket, mode=mode)
        else:
            payload, q = reference_qsgd(v, bits, bucket, seed=step)
            msg = qsgd_encode(grad.to(device), state, bits=bits, bucket=bucket, seed=step, mode=mode)
        ref_state = updated_state(ref_state, v, q, mode)
        assert bytes(msg.payload.cpu().tolist()) == payload, f"payload differs at step {step}"
        assert torch.equal(state.cpu(), ref_state), f"state differs after step {step}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_grads_are_converted_to_float32(dtype):
    grad = torch.randn(1000, generator=torch.Generator().manual_seed(2)).to(dtype)
    state = torch.randn(1000, generator=torch.Generator().manual_seed(3))
    payload, _ = reference_qsgd(form_v(grad, state, "ef21"), 4, 100, 5)
    assert bytes(qsgd_encode(grad, state, bits=4, bucket=100, seed=5).payload.tolist()) == payload


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [8, 4, 2, 1])
@pytest.mark.parametrize("mode", ["ef", "ef21"])
def test_half_precision_grads_on_the_threaded_path_equal_the_reference(device, dtype, bits, mode):
    gen = torch.Generator().manual_seed(11)
    n, bucket = 200_003, 512  # above the parallel grain, a partial last bucket
    grad = torch.randn(n, generator=gen)
    grad[::5] *= 1e-6  # float16 subnormals too
    grad = grad.to(dtype)
    start = 0.1 * torch.randn(n, generator=gen)
    state = start.clone().to(device)
    v = form_v(grad, start, mode)
    if bits == 1:
        payload, q = reference_sign(v, bucket)
        msg = sign_encode(grad.to(device), state, bucket=bucket, mode=mode)
    else:
        payload, q = reference_qsgd(v, bits, bucket, seed=9)
        msg = qsgd_encode(grad.to(device), state, bits=bits, bucket=bucket, seed=9, mode=mode)
    assert bytes(msg.payload.cpu().tolist()) == payload
    assert torch.equal(state.cpu(), updated_state(start, v, q, mode))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_error_estimate_equals_that_of_a_float32_copy(device, dtype):
    gen = torch.Generator().manual_seed(12)
    grad = torch.randn(150_000, generator=gen).to(dtype)
    state = (0.1 * torch.randn(150_000, generator=gen)).to(device)
    half = quant_error_estimate(grad.to(device), state, bucket=300, mode="ef")
    full = quant_error_estimate(grad.to(torch.float32).to(device), state, bucket=300, mode="ef")
    assert half == full


def test_non_contiguous_and_multidimensional_grads_are_addressed_flat():
    grad = torch.randn(40, 30, generator=torch.Generator().manual_seed(4)).t()
    state = torch.zeros(30, 40)
    payload, _ = reference_sign(form_v(grad, state, "ef"), 64)
    assert bytes(sign_encode(grad, state, bucket=64, mode="ef").payload.tolist()) == payload


def test_all_zero_bucket_sends_zero_norm_and_zero_levels():
    grad = torch.cat([torch.zeros(4), torch.tensor([3.0, -4.0, 0.0, 0.0])])
    state = torch.zeros(8)
    msg = qsgd_encode(grad, state, bits=8, bucket=4, seed=0, mode="ef")
    raw = bytes(msg.payload.tolist())
    assert raw[8:12] == b"\0\0\0\0" and raw[16:20] == b"\0\0\0\0"  # norm 0, codes 0 of bucket 0
    assert torch.isfinite(state).all() and torch.equal(state[:4], torch.zeros(4))


def test_qsgd_is_unbiased_over_seeds():
    v = torch.randn(256, generator=torch.Generator().manual_seed(5))
    bucket, bits, trials = 64, 2, 600
    total = torch.zeros(256, dtype=torch.float64)
    for seed in range(trials):
        msg = qsgd_encode(v, torch.zeros(256), bits=bits, bucket=bucket, seed=seed, mode="ef")
        out = torch.zeros(256)
        quant_decode_accumulate(out, msg.payload, fmt="qsgd", numel=256, bits=bits, bucket=bucket)
        total += out.double()
    mean = total / trials
    norms = per_element(bucket_sums(v.double() ** 2, bucket).sqrt(), 256, bucket)
    # per element the decoded value has variance <= (N / s)^2 / 4 (s = 1 for 2 bits)
    bound = 5 * (norms / 2) / math.sqrt(trials)
    assert bool(((mean - v.double()).abs() <= bound + 1e-6).all())


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_variance_is_within_the_qsgd_bound_and_matches_the_estimate(bits):
    n, bucket, trials = 4096, 512, 300
    s = 2 ** (bits - 1) - 1
    v = torch.randn(n, generator=torch.Generator().manual_seed(6)) ** 3  # heavy-tailed
    sq_bucket = bucket_sums(v.double() ** 2, bucket)
    bound = float((min(bucket / s**2, math.sqrt(bucket) / s) * sq_bucket).sum())
    estimate = quant_error_estimate(v, torch.zeros(n), bucket=bucket, mode="ef").qsgd[bits]
    assert estimate <= bound
    errors = [qsgd_encode(v, torch.zeros(n), bits=bits, bucket=bucket, seed=t, mode="ef").sq_error
              for t in range(trials)]
    mean = sum(errors) / trials
    sd = math.sqrt(sum((e - mean) ** 2 for e in errors) / (trials - 1))
    assert abs(mean - estimate) <= 5 * sd / math.sqrt(trials) + 1e-9 * estimate
    assert mean <= bound + 5 * sd / math.sqrt(trials)


def test_error_estimate_follows_the_variance_formula_and_sign_error():
    gen = torch.Generator().manual_seed(7)
    grad, state = torch.randn(5000, generator=gen), torch.randn(5000, generator=gen)
    bucket = 300
    v = form_v(grad, state, "ef21")
    est = quant_error_estimate(grad, state, bucket=bucket, mode="ef21")
    norms = bucket_sums(v.double() ** 2, bucket).sqrt().float()
    for bits in (8, 4, 2):
        s = 2 ** (bits - 1) - 1
        x = v.abs() * per_element(torch.tensor(float(s)) / norms, v.numel(), bucket)
        p = torch.where(x >= s, torch.zeros_like(x), x - x.floor()).double()
        step = per_element(norms / torch.tensor(float(s)), v.numel(), bucket).double()
        assert est.qsgd[bits] == pytest.approx(float((step**2 * p * (1 - p)).sum()), rel=1e-9)
    before = state.clone()
    assert est.sign == pytest.approx(sign_encode(grad, state, bucket=bucket, mode="ef21").sq_error, rel=1e-9)
    assert not torch.equal(state, before)  # (the encoder, unlike the estimate, updates the state)
    assert est.sq_norm == pytest.approx(float((v.double() ** 2).sum()), rel=1e-12)


def test_error_estimate_is_the_same_on_every_device(device):
    gen = torch.Generator().manual_seed(10)
    grad, state = torch.randn(100_003, generator=gen), torch.randn(100_003, generator=gen)
    cpu = quant_error_estimate(grad, state, bucket=256, mode="ef")
    here = quant_error_estimate(grad.to(device), state.to(device), bucket=256, mode="ef")
    assert here.qsgd == pytest.approx(cpu.qsgd, rel=1e-9)
    assert here.sign == pytest.approx(cpu.sign, rel=1e-9)
    assert here.sq_norm == pytest.approx(cpu.sq_norm, rel=1e-12)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("encoder", ["qsgd", "sign"])
def test_non_finite_gradient_raises_and_writes_nothing(device, bad, encoder):
    grad = torch.randn(200_000, generator=torch.Generator().manual_seed(5))
    grad[123_457] = bad
    state = torch.full((200_000,), 0.5, device=device)
    with pytest.raises(NonFiniteGradientError, match=r"'layer4.conv' .* 1 non-finite"):
        if encoder == "qsgd":
            qsgd_encode(grad.to(device), state, bits=4, seed=1, name="layer4.conv")
        else:
            sign_encode(grad.to(device), state, name="layer4.conv")
    assert torch.equal(state.cpu(), torch.full((200_000,), 0.5))
    with pytest.raises(NonFiniteGradientError, match="'layer4.conv'"):
        quant_error_estimate(grad.to(device), state, name="layer4.conv")


def corrupt(payload: torch.Tensor, pos: int, value: int) -> torch.Tensor:
    p = payload.clone()
    p[pos] = value
    return p


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda p: p[:-1], r"has 1,023 bytes but a qsgd message of 2,000 elements .* has 1,024"),
        (lambda p: torch.cat([p, p[:1]]), "has 1,025 bytes"),
        (lambda p: corrupt(p, 0, 0xD1), "header says 2,001 elements but the tensor has 2,000"),
        (lambda p: corrupt(p, 4, 0x53), "format tag 0x53"),
        (lambda p: corrupt(p, 5, 8), "bits 8"),
        (lambda p: corrupt(p, 7, 1), "bucket field 256 but the receiver expects bucket=512"),
        (lambda p: corrupt(p, 11, 0xFF), "NaN or Inf"),  # first norm's top byte: NaN
        (lambda p: corrupt(p, 11, 0x80), "negative"),
    ],
)
def test_corrupt_message_raises_and_leaves_out_unchanged(device, mutate, match):
    grad = torch.randn(2000, generator=torch.Generator().manual_seed(8)).to(device)
    msg = qsgd_encode(grad, torch.zeros(2000, device=device), bits=4, seed=3, mode="ef")
    assert msg.payload.numel() == 8 + 4 * 4 + 1000
    out = torch.ones(2000, device=device)
    with pytest.raises(CorruptMessageError, match=match):
        quant_decode_accumulate(out, mutate(msg.payload), fmt="qsgd", numel=2000, bits=4, name="fc.weight")
    assert torch.equal(out.cpu(), torch.ones(2000))


@pytest.mark.parametrize("fmt, bits", [("qsgd", 8), ("qsgd", 2), ("sign", None)])
def test_decode_with_a_wrong_bucket_of_the_same_length_is_a_corrupt_message(fmt, bits):
    grad, state = torch.randn(1000, generator=torch.Generator().manual_seed(9)), torch.zeros(1000)
    # Buckets of 600 and of 900 both make 2 buckets: the message length is the same.
    if fmt == "qsgd":
        msg = qsgd_encode(grad, state, bits=bits, bucket=600, seed=1)
    else:
        msg = sign_encode(grad, state, bucket=600)
    out = torch.ones(1000)
    with pytest.raises(CorruptMessageError, match="bucket field 600 but the receiver expects bucket=900"):
        quant_decode_accumulate(out, msg.payload, fmt=fmt, numel=1000, bits=bits, bucket=900, name="w")
    assert torch.equal(out, torch.ones(1000))
    quant_decode_accumulate(out, msg.payload, fmt=fmt, numel=1000, bits=bits, bucket=600)


def test_bucket_beyond_the_header_field_is_refused_unless_it_spans_the_tensor():
    with pytest.raises(KimadError, match="16-bit bucket field"):
        qsgd_encode(torch.zeros(70_000), torch.zeros(70_000), bits=4, bucket=65_536, seed=0)
    msg = qsgd_encode(torch.randn(1000), torch.zeros(1000), bits=4, bucket=65_536, seed=0)
    as_sent, as_one_bucket = torch.zeros(1000), torch.zeros(1000)
    quant_decode_accumulate(as_sent, msg.payload, fmt="qsgd", numel=1000, bits=4, bucket=65_536)
    quant_decode_accumulate(as_one_bucket, msg.payload, fmt="qsgd", numel=1000, bits=4, bucket=1000)
    assert torch.equal(as_sent, as_one_bucket)


def test_decode_with_the_wrong_format_or_bits_raises():
    msg = sign_encode(torch.randn(100), torch.zeros(100), bucket=10)
    with pytest.raises(CorruptMessageError):
        quant_decode_accumulate(torch.zeros(100), msg.payload, fmt="qsgd", numel=100, bits=8, bucket=10)
    with pytest.raises(CorruptMessageError, match="bytes"):
        quant_decode_accumulate(torch.zeros(100), msg.payload, fmt="sign", numel=100, bucket=20)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: qsgd_encode(torch.zeros(4), torch.zeros(4), bits=3, seed=0), "bits must be 8, 4 or 2"),
        (lambda: qsgd_encode(torch.zeros(4), torch.zeros(4), bits=4, seed=-1), "seed"),
        (lambda: qsgd_encode(torch.zeros(4), torch.zeros(4), bits=4, seed=0, bucket=0), "bucket"),
        (lambda: sign_encode(torch.zeros(4), torch.zeros(5)), "4 elements but the state has 5"),
        (lambda: sign_encode(torch.zeros(4), torch.zeros(4, dtype=torch.float64)), "contiguous float32"),
        (lambda: sign_encode(torch.zeros(4), torch.zeros(4), mode="ef3"), "mode"),
        (lambda: quant_decode_accumulate(torch.zeros(4), torch.zeros(9, dtype=torch.uint8), fmt="topk", numel=4),
         "fmt must be"),
        (lambda: quant_decode_accumulate(torch.zeros(4), torch.zeros(9, dtype=torch.uint8), fmt="sign", numel=5),
         "expected numel=5"),
        (lambda: quant_decode_accumulate(torch.zeros(4), torch.zeros(9), fmt="sign", numel=4), "uint8"),
    ],
)
def test_bad_arguments_raise_named_errors(call, match):
    with pytest.raises(KimadError, match=match):
        call()
