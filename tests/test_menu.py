"""Specification of kimad.control.menu: the priced options of one tensor."""

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kimad import KimadError
from kimad.compressors.wire import MessageFormat, message_bytes
from kimad.control.cost import CostModel
from kimad.control.menu import MenuError, build_menu, geometric_densities

CM = CostModel(bandwidth_bps=1e9, latency_s=1e-5, world_size=8)


def menu(numel=100_000, densities=(0.1, 0.01, 0.001), errors=None, **kwargs):
    errors = errors if errors is not None else [1.0 - d for d in densities]
    return build_menu("fc.weight", numel, cost_model=CM, densities=densities, topk_errors=errors, sq_norm=1.0, **kwargs)


def test_geometric_densities_run_from_hi_to_lo_with_a_constant_ratio():
    d = geometric_densities(5, lo=1e-4, hi=1.0)
    assert d[0] == 1.0 and d[-1] == 1e-4 and len(d) == 5
    for x, y in zip(d, d[1:]):
        assert y / x == pytest.approx(0.1)


def test_dense_fp32_is_level_zero_with_no_error():
    dense = menu()[0]
    assert (dense.label, dense.fmt, dense.level, dense.error, dense.k, dense.bits) == \
        ("dense32", MessageFormat.DENSE32, 0, 0.0, None, None)
    assert dense.bytes == 4 * 100_000
    assert dense.time_s == CM.allreduce(4 * 100_000)


def test_topk_levels_count_up_from_dense_to_sparse_whatever_the_input_order():
    options = menu(densities=(0.001, 0.1, 0.01), errors=(0.9, 0.5, 0.7))
    topk = [(o.level, o.k, o.error) for o in options[1:]]
    assert topk == [(1, 10_000, with_rounding(0.5)), (2, 1_000, with_rounding(0.7)), (3, 100, with_rounding(0.9))]


def with_rounding(error: float, sq_norm: float = 1.0) -> float:
    """A top-k option's error: what top-k drops plus the bfloat16 rounding of what it sends."""
    return error + 2.0 ** -18 / 3 * (sq_norm - error)


@given(st.integers(1024, 10**6), st.lists(st.floats(1e-6, 1.0), min_size=1, max_size=8, unique=True))
def test_topk_k_is_the_rounded_density_times_numel_at_least_one(numel, densities):
    options = build_menu("w", numel, cost_model=CM, densities=densities, topk_errors=[0.0] * len(densities),
                         sq_norm=1.0, min_compress_numel=1024)
    for d, o in zip(sorted(densities, reverse=True), options[1:]):
        assert o.k == min(numel, max(1, round(d * numel)))
        assert o.bytes == message_bytes("topk", numel, k=o.k)
        assert o.time_s == CM.allgather(o.bytes)


def test_tiny_tensors_get_only_dense():
    options = menu(numel=1023, min_compress_numel=1024, compressors=("topk", "sign"), sign_error=0.5)
    assert [o.label for o in options] == ["dense32"]


def test_quantisers_come_after_topk_at_increasing_levels_with_their_errors():
    options = menu(compressors=("topk", "qsgd", "sign"), qsgd_errors={8: 0.01, 4: 0.1, 2: 0.5}, sign_error=0.7)
    tail = [(o.label, o.level, o.bits, o.error, o.bytes) for o in options[4:]]
    assert tail == [("qsgd8", 4, 8, 0.01, message_bytes("qsgd", 100_000, bits=8)),
                    ("qsgd4", 5, 4, 0.1, message_bytes("qsgd", 100_000, bits=4)),
                    ("qsgd2", 6, 2, 0.5, message_bytes("qsgd", 100_000, bits=2)),
                    ("sign", 7, None, 0.7, message_bytes("sign", 100_000))]


def test_dominated_options_are_kept():
    # density 1.0 top-k takes longer than dense fp32 (allgather against allreduce) and is kept in the menu
    options = menu(densities=(1.0, 0.01), errors=(0.0, 0.5))
    assert options[1].k == 100_000 and options[1].time_s > options[0].time_s
    assert options[1].error == with_rounding(0.0) > options[0].error == 0.0  # and it rounds: dense wins


def test_labels_are_unique_within_a_menu():
    labels = [o.label for o in menu(densities=geometric_densities(16), errors=[0.5] * 16)]
    assert len(set(labels)) == len(labels) == 17


def test_densities_equal_to_six_digits_are_labelled_in_full_the_others_short():
    labels = [o.label for o in menu(densities=(0.1, 0.1000001, 0.0123456789), errors=[0.5] * 3)]
    assert labels == ["dense32", "topk0.1000001", "topk0.1", "topk0.0123457"]


@pytest.mark.parametrize("kwargs", [
    dict(compressors=("topk", "powersgd")),
    dict(densities=(), errors=()),
    dict(densities=(0.1, 0.01), errors=(0.5,)),
    dict(densities=(0.1, 0.1), errors=(0.5, 0.5)),
    dict(densities=(0.0,), errors=(0.5,)),
    dict(densities=(1.5,), errors=(0.5,)),
    dict(densities=(0.1,), errors=(math.nan,)),
    dict(densities=(0.1,), errors=(-0.1,)),
    dict(densities=(0.1,), errors=(2.0,)),  # more than ||g||^2 = 1
    dict(compressors=("qsgd",), qsgd_errors={8: 0.1}),
    dict(compressors=("sign",)),
    dict(numel=0),
])
def test_impossible_menus_raise_a_named_error(kwargs):
    with pytest.raises(MenuError):
        menu(**kwargs)
    assert issubclass(MenuError, KimadError)


def test_bad_density_grids_raise():
    for args in [(0,), (4, 0.0, 1.0), (4, 0.5, 0.1)]:
        with pytest.raises(MenuError):
            geometric_densities(*args)
