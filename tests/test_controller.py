"""Specification of kimad.control.Controller: measurements + budget + error profiles -> Plan."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from kimad.control.budget import BudgetError, FixedBudget
from kimad.control.controller import Controller, ControllerError, TensorProfile
from kimad.control.menu import MenuError

DENSITIES = (1.0, 0.3, 0.1, 0.03, 0.01, 0.003, 0.001)


def profiles(seed: int = 0) -> list[TensorProfile]:
    """Error profiles of real top-k on heavy-tailed random tensors of very different sizes."""
    rng = np.random.default_rng(seed)
    out = []
    for i, numel in enumerate([200_000, 50_000, 10_000, 3_000, 100]):
        v = rng.standard_t(df=2 + i, size=numel) * (1 + i)
        sq = np.sort(v.astype(np.float64) ** 2)[::-1]
        total = float(sq.sum())
        errors = tuple(float(total - sq[: min(numel, max(1, round(d * numel)))].sum()) for d in DENSITIES)
        out.append(TensorProfile(f"layer{i}.weight", numel, total, errors))
    return out


def controller(allocator: str, budget_s: float, bandwidth_bps: float = 1e9, world_size: int = 4) -> Controller:
    c = Controller(world_size=world_size, budget=budget_s, allocator=allocator, densities=DENSITIES)
    for step in range(40):  # a clean link: latency 100 us, the given bandwidth, messages of several sizes
        for nbytes in (10_000, 100_000, 1_000_000):
            seconds = 2 * (world_size - 1) * 1e-4 + 8 * 2 * (world_size - 1) / world_size * nbytes / bandwidth_bps
            c.observe_collective("allreduce", nbytes, seconds, step)
    return c


def test_estimate_follows_the_observed_link():
    est = controller("layerwise", 0.01, bandwidth_bps=2e8).estimate()
    assert est.bandwidth_bps == pytest.approx(2e8, rel=0.02)
    assert est.latency_s == pytest.approx(1e-4, rel=0.1)


@pytest.mark.parametrize("allocator", ["layerwise", "uniform", "lagrangian"])
@pytest.mark.parametrize("budget_s", [0.0005, 0.002, 0.01, 1.0])
def test_plans_respect_the_budget_unless_marked_over_budget(allocator, budget_s):
    plan = controller(allocator, budget_s).plan(profiles(), step=3)
    assert len(plan) == 5
    assert plan.over_budget or plan.total_time_s <= budget_s * (1 + 1e-9)


@pytest.mark.parametrize("budget_s", [0.0025, 0.004, 0.008, 0.016])
def test_layerwise_error_is_never_above_uniform_at_the_same_budget(budget_s):
    layerwise = controller("layerwise", budget_s).plan(profiles(), step=0)
    uniform = controller("uniform", budget_s).plan(profiles(), step=0)
    assert not layerwise.over_budget
    assert layerwise.total_error <= uniform.total_error * (1 + 1e-9)


def test_a_slower_link_gives_a_sparser_plan():
    fast = controller("layerwise", 0.005, bandwidth_bps=1e10).plan(profiles(), step=0)
    slow = controller("layerwise", 0.005, bandwidth_bps=1e8).plan(profiles(), step=0)
    assert slow.total_bytes < fast.total_bytes
    assert slow.total_error > fast.total_error


def test_an_impossible_budget_takes_the_cheapest_options_and_says_so():
    plan = controller("layerwise", 1e-6).plan(profiles(), step=0)
    assert plan.over_budget
    assert len(plan) == 5  # no tensor dropped
    assert [e.label for e in plan.entries][:4] == ["topk0.001"] * 4


def test_tiny_tensors_are_sent_dense():
    plan = controller("layerwise", 0.0005).plan(profiles(), step=0)
    assert plan.entries[-1].name == "layer4.weight" and plan.entries[-1].label == "dense32"


def test_no_budget_limit_sends_everything_dense():
    c = Controller(world_size=4, budget="auto", densities=DENSITIES)  # no compute measured yet: max_s = inf
    plan = c.plan(profiles(), step=0)
    assert math.isinf(plan.budget_s)
    assert all(e.label == "dense32" for e in plan.entries) and plan.total_error == 0


def test_auto_budget_follows_measured_compute():
    c = controller("layerwise", 1.0)
    c.budget = Controller(world_size=4, budget="auto").budget
    for _ in range(5):
        c.observe_compute(0.004)
    assert c.plan(profiles(), step=0).budget_s == pytest.approx(0.002)


def test_the_same_inputs_give_the_same_plan_in_another_process():
    digest = controller("layerwise", 0.003).plan(profiles(), step=7).digest()
    code = ("import tests.test_controller as t; "
            "print(t.controller('layerwise', 0.003).plan(t.profiles(), step=7).digest())")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert other == digest


def test_state_dict_restores_the_estimate():
    a = controller("layerwise", 0.003, bandwidth_bps=3e8)
    b = Controller(world_size=4, budget=0.003, densities=DENSITIES)
    b.load_state_dict(a.state_dict())
    assert b.plan(profiles(), step=1).digest() == a.plan(profiles(), step=1).digest()


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(world_size=0), ControllerError, "world_size"),
    (dict(world_size=2, allocator="greedy"), ControllerError, "unknown allocator"),
    (dict(world_size=2, budget=-1.0), BudgetError, "budget"),
    (dict(world_size=2, budget="fast"), ControllerError, "budget must be"),
    (dict(world_size=2, bins=0), ControllerError, "bins"),
])
def test_bad_configuration_raises_named_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        Controller(**kwargs)


def test_profiles_that_do_not_fit_the_density_grid_raise():
    bad = TensorProfile("fc.weight", 5000, 1.0, (0.5, 0.2))
    with pytest.raises(MenuError, match="fc.weight"):
        controller("layerwise", 0.01).plan([bad], step=0)


def test_unknown_compressor_raises():
    c = Controller(world_size=2, budget=0.01, compressors=("zip",))
    with pytest.raises(MenuError, match="unknown compressor"):
        c.plan(profiles(), step=0)


def test_fixed_budget_object_is_accepted():
    assert Controller(world_size=2, budget=FixedBudget(0.02)).budget.budget_s() == 0.02


def static_controller(density: float, budget_s: float | str) -> Controller:
    return Controller(world_size=4, budget=budget_s, allocator="static", densities=(density,),
                      min_compress_numel=1024)


def one_density_profiles(density: float) -> list[TensorProfile]:
    """Sizes of profiles(), with the top-k error of a plain sort at the single density."""
    rng = np.random.default_rng(1)
    out = []
    for i, numel in enumerate([200_000, 50_000, 3_000, 100]):
        sq = np.sort(rng.standard_normal(numel) ** 2)[::-1]
        k = min(numel, max(1, round(density * numel)))
        out.append(TensorProfile(f"t{i}", numel, float(sq.sum()), (float(sq[k:].sum()),)))
    return out


@pytest.mark.parametrize("budget_s", [1e-9, 10.0, "auto"])  # "auto" before any compute: an infinite budget
def test_static_takes_topk_at_its_density_for_large_tensors_whatever_the_budget(budget_s):
    plan = static_controller(0.01, budget_s).plan(one_density_profiles(0.01), step=0)
    assert [e.label for e in plan.entries] == ["topk0.01", "topk0.01", "topk0.01", "dense32"]
    assert [e.k for e in plan.entries[:3]] == [2000, 500, 30]
    assert plan.allocator == "static"


def test_static_says_over_budget_exactly_when_its_plan_is_predicted_to_overrun():
    c = static_controller(0.1, 1.0)
    predicted = c.plan(one_density_profiles(0.1), step=0).total_time_s
    assert not static_controller(0.1, predicted * 1.01).plan(one_density_profiles(0.1), step=0).over_budget
    assert static_controller(0.1, predicted * 0.99).plan(one_density_profiles(0.1), step=0).over_budget


@pytest.mark.parametrize("kwargs", [dict(densities=(0.1, 0.01)), dict(densities=None), dict(compressors=())])
def test_static_needs_topk_and_exactly_one_density(kwargs):
    with pytest.raises(ControllerError, match="static"):
        Controller(world_size=2, budget=1.0, allocator="static", **{"densities": (0.1,), **kwargs})


def filled(allocator: str, budget_s: float) -> tuple:
    plain = controller(allocator, budget_s)
    grown = controller(allocator, budget_s)
    grown.fill = True
    return plain.plan(profiles(), step=0), grown.plan(profiles(), step=0), grown.cost_model()


@pytest.mark.parametrize("allocator", ["layerwise", "uniform"])
@pytest.mark.parametrize("budget_s", [0.0025, 0.004, 0.008])
def test_fill_grows_top_k_by_one_factor_into_the_budget(allocator, budget_s):
    from kimad.compressors.wire import MessageFormat, message_bytes

    plain, grown, cost = filled(allocator, budget_s)
    assert not plain.over_budget and plain.total_time_s < budget_s
    assert plain.total_time_s <= grown.total_time_s <= budget_s * (1 + 1e-12)
    numels = {p.name: p.numel for p in profiles()}
    factors = []
    for before, after in zip(plain.entries, grown.entries):
        assert after.level == before.level and after.error == before.error
        if before.fmt is not MessageFormat.TOPK:
            assert after == before
            continue
        n = numels[after.name]
        denser = [round(d * n) for d in DENSITIES if round(d * n) > before.k]
        assert before.k <= after.k <= (min(denser) if denser else n)  # never past the next grid point
        assert after.bytes == message_bytes(MessageFormat.TOPK, n, k=after.k)
        assert after.time_s == cost.option_time(MessageFormat.TOPK, n, k=after.k)
        if after.k < (min(denser) if denser else n):
            factors.append(after.k / before.k)
    # One common factor (each k rounded down); and the slack is spent: one entry more would overrun.
    assert max(factors) - min(factors) < 0.01 * max(factors)
    assert grown.total_time_s > budget_s * 0.97


def test_fill_leaves_over_budget_and_static_plans_alone():
    over = controller("layerwise", 1e-6)
    over.fill = True
    plan = over.plan(profiles(), step=0)
    assert plan.over_budget and all(e.label in {"dense32", "topk0.001"} for e in plan.entries)
    static = Controller(world_size=4, budget=1.0, allocator="static", densities=(0.01,), fill=True)
    one_density = [TensorProfile(p.name, p.numel, p.sq_norm, p.topk_errors[4:5]) for p in profiles()]  # 0.01
    assert {e.label for e in static.plan(one_density, step=0).entries} == {"topk0.01", "dense32"}


def link_change(c: Controller, before_bps: float, after_bps: float, steps: int = 30,
                sizes: tuple[int, ...] = (10_000, 100_000), latency_s: float = 1e-3) -> int:
    """Feed ``steps`` steps of a clean link at ``before_bps`` then at ``after_bps`` (allreduces of ``sizes`` bytes,
    ``latency_s`` per latency term: by default the largest spends 2/3 of its time on bits at 100 Mbit/s, too
    little to show a new rate without a probe), planning every step after the change until the estimator
    declares it; returns the step it did."""
    def feed(step: int, bps: float) -> None:
        for nbytes in sizes:
            c.observe_collective("allreduce", nbytes, 6 * latency_s + 8 * 1.5 * nbytes / bps, step)

    for step in range(steps):
        feed(step, before_bps)
        c.plan(profiles(), step=step)
    for step in range(steps, 2 * steps):
        feed(step, after_bps)
        before = c.estimator.state.regime_changes
        c.estimate()
        if c.estimator.state.regime_changes > before:
            return step
        c.plan(profiles(), step=step)
    raise AssertionError("the estimator never declared the change")


def test_after_the_link_turns_faster_two_plans_probe_at_twice_the_estimate():
    c = Controller(world_size=4, budget=0.05, allocator="layerwise", densities=DENSITIES)
    step = link_change(c, 2e7, 1e8)
    ref = Controller(world_size=4, budget=0.05, allocator="layerwise", densities=DENSITIES, probe_factor=1)
    ref.load_state_dict(c.state_dict())  # the same estimate, never probing
    est = c.estimate()
    probed, flags, prices = [], [], []
    for i in range(3):
        probed.append(c.plan(profiles(), step=step + i))
        flags.append(c.probing)
        prices.append(c.planned_bandwidth_bps)
    assert flags == [True, True, False]
    assert prices == [2 * est.bandwidth_bps, 2 * est.bandwidth_bps, est.bandwidth_bps]
    assert math.isnan(ref.planned_bandwidth_bps)  # (no plan yet)
    # the first two plans are priced at twice the bandwidth: each message gets ~twice the bytes
    plain = ref.plan(profiles(), step=step)
    assert not ref.probing
    assert probed[0].total_bytes > 1.5 * plain.total_bytes and probed[1].total_bytes > 1.5 * plain.total_bytes
    assert probed[2].total_bytes == plain.total_bytes
    assert c.estimate().bandwidth_bps == est.bandwidth_bps  # probing prices plans; the estimate is untouched


def test_a_faster_link_whose_messages_already_show_it_is_not_probed():
    c = Controller(world_size=4, budget=0.05, allocator="layerwise", densities=DENSITIES)
    step = link_change(c, 2e7, 1e8, sizes=(100_000, 1_000_000), latency_s=1e-4)  # bits: 99% of 120 ms at 100 Mbit/s
    c.plan(profiles(), step=step)
    assert not c.probing and c.estimate().bandwidth_bps == pytest.approx(1e8, rel=0.15)


def test_a_faster_link_whose_messages_take_long_on_bits_is_not_probed_despite_a_large_latency():
    # bits 36 ms at 100 Mbit/s against 36 ms of latency: half the time (under PROBE_BITS_SHARE) but far above jitter
    c = Controller(world_size=4, budget=0.05, allocator="layerwise", densities=DENSITIES)
    step = link_change(c, 2e7, 1e8, sizes=(10_000, 300_000), latency_s=6e-3)
    c.plan(profiles(), step=step)
    assert not c.probing
    # the same link with messages a third the size (12 ms of bits) is probed
    small = Controller(world_size=4, budget=0.05, allocator="layerwise", densities=DENSITIES)
    step = link_change(small, 2e7, 1e8, sizes=(10_000, 100_000), latency_s=6e-3)
    small.plan(profiles(), step=step)
    assert small.probing


def test_a_checkpoint_taken_during_a_probe_resumes_it_and_an_old_one_starts_none():
    c = Controller(world_size=4, budget=0.05, allocator="layerwise", densities=DENSITIES)
    step = link_change(c, 2e7, 1e8)
    c.plan(profiles(), step=step)
    assert c.probing
    resumed = Controller(world_size=4, budget=0.05, allocator="layerwise", densities=DENSITIES)
    resumed.load_state_dict(c.state_dict())
    flags = []
    for i in (1, 2):
        resumed.plan(profiles(), step=step + i)
        flags.append(resumed.probing)
    assert flags == [True, False]  # the second of the two probing plans, then none
    old = {"estimator": c.state_dict()["estimator"]}  # a checkpoint from before the probe existed
    from_old = Controller(world_size=4, budget=0.05, allocator="layerwise", densities=DENSITIES)
    from_old.load_state_dict(old)
    from_old.plan(profiles(), step=step + 1)
    assert not from_old.probing


def test_a_slower_link_or_probe_factor_1_never_probes():
    slower = Controller(world_size=4, budget=0.05, allocator="layerwise", densities=DENSITIES)
    step = link_change(slower, 1e8, 2e7)
    for i in range(3):
        slower.plan(profiles(), step=step + i)
        assert not slower.probing
    off = Controller(world_size=4, budget=0.05, allocator="layerwise", densities=DENSITIES, probe_factor=1)
    step = link_change(off, 2e7, 1e8)
    off.plan(profiles(), step=step)
    assert not off.probing


def feed_link(c: Controller, step: int, bps: float) -> None:
    """One step of a clean link at ``bps`` (latency 100 us): bits-bound allreduces of 100 kB and 1 MB."""
    for nbytes in (100_000, 1_000_000):
        c.observe_collective("allreduce", nbytes, 6e-4 + 8 * 1.5 * nbytes / bps, step)


def settled(bps: float, budget: float, **options) -> Controller:
    """A layerwise controller that planned 30 steps of a clean link at ``bps`` (:func:`feed_link`)."""
    c = Controller(world_size=4, budget=budget, allocator="layerwise", densities=DENSITIES, **options)
    for step in range(30):
        feed_link(c, step, bps)
        c.plan(profiles(), step=step)
    return c


def test_a_five_times_slower_link_is_hedged_at_its_own_rate_until_the_estimator_declares_it():
    c = settled(1e8, 0.01)
    fast = c.plan(profiles(), step=30)
    assert not c.hedging and c.planned_bandwidth_bps == c.estimate().bandwidth_bps
    hedged, estimates = [], []
    for step in range(31, 45):
        feed_link(c, step, 2e7)
        before = c.estimator.state.regime_changes
        plan = c.plan(profiles(), step=step)
        estimates.append(c.estimate().bandwidth_bps)
        if c.estimator.state.regime_changes > before:
            break
        assert c.hedging, f"step {step}: an undeclared 5x slower link planned at {estimates[-1] / 1e6:.0f} Mbit/s"
        assert estimates[-1] > 3e7  # the estimator has not followed yet ...
        assert c.planned_bandwidth_bps == pytest.approx(2e7, rel=0.2)  # ... the plan's price has
        hedged.append(plan)
    assert len(hedged) >= 2  # (change_samples = 3 over more than stall_steps = 3 steps)
    assert not c.hedging  # ... and once it has, the estimate prices the plan
    for plan in hedged:  # priced at the slow samples' own rate: the bytes of the budget at 20 Mbit/s, not 100
        assert plan.total_bytes < 0.35 * fast.total_bytes
        assert plan.total_time_s <= plan.budget_s
    slow = Controller(world_size=4, budget=0.01, allocator="layerwise", densities=DENSITIES)
    slow.load_state_dict(c.state_dict())
    assert hedged[-1].total_bytes == pytest.approx(slow.plan(profiles(), step=step).total_bytes, rel=0.25)


def closed_loop(hedge_trigger: float = 2.5, steps: int = 40, change: int = 20, after_bps: float = 2e7,
                before_bps: float = 1e8, budget_s: float = 0.015, lift_trigger: float = 2.0,
                flag: str = "hedging") -> tuple[list[bool], list[float], int]:
    """Kimad's loop on a simulated 4-rank link (1.5 ms latency per ring step, ``before_bps`` then ``after_bps`` from
    ``change``): each step's sample is its own plan's allgather, learnt before the next plan. The default 15 ms
    budget leaves 10.5 ms for bits, so a message sized for 20 Mbit/s would take 2.1 ms of bits at 100: to the old
    fit it looks latency-bound. Returns the controller's ``flag`` (``"hedging"``, ``"lifting"`` or ``"probing"``)
    and the measured-over-budget ratios after the change, and the step at which the estimator declared the
    change."""
    c = Controller(world_size=4, budget=budget_s, allocator="layerwise", densities=DENSITIES, batched=True,
                   hedge_trigger=hedge_trigger, lift_trigger=lift_trigger)
    flags, ratios, declared = [], [], None
    for step in range(steps):
        plan = c.plan(profiles(), step=step)
        bps = before_bps if step < change else after_bps
        seconds = 4.5e-3 + 8 * 3 * plan.total_bytes / bps
        if step >= change:
            flags.append(getattr(c, flag))
            ratios.append(seconds / plan.budget_s)
        c.observe_collective("allgather", plan.total_bytes, seconds, step)
        c.observe_collective("allgather", 504, 4.5e-3 + 8 * 3 * 504 / bps, step)  # the agree: latency-bound
        if declared is None and c.estimator.state.regime_changes:
            declared = step
    return flags, ratios, declared


def test_hedged_plans_are_small_yet_the_estimator_declares_the_slower_link_as_soon_as_without_them():
    flags, ratios, declared = closed_loop(2.5)
    plain_flags, plain_ratios, plain_declared = closed_loop(math.inf)
    assert declared == plain_declared
    first = flags.index(True)
    assert first == 1  # the step in flight at the change cannot be hedged; the next one is
    hedged = slice(first, declared - 20)  # (the plan of step `declared` already priced the declared change)
    assert flags[hedged] == [True] * (declared - 21) and not any(flags[declared - 20:])
    # the hedged plans fit the 20 Mbit/s link; without the hedge they overran by the slow-down
    assert max(ratios[hedged]) < 1.5 and min(plain_ratios[hedged]) > 4
    assert not any(plain_flags)


def test_a_hedge_holds_while_its_small_messages_are_slow_though_under_the_trigger():
    # 4x slower: the first sample is 3.1x its prediction; the hedged plans' messages, sized for 25 Mbit/s, take
    # 2.1 ms of bits at 100 and 4.5 ms of latency, so they run only 2.1x slower than the old fit predicts
    flags, ratios, declared = closed_loop(2.5, after_bps=2.5e7)
    _, plain_ratios, plain_declared = closed_loop(math.inf, after_bps=2.5e7)
    assert declared == plain_declared
    assert flags[1: declared - 20] == [True] * (declared - 21) and not any(flags[declared - 20:])
    assert max(ratios[1: declared - 20]) < 1.5 and min(plain_ratios[1: declared - 20]) > 3


def test_one_stalled_step_hedges_one_plan_and_a_two_times_slower_link_none():
    c = settled(1e8, 0.01)
    feed_link(c, 30, 1e8 / 3)  # one stall: 3x the bytes' time
    c.plan(profiles(), step=30)
    assert c.hedging
    quick = Controller(world_size=4, budget=0.01, allocator="layerwise", densities=DENSITIES)
    quick.load_state_dict(c.state_dict())
    quick._planned_estimate, quick.hedging = c._planned_estimate, True
    quick.observe_collective("allreduce", 1_000_000, 1e-4, 31)  # faster than its latency: says nothing of the rate
    quick.plan(profiles(), step=31)  # (a negative rate once: CostModelError)
    assert not quick.hedging
    flags = []
    for step in range(31, 40):
        feed_link(c, step, 1e8)
        c.plan(profiles(), step=step)
        flags.append(c.hedging)
    assert not any(flags)
    assert c.estimate().bandwidth_bps == pytest.approx(1e8, rel=0.05)
    assert c.estimator.state.regime_changes == 0
    halved = settled(1e8, 0.01)
    for step in range(30, 45):  # below the trigger of 2.5x: the estimator alone follows it
        feed_link(halved, step, 5e7)
        halved.plan(profiles(), step=step)
        assert not halved.hedging
    never = settled(1e8, 0.01, hedge_trigger=math.inf)
    feed_link(never, 30, 2e7)
    never.plan(profiles(), step=30)
    assert not never.hedging


def test_a_five_times_faster_link_whose_messages_show_it_is_lifted_at_its_own_rate_until_the_estimator_declares_it():
    c = settled(2e7, 0.05)
    assert not c.lifting
    ref = Controller(world_size=4, budget=0.05, allocator="layerwise", densities=DENSITIES, lift_trigger=math.inf)
    lifted = []
    for step in range(30, 45):
        feed_link(c, step, 1e8)  # bits-bound (1 MB: 99.5% bits at 100 Mbit/s), 5x faster than the plan expected
        before = c.estimator.state.regime_changes
        ref.load_state_dict(c.state_dict())  # the same estimate, never lifting
        plan = c.plan(profiles(), step=step)
        if c.estimator.state.regime_changes > before:
            break
        assert c.lifting and not c.probing and not c.hedging
        assert c.estimate().bandwidth_bps < 4e7  # the estimator has not followed yet ...
        assert c.planned_bandwidth_bps == pytest.approx(1e8, rel=0.05)  # ... the plan's price has
        plain = ref.plan(profiles(), step=step)
        assert plan.total_bytes > 3 * plain.total_bytes and plan.total_time_s <= plan.budget_s
        lifted.append(plan)
    assert len(lifted) == 1  # (faster_change_samples = 2: the second fast step declares the faster link)
    assert not c.lifting and not c.probing  # its messages showed the rate: no probe after the change either
    assert c.estimate().bandwidth_bps == pytest.approx(1e8, rel=0.15)
    never = settled(2e7, 0.05, lift_trigger=math.inf)
    feed_link(never, 30, 1e8)
    never.plan(profiles(), step=30)
    assert not never.lifting and never.planned_bandwidth_bps < 4e7


def test_a_lifted_plan_fills_the_budget_on_the_faster_link_and_the_estimator_declares_it_as_soon_as_without():
    # a 120 ms budget: messages sized for 20 Mbit/s spend 84% of their time on bits at 100 Mbit/s
    kwargs = dict(before_bps=2e7, after_bps=1e8, budget_s=0.12, flag="lifting")
    flags, ratios, declared = closed_loop(**kwargs)
    plain_flags, plain_ratios, plain_declared = closed_loop(lift_trigger=math.inf, **kwargs)
    assert declared == plain_declared
    assert flags[:3] == [False, True, False]  # the step in flight at the change cannot be lifted; the next one is
    # the lifted plan takes as long as the plans after the estimator declared the faster link; without the lift it
    # took a fifth of that
    settled = ratios[declared - 20 + 1]
    assert ratios[1] == pytest.approx(settled, rel=0.1) and plain_ratios[1] < 0.35 * settled
    assert not any(plain_flags)
    # messages sized for 20 Mbit/s by the default 15 ms budget are mostly latency at 100 Mbit/s: no lift (the
    # probe's case, test_after_the_link_turns_faster_two_plans_probe_at_twice_the_estimate)
    small, _, _ = closed_loop(before_bps=2e7, after_bps=1e8, flag="lifting")
    assert not any(small)
    slower, _, _ = closed_loop(flag="lifting")  # and a slower link is hedged, never lifted
    assert not any(slower)


@pytest.mark.parametrize("kwargs, match", [(dict(probe_factor=0.5), "probe_factor"),
                                           (dict(probe_factor=math.nan), "probe_factor"),
                                           (dict(probe_factor=True), "probe_factor"),
                                           (dict(probe_steps=-1), "probe_steps"),
                                           (dict(probe_steps=1.5), "probe_steps"),
                                           (dict(hedge_trigger=1.0), "hedge_trigger"),
                                           (dict(hedge_trigger=math.nan), "hedge_trigger"),
                                           (dict(hedge_trigger="2"), "hedge_trigger"),
                                           (dict(lift_trigger=1.0), "lift_trigger"),
                                           (dict(lift_trigger=math.nan), "lift_trigger"),
                                           (dict(lift_trigger=True), "lift_trigger")])
def test_bad_probe_hedge_and_lift_settings_raise_named_errors(kwargs, match):
    with pytest.raises(ControllerError, match=match):
        Controller(world_size=2, **kwargs)
