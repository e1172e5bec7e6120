"""Specification of kimad.control.budget: fixed and compute-proportional communication budgets."""

import math
import statistics

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kimad import KimadError
from kimad.control.budget import AutoBudget, BudgetError, FixedBudget


def test_fixed_budget_is_constant_whatever_the_compute():
    b = FixedBudget(0.05)
    b.observe_compute(3.0)
    assert b.budget_s() == 0.05


@pytest.mark.parametrize("seconds", [0, -0.1, math.nan, math.inf, "fast", None])
def test_fixed_budget_must_be_finite_and_positive(seconds):
    with pytest.raises(BudgetError):
        FixedBudget(seconds)


def test_auto_budget_is_fraction_of_the_median_recent_compute():
    b = AutoBudget(fraction=0.5, min_s=1e-4, max_s=10.0, window=5)
    for s in (0.1, 0.2, 5.0, 0.3, 0.2):  # one slow step (5 s) does not move a median
        b.observe_compute(s)
    assert b.budget_s() == pytest.approx(0.5 * 0.2)


def test_auto_budget_forgets_steps_older_than_its_window():
    b = AutoBudget(fraction=1.0, min_s=1e-4, window=3)
    for s in (9.0, 9.0, 9.0, 1.0, 1.0, 1.0):
        b.observe_compute(s)
    assert b.budget_s() == 1.0


@given(st.lists(st.floats(0, 100), min_size=1, max_size=30), st.floats(0.01, 2), st.floats(1e-3, 1), st.floats(1, 50))
def test_auto_budget_is_clamped_to_its_bounds(computes, fraction, min_s, max_s):
    b = AutoBudget(fraction=fraction, min_s=min_s, max_s=max_s, window=len(computes))
    for s in computes:
        b.observe_compute(s)
    assert b.budget_s() == min(max(fraction * statistics.median(computes), min_s), max_s)


def test_auto_budget_before_any_measurement_is_its_maximum():
    assert AutoBudget(max_s=0.2).budget_s() == 0.2
    assert AutoBudget().budget_s() == math.inf


@pytest.mark.parametrize("kwargs", [dict(fraction=0), dict(fraction=-1), dict(fraction=math.nan), dict(min_s=0),
                                    dict(min_s=-1), dict(max_s=math.nan), dict(min_s=2.0, max_s=1.0), dict(window=0)])
def test_bad_auto_budget_settings_raise_a_named_error(kwargs):
    with pytest.raises(BudgetError):
        AutoBudget(**kwargs)


@pytest.mark.parametrize("seconds", [-1.0, math.nan, math.inf])
def test_a_negative_or_nan_compute_time_raises(seconds):
    with pytest.raises(BudgetError):
        AutoBudget().observe_compute(seconds)
    with pytest.raises(BudgetError):
        FixedBudget(1.0).observe_compute(seconds)
    assert issubclass(BudgetError, KimadError)
