"""Specification of the end-to-end comparison: the report from logs, and a real run on the emulated cluster.

The report tests build small synthetic logs (no network). The cluster test needs root and iproute2
and Horovod; elsewhere it skips and says why.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from pathlib import Path

import pytest

from kimad.bench import report
from kimad.bench.e2e import METHODS, parse_args, train_command

T0 = 1_800_000_000.0  # Unix time of the synthetic runs' start
TARGET = 0.9


def write_jsonl(path: Path, entries: list[dict]) -> None:
    path.write_text("".join(json.dumps(e) + "\n" for e in entries))


def synthetic_run(out: Path, method: str, *, step_s: float, accuracies: list[float], kimad: bool,
                  estimate_factor: float = 1.0, lag_steps: int = 0, comm_factor: float = 1.0) -> None:
    """40 steps of ``step_s`` seconds; the link drops from 100 to 20 Mbit/s after step 19 (at 20 * step_s);
    Kimad's estimate is ``estimate_factor`` times the shaped rate, ``lag_steps`` late after the drop."""
    steps = []
    for i in range(40):
        t = (i + 1) * step_s
        entry = {"step": i, "t": t, "train_s": t, "wall": T0 + t, "loss": 2.0 / (i + 1), "step_s": step_s,
                 "bytes": 1000}
        if kimad:
            rate = 100e6 if i < 20 + lag_steps else 20e6
            entry.update(bandwidth_bps=rate * estimate_factor, latency_s=1e-4, budget_s=0.05,
                         comm_s=0.05 * comm_factor, predicted_comm_s=0.05, over_budget=False, kimad_step_s=0.06,
                         agree_s=0.004, plan_s=0.002,
                         density={"fc.weight": 0.1 if i < 20 else 0.02, "fc.bias": 1.0})
        steps.append(entry)
    evals = [{"eval": True, "step": 10 * (j + 1), "t": 10 * (j + 1) * step_s, "train_s": 10 * (j + 1) * step_s,
              "wall": T0 + 10 * (j + 1) * step_s, "accuracy": a} for j, a in enumerate(accuracies)]
    write_jsonl(out / f"{method}.jsonl", steps + evals)
    write_jsonl(out / f"rates-{method}.jsonl",
                [{"t": 0.0, "wall": T0, "node": n, "mbit": 100.0} for n in (0, 1)]
                + [{"t": 20 * step_s, "wall": T0 + 20 * step_s + 1e-6, "node": n, "mbit": 20.0} for n in (0, 1)])


@pytest.fixture
def logs(tmp_path: Path) -> Path:
    meta = {"workload": "mnist-digits-cnn", "nodes": 2, "trace": "step-down", "rate_mbit": 100.0, "seconds": 40.0,
            "budget": "0.05", "eval_every_s": 1.0, "target": TARGET, "seed": 0, "shaped": True,
            "methods": ["none", "static0.01", "kimad+"], "started": "2027-01-01 00:00:00"}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    synthetic_run(tmp_path, "none", step_s=1.0, accuracies=[0.5, 0.8, 0.91, 0.95], kimad=False)  # 90% at 30 s
    synthetic_run(tmp_path, "static0.01", step_s=0.5, accuracies=[0.6, 0.92, 0.93, 0.94], kimad=True,
                  comm_factor=0.5)  # 90% at 10 s; comm at half the budget
    synthetic_run(tmp_path, "kimad+", step_s=0.2, accuracies=[0.7, 0.85, 0.91, 0.945], kimad=True,
                  estimate_factor=1.1, lag_steps=3)  # 90% at 6 s; estimate 10% high, 3 steps late after the drop
    return tmp_path


def target_rows(out: Path) -> dict[str, tuple[str, bool | None]]:
    runs = report.load_runs(out, ["none", "static0.01", "kimad+"])
    return {t.what: (t.figure, t.met) for t in report.targets(runs, TARGET)}


def test_report_has_a_row_per_method_with_time_to_target_final_accuracy_and_bytes(logs):
    text = report.write_report(logs).read_text()
    assert "| none | 30.0 | 40.0 | 95.0% | 40,000 | 1000.0 | 40 |" in text
    assert "| static0.01 | 10.0 | not reached | 94.0% | 40,000 | 500.0 | 40 |" in text
    assert "| kimad+ | 6.0 | not reached | 94.5% | 40,000 | 200.0 | 40 |" in text


def test_report_gives_the_median_kimad_plugin_step_of_each_plugin_method(logs):
    text = report.write_report(logs).read_text()
    assert "static0.01 60.0 ms, kimad+ 60.0 ms." in text


def test_report_gives_the_agree_and_plan_time_of_every_plugin_method(logs):
    text = report.write_report(logs).read_text()
    assert "agree allgather and the plan (median per step): static0.01 6.0 ms, kimad+ 6.0 ms (static" in text


