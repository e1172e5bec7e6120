"""Specification of kimad.control.plan: immutable, serialisable plans with a stable digest."""

import dataclasses
import math
import os
import re
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kimad import KimadError
from kimad.compressors.wire import MessageFormat
from kimad.control.cost import CostModel
from kimad.control.menu import build_menu
from kimad.control.plan import Plan, PlanError

CM = CostModel(bandwidth_bps=1e9, latency_s=1e-5, world_size=4)
DENSITIES = (0.1, 0.01, 0.001)


def menus():
    out = []
    for name, numel in (("conv1.weight", 2_000), ("fc1.weight", 300_000), ("fc1.bias", 300)):
        out.append((name, build_menu(name, numel, cost_model=CM, densities=DENSITIES, topk_errors=(0.1, 0.4, 0.8),
                                     sq_norm=1.0, compressors=("topk", "qsgd"), qsgd_errors={8: 0.01, 4: 0.1, 2: 0.3})))
    return out


def plan(choice=(1, 3, 0), **kwargs):
    return Plan.from_choice(menus(), list(choice), **({"budget_s": 0.01, "over_budget": False, "step": 7,
                                                       "allocator": "layerwise"} | kwargs))


def test_entries_are_the_chosen_options_and_totals_their_sums():
    m, p = menus(), plan()
    chosen = [m[0][1][1], m[1][1][3], m[2][1][0]]
    assert [(e.name, e.label, e.fmt, e.k, e.bits, e.bytes) for e in p.entries] == \
        [(n, o.label, o.fmt, o.k, o.bits, o.bytes) for (n, _), o in zip(m, chosen)]
    assert p.total_bytes == sum(o.bytes for o in chosen)
    assert p.total_time_s == pytest.approx(sum(o.time_s for o in chosen))
    assert p.total_error == pytest.approx(0.1 + 0.8 + 0.0, rel=1e-5)  # (top-k adds its rounding's ~1e-6)
    assert (p.budget_s, p.over_budget, p.step, p.allocator) == (0.01, False, 7, "layerwise")


@given(st.tuples(st.integers(0, 6), st.integers(0, 6), st.just(0)), st.floats(1e-6, 1e3) | st.just(math.inf),
       st.booleans(), st.integers(0, 10**9))
def test_json_round_trip_gives_an_equal_plan_and_digest(choice, budget_s, over_budget, step):
    p = plan(choice, budget_s=budget_s, over_budget=over_budget, step=step)
    q = Plan.from_json(p.to_json())
    assert q == p
    assert q.digest() == p.digest()
    assert isinstance(q.entries, tuple) and q.entries[0].fmt is p.entries[0].fmt


def test_digest_is_a_sha256_that_changes_with_any_field():
    p = plan()
    assert len(p.digest()) == 64 and int(p.digest(), 16) >= 0
    assert plan().digest() == p.digest()
    others = [plan((1, 2, 0)), plan(step=8), plan(budget_s=0.0100000001), plan(over_budget=True),
              plan(allocator="uniform")]
    assert len({p.digest()} | {o.digest() for o in others}) == 6


def test_digest_is_the_same_in_another_process():
    code = ("import sys; sys.path.insert(0, {tests!r}); import test_plan; print(test_plan.plan().digest())"
            .format(tests=os.path.dirname(__file__)))
    env = os.environ | {"PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == plan().digest()


def test_plans_are_immutable():
    p = plan()
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.step = 8
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.entries[0].k = 1
    with pytest.raises(TypeError):
        p.entries[0] = p.entries[1]


def test_the_json_names_formats_by_their_wire_names():
    text = plan((1, 4, 0)).to_json()  # topk0.1, qsgd8, dense32
    assert '"fmt":"topk"' in text and '"fmt":"qsgd"' in text and '"fmt":"dense32"' in text
    assert Plan.from_json(text).entries[1].fmt is MessageFormat.QSGD


@pytest.mark.parametrize("choice", [(0, 0), (0, 0, 1), (0, 99, 0), (0, -1, 0), (0, 1.0, 0)])
def test_a_choice_outside_the_menus_raises(choice):
    with pytest.raises(PlanError):
        plan(choice)


@pytest.mark.parametrize("kwargs", [dict(budget_s=math.nan), dict(step=-1), dict(allocator="")])
def test_bad_plan_fields_raise(kwargs):
    with pytest.raises(PlanError):
        plan(**kwargs)


@pytest.mark.parametrize("text", ["", "[]", "{}", '{"version": 2}', plan().to_json().replace('"topk"', '"zip"')])
def test_malformed_json_raises_a_named_error(text):
    with pytest.raises(PlanError):
        Plan.from_json(text)
    assert issubclass(PlanError, KimadError)


@pytest.mark.parametrize("field, name", [("time_s", "time_s of 'fc1.weight'"), ("error", "error of 'fc1.weight'")])
def test_a_nan_entry_is_named(field, name):
    p = plan()
    entries = list(p.entries)
    entries[1] = dataclasses.replace(entries[1], **{field: math.nan})
    with pytest.raises(PlanError, match=re.escape(f"plan {name} is NaN")):
        dataclasses.replace(p, entries=tuple(entries))


def test_a_tensor_named_twice_raises():
    m = menus()
    with pytest.raises(PlanError):
        Plan.from_choice([m[0], m[0]], [0, 1], budget_s=1.0, over_budget=False, step=0, allocator="uniform")
