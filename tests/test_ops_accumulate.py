"""Specification of kimad.ops.sparse_accumulate against a plain reference loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kimad import CorruptMessageError, KimadError
from kimad.ops import bitmap_positions, sparse_accumulate, sparse_sum


def reference(out: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, scale: float) -> torch.Tensor:
    """out[indices[i]] += scale * values[i], one entry at a time, in float32."""
    r = out.detach().cpu().numpy().astype(np.float32).reshape(-1).copy()
    v = values.detach().cpu().to(torch.float32).numpy()
    s = np.float32(scale)
    for j, x in zip(indices.cpu().tolist(), v):
        r[j] = np.float32(r[j] + np.float32(s * x))
    return torch.from_numpy(r).reshape(out.shape)


@st.composite
def messages(draw):
    numel = draw(st.integers(1, 3000))
    count = draw(st.integers(0, 200))
    heavy_duplicates = draw(st.booleans())
    hi = min(numel - 1, 3) if heavy_duplicates else numel - 1
    indices = draw(st.lists(st.integers(0, hi), min_size=count, max_size=count))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([1.0, 0.5, 1 / 3, -2.0]))
    return numel, indices, seed, scale


@settings(max_examples=60, deadline=None)
@given(messages())
def test_matches_reference_bit_for_bit(message):
    numel, idx, seed, scale = message
    g = torch.Generator().manual_seed(seed)
    out = torch.randn(numel, generator=g)
    values = torch.randn(len(idx), generator=g)
    indices = torch.tensor(idx, dtype=torch.int32)
    expected = reference(out, values, indices, scale)
    sparse_accumulate(out, values, indices, scale=scale)
    assert torch.equal(out, expected)


def test_large_threaded_message_with_duplicates_matches_reference(device):
    g = torch.Generator().manual_seed(0)
    out = torch.randn(1 << 16, generator=g)
    indices = torch.randint(0, 1 << 10, (1 << 16,), generator=g, dtype=torch.int32)
    values = torch.randn(1 << 16, generator=g)
    expected = reference(out, values, indices, 0.125)
    got = sparse_accumulate(out.to(device), values.to(device), indices.to(device), scale=0.125).cpu()
    # CUDA adds duplicates atomically in unspecified order: equal up to float rounding there.
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    if device.type == "cpu":
        assert torch.equal(got, expected)


def test_multidimensional_out_is_addressed_flat(device):
    out = torch.zeros(2, 3, device=device)
    sparse_accumulate(out, torch.tensor([1.0, 2.0], device=device), torch.tensor([5, 0], device=device))
    assert out.cpu().tolist() == [[2.0, 0.0, 0.0], [0.0, 0.0, 1.0]]


def test_int64_indices_and_half_values_are_converted():
    out = torch.zeros(4)
    sparse_accumulate(out, torch.tensor([1.5, 2.5], dtype=torch.float16), torch.tensor([3, 3], dtype=torch.int64))
    assert out.tolist() == [0.0, 0.0, 0.0, 4.0]


def test_non_contiguous_message_views_are_accepted():
    out = torch.zeros(6)
    values = torch.arange(8.0)[::2]  # [0, 2, 4, 6]
    indices = torch.tensor([0, 9, 1, 9, 2, 9, 3, 9], dtype=torch.int32)[::2]
    sparse_accumulate(out, values, indices)
    assert out.tolist() == [0.0, 2.0, 4.0, 6.0, 0.0, 0.0]


@pytest.mark.parametrize("bad", [-1, 10, 2**31 - 1])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_out_of_range_index_raises_and_leaves_out_unchanged(device, bad, index_dtype):
    out = torch.full((10,), 3.0, device=device)
    indices = torch.tensor([0, 4, bad], dtype=index_dtype, device=device)
    with pytest.raises(CorruptMessageError, match=rf"'fc.weight' has index {bad:,} at position 2"):
        sparse_accumulate(out, torch.ones(3, device=device), indices, name="fc.weight")
    assert torch.equal(out.cpu(), torch.full((10,), 3.0))


def test_length_mismatch_is_a_corrupt_message():
    with pytest.raises(CorruptMessageError, match="2 values but 3 indices"):
        sparse_accumulate(torch.zeros(4), torch.ones(2), torch.zeros(3, dtype=torch.int32))


@pytest.mark.parametrize(
    "out, values, indices, match",
    [
        (torch.zeros(4, dtype=torch.float64), torch.ones(1), torch.zeros(1, dtype=torch.int32), "out must be float32"),
        (torch.zeros(4, 2).t(), torch.ones(1), torch.zeros(1, dtype=torch.int32), "out must be contiguous"),
        (torch.zeros(4), torch.ones(1, 1), torch.zeros(1, dtype=torch.int32), "must be 1-D"),
        (torch.zeros(4), torch.ones(1), torch.zeros(1, dtype=torch.int16), "indices must be int32 or int64"),
        (torch.zeros(4), torch.ones(1, dtype=torch.int32), torch.zeros(1, dtype=torch.int32), "floating point"),
    ],
)
def test_bad_arguments_raise_named_errors(out, values, indices, match):
    with pytest.raises(KimadError, match=match):
        sparse_accumulate(out, values, indices)


# ---- sparse_sum: all ranks' messages in one call ------------------------------------------------


def reference_sum(out: torch.Tensor, messages, scale: float, accumulate: bool) -> torch.Tensor:
    """Zero ``out`` unless accumulating, then add every message entry by entry, in rank order."""
    r = out.clone() if accumulate else torch.zeros_like(out)
    for values, indices in messages:
        r = reference(r, values, indices, scale)
    return r


@st.composite
def batches(draw):
    numel = draw(st.integers(1, 3000))
    ranks = draw(st.integers(0, 5))
    sort = draw(st.sampled_from(["all", "none", "some"]))
    narrow = draw(st.booleans())  # all indices in a few elements: heavy duplicates across ranks
    hi = min(numel - 1, 3) if narrow else numel - 1
    messages = []
    for r in range(ranks):
        idx = draw(st.lists(st.integers(0, hi), max_size=200))
        if sort == "all" or (sort == "some" and r % 2 == 0):
            idx.sort()
        messages.append(idx)
    return numel, messages, draw(st.integers(0, 2**31 - 1)), draw(st.sampled_from([1.0, 0.125, 1 / 3, -2.0]))


@settings(max_examples=160, deadline=None)
@given(batches(), st.sampled_from(["overwrite", "accumulate", "sum_first"]))
def test_sum_matches_reference_bit_for_bit(batch, how):
    # sum_first is EF21's H += c: the same bits as summing into a fresh zero buffer and adding it (out's
    # elements are nonzero here; an untouched -0.0 would stay -0.0, see the next test).
    numel, idx_lists, seed, scale = batch
    g = torch.Generator().manual_seed(seed)
    out = torch.randn(numel, generator=g)
    messages = [(torch.randn(len(idx), generator=g), torch.tensor(idx, dtype=torch.int32)) for idx in idx_lists]
    if how == "sum_first":
        expected = out + reference_sum(out, messages, scale, accumulate=False)
    else:
        expected = reference_sum(out, messages, scale, accumulate=how == "accumulate")
    sparse_sum(out, messages, scale=scale, accumulate=how == "accumulate", sum_first=how == "sum_first")
    assert torch.equal(out, expected)


def test_sum_first_leaves_unnamed_elements_alone_and_checks_before_writing():
    out = torch.tensor([-0.0, 10.0, -0.0])
    sparse_sum(out, [(torch.tensor([1.0, 2.0]), torch.tensor([1, 1], dtype=torch.int32)),
                     (torch.tensor([4.0]), torch.tensor([1], dtype=torch.int32))], scale=0.5, sum_first=True)
    assert out[1] == 13.5 and torch.signbit(out[0]) and torch.signbit(out[2])
    with pytest.raises(CorruptMessageError, match="message 1"):
        sparse_sum(out, [(torch.ones(1), torch.tensor([0], dtype=torch.int32)),
                         (torch.ones(1), torch.tensor([3], dtype=torch.int32))], sum_first=True)
    assert out[1] == 13.5 and torch.signbit(out[0])


@pytest.mark.parametrize("sorted_indices", [True, False])
def test_large_threaded_sum_of_overlapping_messages_matches_reference(device, sorted_indices):
    g = torch.Generator().manual_seed(3)
    numel, ranks, count = 1 << 20, 8, 1 << 15  # several merge blocks and validation chunks per thread
    messages = []
    for _ in range(ranks):
        indices = torch.randint(0, numel, (count,), generator=g, dtype=torch.int32)
        messages.append((torch.randn(count, generator=g), indices.sort().values if sorted_indices else indices))
    out = torch.full((numel,), float("nan"))  # overwritten: stale contents must not leak through
    expected = torch.zeros(numel)
    for values, indices in messages:
        expected.index_put_((indices.long(),), values * 0.125, accumulate=True)
    got = sparse_sum(out.to(device), [(v.to(device), i.to(device)) for v, i in messages], scale=0.125).cpu()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    if device.type == "cpu":
        serial = torch.zeros(numel)
        for values, indices in messages:
            sparse_accumulate(serial, values, indices, scale=0.125)
        assert torch.equal(got, serial)


def test_sum_of_no_messages_zeroes_out_unless_accumulating():
    assert sparse_sum(torch.ones(5), []).tolist() == [0.0] * 5
    assert sparse_sum(torch.ones(5), [], accumulate=True).tolist() == [1.0] * 5


def test_sum_accepts_int64_indices_half_values_and_multidimensional_out():
    out = torch.empty(2, 2)
    messages = [(torch.tensor([1.5], dtype=torch.float16), torch.tensor([3])),
                (torch.tensor([2.5, 1.0]), torch.tensor([3, 0], dtype=torch.int32))]
    assert sparse_sum(out, messages).tolist() == [[1.0, 0.0], [0.0, 4.0]]


@pytest.mark.parametrize("sorted_indices", [True, False])
@pytest.mark.parametrize("bad", [-1, 10, 2**31 - 1])
def test_out_of_range_index_in_any_message_raises_and_leaves_out_unchanged(device, bad, sorted_indices):
    out = torch.full((10,), 3.0, device=device)
    good = (torch.ones(3, device=device), torch.tensor([0, 4, 9] if sorted_indices else [9, 0, 4],
                                                       dtype=torch.int32, device=device))
    corrupt = (torch.ones(3, device=device), torch.tensor([1, 2, bad], dtype=torch.int32, device=device))
    with pytest.raises(CorruptMessageError, match=rf"message 1 for 'fc.weight' has index {bad:,} at position 2"):
        sparse_sum(out, [good, corrupt, good], name="fc.weight")
    assert torch.equal(out.cpu(), torch.full((10,), 3.0))


def test_sum_length_mismatch_names_the_message():
    messages = [(torch.ones(1), torch.zeros(1, dtype=torch.int32)), (torch.ones(2), torch.zeros(3, dtype=torch.int32))]
    with pytest.raises(CorruptMessageError, match="message 1 for 'w' has 2 values but 3 indices"):
        sparse_sum(torch.zeros(4), messages, name="w")


@pytest.mark.parametrize(
    "out, messages, match",
    [
        (torch.zeros(4, dtype=torch.float64), [], "contiguous float32"),
        (torch.zeros(4, 2).t(), [], "contiguous float32"),
        (torch.zeros(4), [(torch.ones(1),)], "must be a \\(values, indices\\) pair"),
        (torch.zeros(4), [(torch.ones(1, 1), torch.zeros(1, dtype=torch.int32))], "must be 1-D"),
        (torch.zeros(4), [(torch.ones(1), torch.zeros(1, dtype=torch.int16))], "int32 or int64"),
        (torch.zeros(4), [(torch.ones(1, dtype=torch.int32), torch.zeros(1, dtype=torch.int32))], "floating point"),
    ],
)
def test_sum_bad_arguments_raise_named_errors(out, messages, match):
    with pytest.raises(KimadError, match=match):
        sparse_sum(out, messages)


# -- bitmap_positions: the top-k message's bitmap decode ----------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 700), density=st.sampled_from([0.0, 0.02, 0.3, 1.0]), seed=st.integers(0, 2**16),
       dirty=st.booleans())
def test_bitmap_positions_are_the_set_bits_below_n_in_order(n, density, seed, dirty):
    rng = np.random.default_rng(seed)
    marked = rng.random(n) < density
    padded = np.zeros(8 * ((n + 7) // 8), dtype=bool)
    padded[:n] = marked
    padded[n:] = dirty  # padding bits past n are not read
    bitmap = torch.from_numpy(np.packbits(padded, bitorder="little"))
    expected = np.flatnonzero(marked)
    positions, count = bitmap_positions(bitmap, n, capacity=n)
    assert count == len(expected) and positions.dtype == torch.int32
    assert positions.tolist() == expected.tolist()
    few, count = bitmap_positions(bitmap, n, capacity=3)  # a short capacity still counts them all
    assert count == len(expected) and few.tolist() == expected[:3].tolist()


@pytest.mark.parametrize("bitmap, n, capacity, match", [
    (torch.zeros(2, dtype=torch.int32), 16, 1, "1-D uint8"),
    (torch.zeros(2, 1, dtype=torch.uint8), 16, 1, "1-D uint8"),
    (torch.zeros(3, dtype=torch.uint8), 16, 1, "has 2 bytes, got 3"),
    (torch.zeros(2, dtype=torch.uint8), -1, 1, "n must be"),
    (torch.zeros(2, dtype=torch.uint8), 16, -1, "capacity must be"),
])
def test_bitmap_positions_rejects_bad_arguments_by_name(bitmap, n, capacity, match):
    with pytest.raises(KimadError, match=match):
        bitmap_positions(bitmap, n, capacity=capacity, name="w")


def test_bitmap_positions_reads_a_strided_view():
    bitmap = torch.tensor([0b101, 0, 0b10, 0], dtype=torch.uint8)[::2]  # bytes 0b101, 0b10 -> 0, 2, 9
    assert bitmap_positions(bitmap, 16, capacity=4)[0].tolist() == [0, 2, 9]