def test_report_writes_every_plot_it_links(logs):
    text = report.write_report(logs).read_text()
    for name in ("rate_vs_estimate.png", "budget_vs_comm.png", "loss_accuracy.png", "kimad_plus_density.png"):
        assert f"]({name})" in text
        assert (logs / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_estimate_error_is_the_median_relative_error_against_the_slowest_node(logs):
    figure, met = target_rows(logs)["kimad+: estimate within ±15% of shaped rate (median abs. rel. error)"]
    # 35 steps after warm-up: 32 are 10% off, the 3 late ones after the drop are 450% off; the median is 10%.
    assert figure == "10.0%" and met


def test_recovery_counts_the_steps_after_a_rate_change(logs):
    figure, met = target_rows(logs)["kimad+: within ±15% of a new rate <= 5 steps after a change"]
    assert figure == "3 steps" and met


def test_a_swinging_trace_summarises_recovery_and_leaves_out_a_change_too_late_to_judge():
    # 60 steps of 1 s; the link swings 100 <-> 20 Mbit/s at steps 10, 20, ..., 50 and once more at step 57;
    # the estimate follows each change 2 steps late
    rates = [{"wall": T0, "node": 0, "mbit": 100.0}]
    rates += [{"wall": T0 + k + 0.5, "node": 0, "mbit": 20.0 if j % 2 == 0 else 100.0}
              for j, k in enumerate((10, 20, 30, 40, 50, 57))]
    run = report.Run("kimad+", [], [], rates)
    shaped = [run.shaped_bps(T0 + i + 1) for i in range(60)]
    run.steps = [{"step": i, "t": i + 1.0, "train_s": i + 1.0, "wall": T0 + i + 1, "bytes": 1,
                  "bandwidth_bps": shaped[max(0, i - 2)]} for i in range(60)]
    assert report.recovery_steps(run) == [2, 2, 2, 2, 2]  # the change at step 57 has 3 steps after it
    rows = {t.what: (t.figure, t.met) for t in report.targets({"kimad+": run}, TARGET)}
    assert rows["kimad+: within ±15% of a new rate <= 5 steps after a change"] == (
        "5 changes: 5 within 5 steps; median 2, worst 2 steps", True)


def test_the_hedges_rate_is_reported_beside_the_estimators_recovery_for_information(logs):
    # The estimate lags the drop at step 20 by 7 steps (too late), while plans hedged at 21 Mbit/s from step 22:
    # the hedge's rate is within 15% of 20 Mbit/s 2 steps after the change. Not a target row: a separate line.
    rates = [{"wall": T0, "node": 0, "mbit": 100.0}, {"wall": T0 + 20.5, "node": 0, "mbit": 20.0}]
    run = report.Run("kimad+", [], [], rates)
    run.steps = [{"step": i, "t": i + 1.0, "train_s": i + 1.0, "wall": T0 + i + 1, "bytes": 1,
                  "bandwidth_bps": 100e6 if i < 27 else 20e6, "hedge": 22 <= i < 27,
                  "plan_bandwidth_bps": 21e6 if 22 <= i < 27 else (100e6 if i < 27 else 20e6)} for i in range(40)]
    assert report.recovery_steps(run) == [7]
    assert report.recovery_steps(run, report.working_bps) == [2]
    text = report.hedged_recovery_text([run, run])
    assert "within 15% of a new rate <= 5 steps after 2 of 2 changes (the estimator's own: 0 of 2)" in text
    unhedged = report.Run("kimad+", [{**s, "hedge": False} for s in run.steps], [], rates)
    assert report.hedged_recovery_text([unhedged]) is None  # nothing to add when no plan hedged
    # a probe's higher price is not an estimate: only hedged and lifted steps use the plan's rate
    probe = {"bandwidth_bps": 20e6, "plan_bandwidth_bps": 40e6, "hedge": False, "probe": True}
    assert report.working_bps(probe) == 20e6
    lift = {"bandwidth_bps": 20e6, "plan_bandwidth_bps": 95e6, "hedge": False, "lift": True}
    assert report.working_bps(lift) == 95e6
    lifted = report.Run("kimad+", [{**s, "hedge": False, "lift": s["hedge"]} for s in run.steps], [], rates)
    assert "after 1 of 1 changes (the estimator's own: 0 of 1)" in report.hedged_recovery_text([lifted])
    assert report.working_bps({"bandwidth_bps": 20e6}) == 20e6  # (logs from before plan_bandwidth_bps)
    assert "For information" not in report.write_report(logs).read_text()  # the fixture's Kimad+ never hedged
    steps = [json.loads(line) for line in (logs / "kimad+.jsonl").read_text().splitlines()]
    for s in steps:  # hedged plans at 21 Mbit/s on the first 3 steps after the drop
        if not s.get("eval"):
            hedged = 20 <= s["step"] < 23
            s.update(hedge=hedged, plan_bandwidth_bps=21e6 if hedged else s["bandwidth_bps"])
    write_jsonl(logs / "kimad+.jsonl", steps)
    assert ("taking the hedge's or lift's rate as kimad+'s estimate while a plan hedged or lifted, the estimate was "
            "within 15% of a new rate <= 5 steps after 1 of 1 changes (the estimator's own: 1 of 1)"
            in report.write_report(logs).read_text())


def test_comm_share_counts_steps_within_a_quarter_of_the_budget(logs):
    runs = report.load_runs(logs, ["static0.01", "kimad+"])
    assert report.comm_within_budget_share(runs["kimad+"]) == 1.0
    assert report.comm_within_budget_share(runs["static0.01"]) == 0.0  # half the budget is 50% off


def test_time_to_target_ratios_against_uncompressed_and_best_static(logs):
    rows = target_rows(logs)
    assert rows["kimad+ time-to-90% <= 0.5x uncompressed"] == ("0.20x (6.0 s vs 30.0 s)", True)
    assert rows["kimad+ time-to-90% <= 0.8x best static"] == ("0.60x (6.0 s vs 10.0 s)", True)
    assert rows["kimad+ final accuracy within 1 point of uncompressed"] == ("-0.5 points", True)


def test_the_time_targets_are_also_judged_at_the_harder_target(logs):
    # Kimad+ reaches 95% at 8 s, uncompressed at 40 s (its last evaluation), static 1% never in its 20 s
    synthetic_run(logs, "kimad+", step_s=0.2, accuracies=[0.7, 0.85, 0.91, 0.95], kimad=True)
    rows = target_rows(logs)
    assert rows["kimad+ time-to-95% <= 0.5x uncompressed"] == ("0.20x (8.0 s vs 40.0 s)", True)
    assert rows["kimad+ time-to-95% <= 0.8x best static"] == ("< 0.40x (baseline not reached in 20 s)", True)
    assert rows["kimad+ time-to-90% <= 0.8x best static"] == ("0.60x (6.0 s vs 10.0 s)", True)
    # a comparison whose target is the harder one already judges it once
    runs = report.load_runs(logs, ["none", "static0.01", "kimad+"])
    assert [t.what for t in report.targets(runs, 0.95)].count("kimad+ time-to-95% <= 0.8x best static") == 1


def test_a_kimad_method_at_its_own_budget_is_judged_on_its_own_rows(logs):
    # the same logs as "kimad+@0.25" (slower: 90% at 8 s); Kimad+ at the comparison's budget keeps its rows
    synthetic_run(logs, "kimad+@0.25", step_s=0.2, accuracies=[0.7, 0.85, 0.85, 0.91], kimad=True, comm_factor=2.0)
    runs = report.load_runs(logs, ["none", "static0.01", "kimad+", "kimad+@0.25"])
    rows = {t.what: (t.figure, t.met) for t in report.targets(runs, TARGET)}
    assert rows["kimad+ time-to-90% <= 0.8x best static"] == ("0.60x (6.0 s vs 10.0 s)", True)
    assert rows["kimad+@0.25 time-to-90% <= 0.8x best static"] == ("0.80x (8.0 s vs 10.0 s)", True)
    assert rows["kimad+@0.25: comm time within ±25% of budget on >= 80% of steps"] == ("0.0% of steps", False)
    assert "kimad+@0.25 final accuracy within 1 point of uncompressed" in rows


def test_a_target_never_reached_by_kimad_plus_is_not_met(logs):
    synthetic_run(logs, "kimad+", step_s=0.2, accuracies=[0.5, 0.6], kimad=True)
    figure, met = target_rows(logs)["kimad+ time-to-90% <= 0.5x uncompressed"]
    assert "not reached" in figure and met is False


def test_unshaped_runs_say_the_rate_targets_are_not_measurable(logs):
    for path in logs.glob("rates-*.jsonl"):
        path.unlink()
    figure, met = target_rows(logs)["kimad+: estimate within ±15% of shaped rate"]
    assert figure.startswith("n/a") and met is None


def test_every_method_trains_with_the_same_seed_and_its_own_log(tmp_path):
    args = parse_args(["--quick", "--seed", "7"])
    commands = {m: train_command(m, args, tmp_path / f"{m}.jsonl") for m in args.methods}
    assert args.methods == ["none", "static0.01", "kimad+"]
    for method, command in commands.items():
        assert command[command.index("--seed") + 1] == "7"
        assert command[command.index("--step-log") + 1] == str(tmp_path / f"{method}.jsonl")
    assert commands["static0.01"][commands["static0.01"].index("--allocator") + 1] == "static"
    # every method waits the same way and is evaluated the same way (the baselines included)
    assert all("--quiet-wait" in c and "--eval-after" in c for c in commands.values())


def test_each_static_method_runs_static_top_k_at_the_density_its_name_gives(tmp_path):
    statics = [m for m in METHODS if m.startswith("static")]
    assert {"static0.1", "static0.03", "static0.01"} <= set(statics)
    args = parse_args(["--methods", *statics])
    for method in statics:
        command = train_command(method, args, tmp_path / "log")
        assert command[command.index("--allocator") + 1] == "static"
        assert float(command[command.index("--density") + 1]) == float(method.removeprefix("static"))


def test_any_static_density_in_0_1_is_a_method_and_others_are_refused(tmp_path, capsys):
    args = parse_args(["--methods", "static0.2", "static0.05", "static1"])
    for method, density in zip(args.methods, ("0.2", "0.05", "1")):
        command = train_command(method, args, tmp_path / "log")
        assert command[command.index("--allocator") + 1] == "static"
        assert command[command.index("--density") + 1] == density
    for bad in ("static0", "static1.5", "static-0.1", "staticx", "static0.1@2"):
        with pytest.raises(SystemExit):
            parse_args(["--methods", bad])
        assert bad in capsys.readouterr().err


def test_a_kimad_method_may_carry_its_own_budget(tmp_path):
    args = parse_args(["--methods", "static0.1", "kimad+", "kimad+@0.25", "kimad@2", "--budget", "auto:0.7"])
    budgets = {m: (c := train_command(m, args, tmp_path / "log"))[c.index("--budget") + 1] for m in args.methods}
    assert budgets == {"static0.1": "auto:0.7", "kimad+": "auto:0.7", "kimad+@0.25": "auto:0.25", "kimad@2": "auto:2"}
    plain, budgeted = train_command("kimad+", args, tmp_path / "a"), train_command("kimad+@0.25", args, tmp_path / "a")
    assert [w for w in plain if w not in ("auto:0.7",)] == [w for w in budgeted if w != "auto:0.25"]


def test_the_no_lift_ablation_is_kimad_plus_with_the_lift_turned_off(tmp_path):
    args = parse_args(["--methods", "kimad+", "kimad+nolift", "kimad+nolift@1"])
    plain, ablated = (train_command(m, args, tmp_path / "log") for m in ("kimad+", "kimad+nolift"))
    assert ablated[ablated.index("--lift-trigger") + 1] == "inf" and "--lift-trigger" not in plain
    at_one = train_command("kimad+nolift@1", args, tmp_path / "log")
    assert at_one[at_one.index("--budget") + 1] == "auto:1" and "--lift-trigger" in at_one
    from kimad.bench.train import parse_args as train_args

    assert train_args(ablated[3:]).lift_trigger == math.inf and train_args(plain[3:]).lift_trigger == 2.0


@pytest.mark.parametrize("value", ["1", "0.5", "nan"])
def test_a_lift_trigger_of_one_or_less_exits_2(value, capsys):
    from kimad.bench.train import parse_args as train_args

    with pytest.raises(SystemExit) as exit_:
        train_args(["--lift-trigger", value])
    assert exit_.value.code == 2 and "--lift-trigger must be > 1" in capsys.readouterr().err


def test_without_root_it_says_so_and_runs_unshaped_on_localhost(tmp_path, monkeypatch, capsys):
    import kimad.emulate
    from kimad.bench import e2e

    def no_root() -> None:
        raise kimad.emulate.PrivilegeError("kimad.emulate needs root")

    ran = []

    def fake_localhost(method, args, out, bar):  # stands in for horovodrun: writes a tiny log
        ran.append(method)
        synthetic_run(out, method, step_s=0.5, accuracies=[0.95], kimad=False)
        (out / f"rates-{method}.jsonl").unlink()
        return 0

    monkeypatch.setattr(kimad.emulate, "require_privileges", no_root)
    monkeypatch.setattr(e2e, "run_localhost", fake_localhost)
    monkeypatch.setattr(e2e, "run_shaped", lambda *a: pytest.fail("shaped run without root"))
    path = e2e.run(parse_args(["--methods", "none", "fp16", "--out", str(tmp_path)]))
    assert ran == ["none", "fp16"]
    assert "WITHOUT shaping" in capsys.readouterr().err
    assert "**Unshaped**: 2 ranks on localhost (kimad.emulate needs root)" in path.read_text()


def test_the_training_clock_runs_from_the_latest_step_and_never_back():
    from kimad.bench.e2e import training_clock

    entry = {"step": 9, "t": 14.0, "train_s": 10.0, "wall": T0 + 14.0}  # 4 s of evaluations so far
    assert training_clock(entry, now=T0 + 16.5) == pytest.approx(12.5)
    assert training_clock(entry, now=T0 + 13.0) == 10.0  # a clock step back does not rewind training


def test_rate_changes_follow_the_training_clock_not_evaluations(tmp_path, monkeypatch):
    """A job that spends 3 s evaluating before 1 s of training meets the step-down at 1 s of training."""
    import kimad.emulate
    from kimad.bench import e2e
    from kimad.emulate.traces import RateChange

    applied: list[tuple[float, int, float]] = []
    started = []

    class FakeCluster:
        def __init__(self, nodes, trace, **kwargs):
            self.trace = (RateChange(0.0, 0, 100.0), RateChange(1.0, 0, 20.0))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def set_rate(self, node, mbit):
            applied.append((training_s[0], node, mbit))

    training_s = [0.0]

    def fake_job(cluster, command, env, out):  # evaluates 0.3 s, then trains 0.1 s per step
        import time as clock
        log = Path(command[command.index("--step-log") + 1])
        t0, eval_s = clock.time(), 0.0
        started.append(t0)
        with open(log, "a") as f:
            for step in range(16):
                if step == 1:
                    clock.sleep(0.3)
                    eval_s += 0.3
                clock.sleep(0.1)
                now = clock.time()
                training_s[0] = now - t0 - eval_s
                f.write(json.dumps({"step": step, "t": now - t0, "train_s": now - t0 - eval_s, "wall": now,
                                    "loss": 1.0}) + "\n")
                f.flush()
        return 0

    monkeypatch.setattr(kimad.emulate, "Cluster", FakeCluster)
    monkeypatch.setattr(kimad.emulate, "run_horovod", fake_job)

    class Bar:
        n = 0

        def set_postfix(self, **kw):
            pass

        def update(self, n):
            pass

    args = parse_args(["--methods", "kimad+", "--seconds", "2", "--out", str(tmp_path)])
    assert e2e.run_shaped("kimad+", args, tmp_path, Bar()) == 0
    assert [(node, mbit) for _, node, mbit in applied] == [(0, 20.0)]
    # the job's last logged training time when the change was applied: at most one step (0.1 s) behind
    # 1.0 s, at most one poll (0.1 s) and one step past it; by the wall clock (training plus the 0.3 s
    # evaluation) it would have been ~0.7 s
    assert 0.9 <= applied[0][0] <= 1.25


def test_every_job_runs_at_the_comparisons_horovod_cycle_time(tmp_path, monkeypatch):
    import subprocess

    import kimad.emulate
    from kimad.bench import e2e
    from kimad.emulate.traces import RateChange

    class FakeCluster:
        def __init__(self, nodes, trace, **kwargs):
            self.trace = (RateChange(0.0, 0, 100.0),)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    cycle_times = []

    def fake_job(cluster, command, env, out):
        cycle_times.append(env["HOROVOD_CYCLE_TIME"])
        return 0

    class FakeProc:
        pid, returncode = 0, 0

        def __init__(self, command, env, **kwargs):
            cycle_times.append(env["HOROVOD_CYCLE_TIME"])

        def poll(self):
            return 0

    class Bar:
        n = 0

    monkeypatch.setattr(kimad.emulate, "Cluster", FakeCluster)
    monkeypatch.setattr(kimad.emulate, "run_horovod", fake_job)
    monkeypatch.setattr(subprocess, "Popen", FakeProc)
    monkeypatch.setenv("HOROVOD_CYCLE_TIME", "7")  # the option wins over the caller's environment
    for given, expected in (([], f"{e2e.CYCLE_TIME_MS:g}"), (["--cycle-time-ms", "0.5"], "0.5")):
        args = parse_args(["--methods", "kimad+", "--seconds", "1", "--out", str(tmp_path), *given])
        cycle_times.clear()
        assert e2e.run_shaped("kimad+", args, tmp_path, Bar()) == 0
        assert e2e.run_localhost("kimad+", args, tmp_path, Bar()) == 0
        assert cycle_times == [expected, expected]


def test_the_report_names_the_horovod_cycle_time(logs):
    meta = json.loads((logs / "meta.json").read_text())
    assert "Horovod cycle time 5 ms" in report.write_report(logs).read_text()  # a comparison from before the option
    (logs / "meta.json").write_text(json.dumps({**meta, "cycle_time_ms": 1.0}))
    assert "Horovod cycle time 1 ms" in report.write_report(logs).read_text()


def repeated(tmp_path: Path, kimad_plus_accuracies: list[list[float]]) -> Path:
    """A comparison repeated once per list of Kimad+ accuracies (the baselines the same in every repeat)."""
    meta = {"workload": "mnist-digits-cnn", "nodes": 2, "trace": "step-down", "rate_mbit": 100.0, "seconds": 40.0,
            "budget": "auto", "eval_every_s": 1.0, "target": TARGET, "seed": 0, "shaped": True,
            "methods": ["none", "static0.01", "kimad+"], "started": "2027-01-01 00:00:00"}
    (tmp_path / "meta.json").write_text(json.dumps({**meta, "repeats": len(kimad_plus_accuracies)}))
    for i, accuracies in enumerate(kimad_plus_accuracies):
        d = tmp_path / f"repeat-{i + 1}"
        d.mkdir()
        (d / "meta.json").write_text(json.dumps(meta))
        synthetic_run(d, "none", step_s=1.0, accuracies=[0.5, 0.8, 0.91, 0.95], kimad=False)  # 90% at 30 s
        synthetic_run(d, "static0.01", step_s=0.5, accuracies=[0.6, 0.92, 0.93, 0.94], kimad=True)  # 90% at 10 s
        synthetic_run(d, "kimad+", step_s=0.2, accuracies=accuracies, kimad=True, lag_steps=i)  # 2, 4, 6 .. s
    return tmp_path


def test_a_repeated_comparison_reports_medians_and_judges_targets_on_them(tmp_path):
    # Kimad+ reaches 90% at 2, 6 and 4 s (evaluations every 2 s): against static's 10 s, 0.2x, 0.6x, 0.4x
    out = repeated(tmp_path, [[0.91, 0.92, 0.93, 0.94], [0.5, 0.6, 0.91, 0.94], [0.5, 0.91, 0.92, 0.93]])
    assert report.repeat_dirs(out) == [out / "repeat-1", out / "repeat-2", out / "repeat-3"]
    text = report.write_repeats_report(out).read_text()
    assert all((out / f"repeat-{i}" / "report.md").is_file() for i in (1, 2, 3))  # each repeat's own report
    assert "| kimad+ | 4.0 [2.0-6.0] | not reached | 94.0% [93.0%-94.0%] | 200.0 | 40 |" in text
    assert ("| kimad+ time-to-90% <= 0.8x best static | 0.20x (2.0 s vs 10.0 s) | 0.60x (6.0 s vs 10.0 s) | "
            "0.40x (4.0 s vs 10.0 s) | median 0.40x | yes |") in text
    # 1 point short in the median repeat (94% against 95%) meets "within 1 point", float rounding or not
    assert ("| kimad+ final accuracy within 1 point of uncompressed | -1.0 points | -1.0 points | -2.0 points | "
            "median -1.0 points | yes |") in text
    # recovery must hold after every change of every repeat: the estimate lags 0, 1 and 2 steps -> worst 2
    assert ("| kimad+: within ±15% of a new rate <= 5 steps after a change | 0 steps | 1 steps | 2 steps | "
            "worst 2 steps | yes |") in text


def test_a_repeated_target_is_judged_on_the_median_not_on_one_lucky_repeat(tmp_path):
    # Kimad+ reaches 90% at 2 s, at 8 s and never: against static's 10 s, 0.2x, 0.8x (the limit: met) and
    # infinitely slow; against uncompressed's 30 s, 0.07x, 0.27x and infinitely slow
    out = repeated(tmp_path, [[0.91, 0.92, 0.93, 0.94], [0.5, 0.6, 0.7, 0.91], [0.5, 0.6, 0.7, 0.5]])
    rows = report.aggregate_targets([report.targets(report.load_runs(d, ["none", "static0.01", "kimad+"]), TARGET)
                                     for d in report.repeat_dirs(out)])
    by_what = {first.what: (aggregate, met) for first, _, aggregate, met in rows}
    # 0.2x, 0.8x and not reached (infinitely slow): the median is 0.8x
    assert by_what["kimad+ time-to-90% <= 0.8x best static"] == ("median 0.80x", True)
    assert by_what["kimad+ time-to-90% <= 0.5x uncompressed"] == ("median 0.27x", True)
    # final accuracy 94%, 91% and 50% against 95%: the median repeat is 4 points short
    assert by_what["kimad+ final accuracy within 1 point of uncompressed"] == ("median -4.0 points", False)


def test_the_report_command_rewrites_a_repeated_comparison(tmp_path, capsys):
    out = repeated(tmp_path, [[0.91, 0.92, 0.93, 0.94], [0.5, 0.91, 0.92, 0.93]])
    assert report.main([str(out)]) == 0
    assert "repeated" in (out / "report.md").read_text().splitlines()[0]
    assert "| repeat 1 | repeat 2 | over repeats | met |" in capsys.readouterr().out


def test_repeats_run_every_method_in_turn_into_their_own_directories_each_starting_at_the_next(tmp_path, monkeypatch):
    import kimad.emulate
    from kimad.bench import e2e

    ran = []

    def fake_shaped(method, args, out, bar):  # stands in for the cluster: writes a tiny log
        ran.append((out.name, method))
        synthetic_run(out, method, step_s=0.5, accuracies=[0.95], kimad=method != "none")
        return 0

    monkeypatch.setattr(kimad.emulate, "require_privileges", lambda: None)
    monkeypatch.setattr(e2e, "run_shaped", fake_shaped)
    path = e2e.run(parse_args(["--methods", "none", "kimad+", "kimad", "--repeats", "3", "--out", str(tmp_path)]))
    # rotated: a drift of the machine over the comparison does not always land on the same method
    assert ran == [("repeat-1", "none"), ("repeat-1", "kimad+"), ("repeat-1", "kimad"),
                   ("repeat-2", "kimad+"), ("repeat-2", "kimad"), ("repeat-2", "none"),
                   ("repeat-3", "kimad"), ("repeat-3", "none"), ("repeat-3", "kimad+")]
    text = path.read_text()
    assert path == tmp_path / "report.md" and "3 repeats of the same comparison" in text
    assert "repeat i starts at the i-th method" in text
    assert json.loads((tmp_path / "meta.json").read_text())["repeats"] == 3
    assert "repeats" not in json.loads((tmp_path / "repeat-2" / "meta.json").read_text())


def test_a_comparison_removes_the_repeats_an_earlier_one_left_in_its_output(tmp_path, monkeypatch, capsys):
    import kimad.emulate
    from kimad.bench import e2e

    def fake_shaped(method, args, out, bar):
        synthetic_run(out, method, step_s=0.5, accuracies=[0.95], kimad=method != "none")
        return 0

    monkeypatch.setattr(kimad.emulate, "require_privileges", lambda: None)
    monkeypatch.setattr(e2e, "run_shaped", fake_shaped)
    e2e.run(parse_args(["--methods", "none", "--repeats", "3", "--out", str(tmp_path)]))
    (tmp_path / "repeat-notes").mkdir()  # not a repeat: left alone
    e2e.run(parse_args(["--methods", "none", "--repeats", "2", "--out", str(tmp_path)]))
    assert sorted(p.name for p in tmp_path.glob("repeat-*")) == ["repeat-1", "repeat-2", "repeat-notes"]
    e2e.run(parse_args(["--methods", "none", "--out", str(tmp_path)]))
    assert sorted(p.name for p in tmp_path.glob("repeat-*")) == ["repeat-notes"]
    assert "removing" in capsys.readouterr().err


def test_the_ranks_import_a_snapshot_of_the_code_and_the_report_names_its_commit(tmp_path, monkeypatch):
    import kimad.emulate
    from kimad.bench import e2e

    seen = []

    def fake_shaped(method, args, out, bar):
        seen.append(e2e.rank_environment(args.code_root)["PYTHONPATH"].split(os.pathsep)[0])
        synthetic_run(out, method, step_s=0.5, accuracies=[0.95], kimad=False)
        return 0

    monkeypatch.setattr(kimad.emulate, "require_privileges", lambda: None)
    monkeypatch.setattr(e2e, "run_shaped", fake_shaped)
    monkeypatch.setattr(e2e, "code_version", lambda: {"commit": "0123456789abcdef0123", "dirty": True})
    path = e2e.run(parse_args(["--methods", "none", "--out", str(tmp_path)]))
    assert seen == [str(tmp_path / "code")]
    assert (tmp_path / "code" / "kimad" / "bench" / "e2e.py").read_text() == Path(e2e.__file__).read_text()
    assert not list((tmp_path / "code").rglob("__pycache__"))
    assert "code 0123456789ab + local changes." in path.read_text()


def test_a_rank_started_in_the_checkout_imports_the_snapshot(tmp_path):
    import subprocess

    from kimad.bench.e2e import REPO_ROOT, rank_environment, snapshot_code

    code = snapshot_code(tmp_path)
    (code / "kimad" / "_where.py").write_text("print(__file__)\n")  # only the snapshot has this module
    # ranks run "python -m kimad.bench.train" from wherever the comparison was started, often the checkout
    for argv, module in ((["-c", "import kimad; print(kimad.__file__)"], "__init__.py"),
                         (["-m", "kimad._where"], "_where.py")):
        done = subprocess.run([sys.executable, *argv], cwd=REPO_ROOT, capture_output=True, text=True,
                              env=rank_environment(code), timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.strip() == str(code / "kimad" / module)


def test_the_code_version_is_this_checkouts_commit():
    from kimad.bench.e2e import code_version

    version = code_version()
    inside = shutil.which("git") and (Path(__file__).resolve().parents[1] / ".git").exists()
    if inside:  # (CI runs in a clone)
        assert len(version["commit"]) == 40 and isinstance(version["dirty"], bool)
    else:  # not a work tree, or no git: nothing claimed
        assert version == {"commit": None, "dirty": None}


# -- a real run across the emulated cluster (root) -----------------------------------------------
def test_two_node_kimad_training_completes_across_the_emulated_cluster(tmp_path):
    if os.geteuid() != 0:
        pytest.skip(f"the emulated cluster needs root; running as uid {os.geteuid()}")
    if shutil.which("ip") is None or shutil.which("tc") is None:
        pytest.skip("iproute2 (ip, tc) is not on PATH")
    pytest.importorskip("horovod.torch", reason="Horovod is not installed")
    from kimad.bench.e2e import rank_environment
    from kimad.emulate import Cluster, run_horovod

    log, plain_log = tmp_path / "kimad+.jsonl", tmp_path / "none.jsonl"
    train = [sys.executable, "-m", "kimad.bench.train", "--epochs", "1", "--eval-every-s", "1", "--eval-after",
             "--quiet-wait"]
    command = [*train, "--compression", "kimad", "--allocator", "layerwise", "--budget", "0.05", "--max-seconds", "3",
               "--step-log", str(log)]
    # uncompressed Horovod, waiting through the replaced synchronize (as every method of the comparison does)
    plain = [*train, "--compression", "none", "--max-seconds", "1", "--step-log", str(plain_log)]
    with Cluster(2, "constant", rate_mbit=100, log_path=tmp_path / "rates.jsonl") as cluster, \
            open(tmp_path / "ranks.out", "w") as console:
        code = run_horovod(cluster, command, env=rank_environment(), out=console)
        assert code == 0, (tmp_path / "ranks.out").read_text()[-3000:]
        code = run_horovod(cluster, plain, env=rank_environment(), out=console)
    assert code == 0, (tmp_path / "ranks.out").read_text()[-3000:]
    plain_steps = [json.loads(line) for line in plain_log.read_text().splitlines() if '"eval"' not in line]
    assert len(plain_steps) >= 2 and all(s["bytes"] == 4 * 421_770 for s in plain_steps)
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    steps = [e for e in entries if not e.get("eval")]
    assert len(steps) >= 5
    # the Kimad step's parts, disjoint intervals of it; the first step is all dense (its budget is unknown)
    parts = ("agree_s", "profile_s", "plan_s", "encode_s", "decode_s")
    assert all(0 <= s["comm_s"] + sum(s[k] for k in parts) <= s["kimad_step_s"] for s in steps)
    assert steps[0]["dense_route"] in ("allgather", "allreduce")
    assert all(s["bytes"] > 0 for s in steps) and steps[-1]["bytes"] < 4 * 421_770  # compressed once the link is known
    # --eval-after (as the comparison runs): snapshots taken during training, evaluated and logged after it
    evals = [e for e in entries if e.get("eval")]
    assert len(evals) >= 3 and entries[-len(evals):] == evals
    assert [e["train_s"] for e in evals] == sorted(e["train_s"] for e in evals)
    assert evals[-1]["step"] == len(steps) and all(0.0 <= e["accuracy"] <= 1.0 for e in evals)
    assert evals[-1]["accuracy"] > evals[0]["accuracy"]
    # the final line's training time leaves the evaluations out, those after training too
    final = json.loads(next(line for line in (tmp_path / "ranks.out").read_text().splitlines()
                            if '"workload"' in line and '"kimad"' in line).split(" ", 1)[1])
    assert final["train_s"] <= steps[-1]["train_s"] + 0.5 < final["wall_s"]


@pytest.mark.parametrize("argv, words", [(["--nodes", "1"], "--nodes must be >= 2"),
                                         (["--seconds", "0"], "must be > 0"),
                                         (["--period", "0"], "--period must be > 0 seconds"),
                                         (["--repeats", "0"], "--repeats must be >= 1"),
                                         (["--cycle-time-ms", "0"], "--cycle-time-ms must be in (0, 1000]"),
                                         (["--cycle-time-ms", "nan"], "--cycle-time-ms must be in (0, 1000]"),
                                         (["--budget", "auto:0"], "auto:F needs a fraction F > 0"),
                                         (["--budget", "auto:x"], "auto:F needs a fraction F > 0"),
                                         (["--budget", "-1"], "--budget must be > 0 seconds"),
                                         (["--budget", "fast"], "--budget must be seconds, 'auto' or 'auto:F'"),
                                         (["--methods", "kimad+@0"], "fraction F > 0"),
                                         (["--methods", "kimad+@x"], "fraction F > 0"),
                                         (["--methods", "static0.1@0.5"], "only kimad"),
                                         (["--methods", "none@1"], "only kimad"),
                                         (["--methods", "kimad++"], "unknown method"),
                                         (["--methods", "kimad+", "kimad+"], "names a method twice")])
def test_bad_comparison_options_exit_2_naming_the_option(argv, words, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_args(argv)
    assert exit_.value.code == 2 and words in capsys.readouterr().err


def test_a_budget_is_seconds_auto_or_a_fraction_of_the_compute_time():
    from kimad.bench.train import parse_budget

    assert parse_budget("0.05") == 0.05
    assert parse_budget("auto") == "auto"
    assert parse_budget("auto:1") == ("auto", 1.0)
    command = train_command("kimad+", parse_args(["--budget", "auto:1"]), Path("k.jsonl"))
    assert command[command.index("--budget") + 1] == "auto:1"


def test_the_report_names_a_fractional_auto_budget(logs):
    meta = json.loads((logs / "meta.json").read_text())
    (logs / "meta.json").write_text(json.dumps({**meta, "budget": "auto:1"}))
    assert "Kimad budget: auto (1 times the measured compute time of a step)" in report.write_report(logs).read_text()


def test_every_top_k_method_trains_with_the_comparisons_error_feedback(logs, tmp_path):
    from kimad.bench.train import parse_args as train_args

    for given, mode in (([], "ef21"), (["--error-feedback", "ef"], "ef")):
        args = parse_args(["--methods", "static0.1", "kimad+", "kimad+@0.25", *given])
        for method in args.methods:
            command = train_command(method, args, tmp_path / "log")
            assert command[command.index("--error-feedback") + 1] == mode
            assert train_args(command[3:]).error_feedback == mode  # what the rank parses
    meta = json.loads((logs / "meta.json").read_text())
    assert "error feedback EF21" in report.write_report(logs).read_text()  # a comparison from before the option
    (logs / "meta.json").write_text(json.dumps({**meta, "error_feedback": "ef"}))
    assert "classic error feedback (EF)" in report.write_report(logs).read_text()


def test_the_error_feedback_choices_are_the_plugins_modes():
    from kimad.bench.train import FEEDBACK_CHOICES
    from kimad.feedback import MODES

    assert FEEDBACK_CHOICES == tuple(mode or "none" for mode in MODES)
