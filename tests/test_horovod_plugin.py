"""Kimad as a Horovod compression plugin (kimad.horovod), on an unpatched Horovod 0.28.1 with Gloo.

Single-process tests drive ``compress``/``decompress`` by hand (with one rank, Horovod's optimizer
never calls them); multi-process tests launch tests/scripts/kimad_*.py under horovodrun with 2 or 4
local ranks, each with a timeout so a deadlock fails the test instead of hanging it.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import kimad
from kimad.errors import KimadError

SCRIPTS = Path(__file__).parent / "scripts"
ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def hvd():
    import horovod.torch as hvd

    hvd.init()
    return hvd


def horovodrun(script: str, *args: str, timeout: int = 240, np: int = 2) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "horovodrun"
    if not exe.exists():
        pytest.fail(f"horovodrun not found next to {sys.executable}; run `make setup` to build Horovod 0.28.1")
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
    return subprocess.run([str(exe), "-np", str(np), "-H", f"localhost:{np}", "--gloo", "--start-timeout", "120",
                           sys.executable, str(SCRIPTS / script), *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


def grads_of(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    model.zero_grad(set_to_none=True)
    model(torch.randn(8, 64, generator=g)).pow(2).sum().backward()


def run_step(compression, model):
    """What Horovod's synchronize() does: every compress first, then every decompress."""
    ctxs = [(p, *compression.compress(p.grad)) for p in model.parameters() if p.requires_grad]
    for _, empty, _ in ctxs:
        assert empty.numel() == 0  # Horovod's own allreduce carries nothing
    return {p: compression.decompress(empty, ctx) for p, empty, ctx in ctxs}


# -- construction -------------------------------------------------------------------------------
def test_import_kimad_does_not_import_horovod():
    code = "import sys, kimad; assert 'horovod' not in sys.modules and 'kimad.horovod' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))


def test_synchronize_sleeps_between_polls_and_returns_horovods_result(monkeypatch):
    import kimad.horovod as plugin

    polls, sleeps = iter([False, False, True]), []

    class FakeHorovod:
        poll = staticmethod(lambda handle: next(polls))
        synchronize = staticmethod(lambda handle: ("result of", handle))

    clock = iter([0.0, 0.0, 0.5])  # seconds: the start, then the time at each unfinished poll

    monkeypatch.setattr(plugin, "_horovod", lambda: FakeHorovod)
    monkeypatch.setattr(plugin.time, "sleep", sleeps.append)
    monkeypatch.setattr(plugin.time, "perf_counter", lambda: next(clock))
    assert plugin.synchronize(7) == ("result of", 7)
    # never a busy spin: one sleep per unfinished poll, 2% of the wait so far within the bounds
    assert sleeps == [plugin.POLL_INTERVAL_S, plugin.MAX_POLL_INTERVAL_S]


@pytest.mark.parametrize("options, match", [
    ({"allocator": "greedy"}, "unknown allocator 'greedy'"),
    ({"compressors": ("topk", "fp16")}, r"\['fp16'\] are not supported"),
    ({"error_feedback": "ef22"}, "unknown error_feedback 'ef22'"),
    ({"budget_s": -0.01}, "budget_s must be > 0"),
    ({"budget_s": "fast"}, "budget must be seconds"),
    ({"log_every": -1}, "log_every"),
    ({"min_byte_share": 1.5}, "min_byte_share"),
    ({"framing": 0.5}, "framing must be a finite number >= 1"),
    ({"lift_trigger": 1.0}, "lift_trigger must be a number > 1"),
    ({"hedge_trigger": float("nan")}, "hedge_trigger must be a number > 1"),
])
def test_bad_options_raise_named_kimad_errors(hvd, options, match):
    model = nn.Linear(64, 64)
    with pytest.raises(KimadError, match=match):
        kimad.Kimad(model.named_parameters(), **options)


def test_adasum_is_refused(hvd):
    with pytest.raises(KimadError, match="Average or hvd.Sum"):
        kimad.Kimad(nn.Linear(4, 4).named_parameters(), op=hvd.Adasum)


# -- one rank, driven by hand ----------------------------------------------------------------------
def test_a_tensor_that_is_no_registered_gradient_is_reported(hvd):
    model = nn.Linear(64, 64)
    compression = kimad.Kimad(model.named_parameters(), budget_s=1.0)
    grads_of(model)
    with pytest.raises(kimad.horovod.UnknownGradientError, match="not the .grad of any"):
        compression.compress(model.weight.grad.clone())


def test_dense_plan_without_feedback_returns_the_gradient_on_one_rank(hvd):
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 10))
    compression = kimad.Kimad(model.named_parameters(), budget_s=1e9, error_feedback=None)
    grads_of(model)
    out = run_step(compression, model)
    for p, got in out.items():
        assert torch.equal(got, p.grad)
    assert {t["option"] for t in compression.metrics["tensors"].values()} == {"dense32"}


def test_ef21_on_one_rank_sends_dense_and_hands_the_optimizer_the_gradient(hvd):
    # One rank moves no bytes, so even a tiny budget fits dense: h catches up with g and H = h = g.
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 10))
    compression = kimad.Kimad(model.named_parameters(), budget_s=2e-6, bandwidth_bps=1e9, latency_s=1e-7)
    for step in range(3):
        grads_of(model, step)
        for p, got in run_step(compression, model).items():
            assert got.shape == p.grad.shape and got.dtype == p.grad.dtype
            assert torch.allclose(got, p.grad, atol=1e-6)
    assert {t["option"] for t in compression.metrics["tensors"].values()} == {"dense32"}


def test_sparse_gradients_reduced_by_horovod_pass_through_decompress(hvd):
    compression = kimad.Kimad(nn.Linear(4, 4).named_parameters(), budget_s=1.0)
    reduced = torch.randn(3, 4).to_sparse()
    assert compression.decompress(reduced, None) is reduced  # Horovod gives ctx None for sparse gradients


def test_float16_and_bfloat16_gradients_come_back_in_their_dtype(hvd):
    for dtype in (torch.float16, torch.bfloat16):
        model = nn.Linear(64, 64).to(dtype)
        compression = kimad.Kimad(model.named_parameters(), budget_s=2e-6, bandwidth_bps=1e9, latency_s=1e-7)
        model.zero_grad()
        model(torch.randn(8, 64).to(dtype)).float().pow(2).sum().backward()
        for got in run_step(compression, model).values():
            assert got.dtype == dtype and torch.isfinite(got.float()).all()


def test_metrics_are_written_as_json_lines(hvd, tmp_path):
    model = nn.Linear(64, 64)
    path = tmp_path / "m.jsonl"
    compression = kimad.Kimad(model.named_parameters(), budget_s=1e-5, metrics_path=str(path))
    for step in range(2):
        grads_of(model, step)
        run_step(compression, model)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [m["step"] for m in lines] == [0, 1]
    for key in ("bandwidth_bps", "latency_s", "budget_s", "predicted_bytes", "actual_bytes", "predicted_comm_s",
                "actual_comm_s", "compute_s", "over_budget", "plan_digest", "tensors"):
        assert key in lines[-1], key
    assert lines[-1]["compute_s"] is not None and lines[0]["compute_s"] is None


def test_metrics_break_a_step_down_into_kimads_own_work_and_its_collectives(hvd):
    model = nn.Sequential(nn.Linear(64, 256), nn.Linear(256, 10))
    compression = kimad.Kimad(model.named_parameters(), budget_s=1e-3)
    grads_of(model)
    run_step(compression, model)
    m = compression.metrics
    parts = ("profile_s", "plan_s", "encode_s", "decode_s")
    assert all(m[k] >= 0.0 for k in (*parts, "allgather_s", "allreduce_s"))
    assert m["overhead_s"] == pytest.approx(sum(m[k] for k in parts))
    assert m["actual_comm_s"] == pytest.approx(m["allgather_s"] + m["allreduce_s"])
    # The parts and the collectives are disjoint intervals of the step.
    assert m["overhead_s"] + m["agree_s"] + m["actual_comm_s"] <= m["kimad_step_s"] + 1e-9
    # the agree message, float64: per tensor its squared norm, one error per density for the two weights (the
    # biases are below min_compress_numel), then 3 collective timings, the compute time, a flag and the fingerprint
    assert m["agree_bytes"] == 8 * (4 + 2 * len(compression.controller.densities) + 6)
    assert m["framing"] == pytest.approx(1514 / 1448)


def test_tensorboard_dir_gets_every_steps_scalars_and_per_tensor_density_and_bits(hvd, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 10))
    compression = kimad.Kimad(model.named_parameters(), budget_s=1e-3, tensorboard_dir=str(tmp_path / "tb"))
    steps = []
    for step in range(3):
        grads_of(model, step)
        run_step(compression, model)
        steps.append(compression.metrics)
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for key in ("bandwidth_bps", "latency_s", "budget_s", "predicted_bytes", "actual_bytes", "predicted_comm_s",
                "actual_comm_s", "agree_s", "compute_s", "overhead_s", "kimad_step_s", "predicted_error"):
        assert f"kimad/{key}" in tags, key
    for name in ("0.weight", "0.bias", "1.weight", "1.bias"):
        assert {f"kimad/density/{name}", f"kimad/bits/{name}"} <= tags
    actual = events.Scalars("kimad/actual_bytes")
    assert [e.step for e in actual] == [0, 1, 2]
    assert [e.value for e in actual] == [float(m["actual_bytes"]) for m in steps]
    assert [e.step for e in events.Scalars("kimad/compute_s")] == [1, 2]  # unknown on the first step
    # Dense on one rank: every entry sent, 32 bits per element.
    assert [e.value for e in events.Scalars("kimad/density/0.weight")] == [1.0] * 3
    assert [e.value for e in events.Scalars("kimad/bits/0.weight")] == [32.0] * 3


def test_tensorboard_dir_without_the_tensorboard_package_is_a_clear_error(hvd, monkeypatch):
    for module in [m for m in sys.modules
                   if m == "tensorboard" or m.startswith(("tensorboard.", "torch.utils.tensorboard"))]:
        monkeypatch.delitem(sys.modules, module)
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # `import tensorboard` now raises ImportError
    with pytest.raises(KimadError, match="needs the tensorboard package"):
        kimad.Kimad(nn.Linear(4, 4).named_parameters(), budget_s=1.0, tensorboard_dir="/nonexistent/tb")


def test_metrics_give_each_tensors_density_and_bits_per_element(hvd):
    model = nn.Linear(64, 64)
    compression = kimad.Kimad(model.named_parameters(), budget_s=1e9)
    grads_of(model)
    run_step(compression, model)
    assert compression.metrics["tensors"]["weight"]["density"] == 1.0
    assert compression.metrics["tensors"]["weight"]["bits"] == 32.0
    # no hedge or probe: the plan was priced at the estimate
    assert compression.metrics["plan_bandwidth_bps"] == compression.metrics["bandwidth_bps"]


def test_log_every_prints_one_summary_line_every_n_steps(hvd, capsys):
    model = nn.Linear(64, 64)
    compression = kimad.Kimad(model.named_parameters(), budget_s=1e-3, log_every=2)
    for step in range(4):
        grads_of(model, step)
        run_step(compression, model)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("kimad step")]
    assert [line.split(":")[0] for line in lines] == ["kimad step 1", "kimad step 3"]


def test_a_gradient_handed_over_as_a_copy_is_named_by_the_calling_optimizers_p(hvd):
    # Horovod's sparse_as_dense passes p.grad.to_dense(), a new tensor, from _allreduce_grad_async(self, p).
    model = nn.Linear(64, 64)
    compression = kimad.Kimad(model.named_parameters(), budget_s=1.0)
    grads_of(model)

    class Optimizer:
        def __init__(self):
            self._compression, self.op = compression, None

        def _allreduce_grad_async(self, p):
            return compression.compress(p.grad.clone())

    opt = Optimizer()
    for p in model.parameters():
        empty, ctx = opt._allreduce_grad_async(p)
    assert ctx.name == "bias"


def test_state_dict_restores_feedback_controller_and_step(hvd):
    model = nn.Linear(64, 64)
    a = kimad.Kimad(model.named_parameters(), budget_s="auto", error_feedback="ef")
    for step in range(3):
        grads_of(model, step)
        run_step(a, model)
    b = kimad.Kimad(model.named_parameters(), budget_s="auto", error_feedback="ef")
    b.load_state_dict(a.state_dict())
    assert b.step == 3
    assert b.controller.state_dict() == a.controller.state_dict()
    assert b.budget.budget_s() == a.budget.budget_s()
    for name, e in a._feedback.local.items():
        assert torch.equal(b._feedback.local[name], e)


# -- two ranks under horovodrun -------------------------------------------------------------------
def assert_both_ranks(proc, marker: str, np: int = 2) -> None:
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    for rank in range(np):
        assert f"{marker}: rank {rank}" in output, output[-6000:]


# Four ranks on this 2-core machine take ~16 s a run: the variants where the rank count matters
# (averaging over more ranks, the grouped allreduce) run at 4 too.
@pytest.mark.horovod
@pytest.mark.timeout(300)
@pytest.mark.parametrize("args, np", [
    ((), 2),                                          # Average, SGD, zero_grad() setting grads to None
    (("--op", "sum", "--optimizer", "adam"), 2),
    (("--bpps", "2", "--keep-grads"), 2),             # backward_passes_per_step=2, grads zeroed in place
    (("--dtype", "float16"), 2),
    (("--groups", "2", "--op", "sum"), 2),            # grouped allreduce: op read through a list comprehension
    ((), 4),
    (("--groups", "2", "--op", "sum"), 4),
    (("--ride",), 4),                                 # the dense buffer rides in the allgather at 4 ranks
], ids=["average-np2", "sum-adam-np2", "bpps2-np2", "fp16-np2", "groups-sum-np2", "average-np4", "groups-sum-np4",
        "ride-np4"])
def test_all_dense_plan_equals_plain_horovod(args, np):
    assert_both_ranks(horovodrun("kimad_equivalence.py", *args, np=np), "kimad equivalence", np=np)


@pytest.mark.horovod
@pytest.mark.timeout(300)
def test_qsgd_and_sign_plans_aggregate_every_ranks_message_and_update_the_feedback_state():
    # Forced (tiny budget) and budget-chosen QSGD/sign plans under EF21, EF and none: the script checks every
    # quantised tensor's gradient against a plain decode of all ranks' messages, and each rank's state update.
    proc = horovodrun("kimad_quant.py")
    assert_both_ranks(proc, "kimad quant")
    output = proc.stdout + proc.stderr
    assert output.count("kimad quant: rank 0") == 5, output[-6000:]
    for option in ("qsgd2", "qsgd8", "sign"):
        assert f"'{option}'" in output, output[-6000:]


@pytest.mark.horovod
@pytest.mark.timeout(300)
def test_topk_ef21_trains_digits_within_a_few_points_of_uncompressed():
    proc = horovodrun("kimad_train.py")
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    results = [json.loads(m) for m in re.findall(r"kimad train: (\{.*\})", output)]
    assert len(results) == 2, output[-6000:]
    r = results[0]
    print(f"\nDigitsCNN, 2 ranks, {r['steps']} steps: uncompressed {r['plain_accuracy']:.3f}, Kimad top-k+EF21 "
          f"{r['kimad_accuracy']:.3f} at {r['kimad_median_bytes'] / r['dense_bytes']:.1%} of the dense bytes")
    assert r["kimad_median_bytes"] < 0.25 * r["dense_bytes"]
    assert r["plain_accuracy"] > 0.9
    assert r["kimad_accuracy"] > r["plain_accuracy"] - 0.02  # 3 epochs; run-to-run noise is about 2 points


@pytest.mark.horovod
@pytest.mark.timeout(300)
@pytest.mark.parametrize("np", [2, 4])
def test_a_static_plan_skips_the_agree_allgather_and_averages_every_ranks_top_k_ef21(np):
    proc = horovodrun("kimad_static.py", timeout=180, np=np)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    results = [json.loads(m) for m in re.findall(r"kimad static: (\{.*\})", output)]
    assert len(results) == 1 and results[0]["world"] == np and results[0]["steps"] == 6, output[-6000:]


@pytest.mark.horovod
@pytest.mark.timeout(300)
@pytest.mark.parametrize("np", [2, 4])
@pytest.mark.parametrize("static", [False, True], ids=["kimad", "static"])
def test_a_plan_mismatch_stops_every_rank_without_hanging(np, static):
    # static: no agree allgather (and so no fingerprint) before the row's; the row's size and digest stop the ranks
    proc = horovodrun("kimad_mismatch.py", *(["--static"] if static else []), timeout=180, np=np)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-6000:]
    for rank in range(np):
        message = rf"\[{rank}\]<stderr>:kimad\.horovod\.PlanMismatchError: plan mismatch at step 0 on rank {rank}"
        assert re.search(message, output), output[-6000:]
    assert "was NOT stopped" not in output


def budget_result(returncode: int, output: str) -> dict:
    """The figures ``tests/scripts/kimad_budget.py`` printed (its ``kimad budget: {...}`` line), once it exited 0."""
    assert returncode == 0, output[-6000:]
    (line,) = re.findall(r"kimad budget: (\{.*\})", output)
    return json.loads(line)


@pytest.mark.horovod
@pytest.mark.timeout(300)
def test_measured_communication_time_tracks_a_fixed_budget():
    # Budget: a quarter of the measured dense allreduce time, so compression is needed for it to bind.
    def run(attempt: int) -> dict:
        proc = horovodrun("kimad_budget.py", "--steps", "40", "--warmup", "10", "--fraction", "0.25")
        r = budget_result(proc.returncode, proc.stdout + proc.stderr)
        print(f"\nrun {attempt}: budget {r['budget_s'] * 1e3:.2f} ms (dense allreduce "
              f"{r['dense_allreduce_s'] * 1e3:.1f} ms, timings spread {r['dense_spread']:.2f}x): measured comm "
              f"within +-25% on {r['within_25pct']:.0%} of steps, median comm/budget {r['median_ratio']:.2f}, "
              f"{r['median_bytes'] / r['dense_bytes']:.2%} of dense bytes")
        # Always true: the budget binds (compression is used) and every plan within budget predicts <= budget.
        assert r["median_bytes"] < 0.5 * r["dense_bytes"]
        assert all(p is None or p <= 1.0 + 1e-9 for p in r["predicted_ratios"])
        assert all(q > 0.0 for q in r["ratios"])
        # and the metrics name the samples the estimator was fed: the previous step's collectives
        assert r["link_samples_disagree"] == []
        return r

    # Kimad's claim holds on a stable link only; on a loaded machine the timings themselves vary more than 25%.
    # A +-25% claim is checked where the dense allreduce's own timings stay within 1.25x of each other: at 1.46x
    # (CI, session 6) comm was within +-25% on 74% of steps, with no probing plan (4 direct runs on localhost:
    # 56-74% at 1.9-3.7x, none probing). The shaped-link test below checks the same claim and never skips. The
    # dense timings are taken before the Kimad steps, and the machine's other tenants can load it in between (CI,
    # session 10: 51% within 25% after a stable dense allreduce): a run that misses is repeated once.
    r = run(1)
    if r["dense_spread"] <= 1.25 and r["within_25pct"] < 0.8:
        r = run(2)
    if r["dense_spread"] > 1.25:
        pytest.skip(f"link not stable here: the dense allreduce took from 1x to {r['dense_spread']:.2f}x its fastest "
                    f"time; measured comm within +-25% of the budget on {r['within_25pct']:.0%} of steps")
    assert r["within_25pct"] >= 0.8, r["ratios"]


@pytest.mark.horovod
@pytest.mark.timeout(400)
def test_measured_communication_time_tracks_a_fixed_budget_on_a_shaped_link(tmp_path):
    # The same claim on a link whose rate the kernel enforces (2 emulated nodes, HTB at 50 Mbit/s): there the
    # link, not this machine's CPU load, sets the collectives' times, so the claim is checked, never skipped.
    # The estimate, in wire bits (TCP/Ethernet framing, the default), reads the shaped rate within 15%.
    # This machine's 2 cores are shared with other tenants: in 1 of ~10 CI runs (session 10) 40% of the steps took
    # 1.3-1.7x the others for the whole run (comm within +-25% on 44% of steps, estimate 38 Mbit/s; 100% and 48
    # Mbit/s in each of 3 reruns right after). So a run that misses is repeated once, and the second must hold.
    if os.geteuid() != 0:
        pytest.skip(f"the emulated cluster needs root; running as uid {os.geteuid()}")
    from kimad.bench.e2e import rank_environment
    from kimad.emulate import Cluster, run_horovod

    def run(attempt: int) -> dict:
        log = tmp_path / f"ranks-{attempt}.out"
        with Cluster(2, "constant", rate_mbit=50, log_path=tmp_path / f"rates-{attempt}.jsonl") as cluster, \
                open(log, "w") as out:
            code = run_horovod(cluster, [sys.executable, str(SCRIPTS / "kimad_budget.py"), "--width", "512",
                                         "--steps", "40", "--warmup", "10"], env=rank_environment(), out=out)
        r = budget_result(code, log.read_text())
        print(f"\nshaped 50 Mbit/s, run {attempt}: budget {r['budget_s'] * 1e3:.1f} ms, estimate "
              f"{r['bandwidth_bps'] / 1e6:.1f} Mbit/s; measured comm within +-25% on {r['within_25pct']:.0%} of "
              f"steps, median comm/budget {r['median_ratio']:.2f}; probing plans at steps {r['probe_steps']}, "
              f"hedged at {r['hedge_steps']}, lifted at {r['lift_steps']}; the allgather's row size was cached on "
              f"{r['row_cached_share']:.0%} of steps")
        assert r["median_bytes"] < 0.5 * r["dense_bytes"]
        return r

    def holds(r: dict) -> bool:
        return (r["within_25pct"] >= 0.8 and 0.75 <= r["median_ratio"] <= 1.25
                and r["bandwidth_bps"] == pytest.approx(50e6, rel=0.15))

    first = run(1)
    r = first if holds(first) else run(2)
    assert r["within_25pct"] >= 0.8, (f"comm/budget {r['ratios']}; probing plans at steps {r['probe_steps']}, "
                                      f"hedged at {r['hedge_steps']}, lifted at {r['lift_steps']}; estimate "
                                      f"{r['bandwidth_bps'] / 1e6:.1f} Mbit/s (the first run: within 25% on "
                                      f"{first['within_25pct']:.0%} of steps)")
    assert 0.75 <= r["median_ratio"] <= 1.25
    assert r["bandwidth_bps"] == pytest.approx(50e6, rel=0.15)
    # a fixed budget on a steady link: the allgather's row sizes repeat, so Horovod's cached negotiation holds
    assert r["row_cached_share"] >= 0.8


def test_resnet18_for_32x32_images_has_resnet18s_parameters():
    from kimad.bench.resnet import ResNet18, synthetic_images

    model = ResNet18()
    assert sum(p.numel() for p in model.parameters()) == 11_173_962
    x, y = synthetic_images(2, step=0, rank=0)
    assert model(x).shape == (2, 10) and y.shape == (2,)
    assert torch.equal(synthetic_images(2, 0, 1)[0], synthetic_images(2, 0, 1)[0])
    assert not torch.equal(synthetic_images(2, 0, 0)[0], synthetic_images(2, 0, 1)[0])


@pytest.mark.horovod
@pytest.mark.timeout(300)
def test_overhead_benchmark_runs_a_static_one_percent_plan_on_resnet18(tmp_path):
    # benchmarks/overhead.py launches itself under horovodrun (2 ranks); a tiny run checks its accounting.
    out = tmp_path / "overhead.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "overhead.py"), "--steps", "1", "--warmup", "1",
                           "--batch-size", "2", "--json", str(out)], capture_output=True, text=True, timeout=240,
                          env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    assert "machine: " in proc.stdout and "of its step (target <= 5%)" in proc.stdout
    r = json.loads(out.read_text())
    assert r["ranks"] == 2 and r["parameters"] == 11_173_962
    assert r["kimad_options"] == ["dense32", "topk0.01"]  # top-k 1% for large tensors, dense for small ones
    assert r["plain_bytes_per_rank"] == 4 * r["parameters"]
    # 1% of the elements at 4 bytes each (bfloat16 value + 16-bit block offset) is at most a 100x reduction.
    assert 80 < r["byte_reduction"] < 100
    assert 0 < r["overhead_ms"] < r["kimad_step_ms"]


def checkpoint_models(directory: Path):
    return [torch.load(directory / f"rank{r}.pt", weights_only=False)["model"] for r in range(2)]


@pytest.mark.horovod
@pytest.mark.timeout(600)
def test_checkpoint_restore_is_bit_exact(tmp_path):
    full, split, control = tmp_path / "full", tmp_path / "split", tmp_path / "control"
    for d in (full, split, control):
        d.mkdir()
    assert_both_ranks(horovodrun("kimad_checkpoint.py", str(full), "--steps", "6"), "kimad checkpoint")
    assert_both_ranks(horovodrun("kimad_checkpoint.py", str(split), "--steps", "3"), "kimad checkpoint")
    for f in split.iterdir():
        (control / f.name).write_bytes(f.read_bytes())
    assert_both_ranks(horovodrun("kimad_checkpoint.py", str(split), "--start", "3", "--steps", "3", "--resume"),
                      "kimad checkpoint")
    assert_both_ranks(horovodrun("kimad_checkpoint.py", str(control), "--start", "3", "--steps", "3", "--resume",
                                 "--without-kimad-state"), "kimad checkpoint")
    for a, b, c in zip(checkpoint_models(full), checkpoint_models(split), checkpoint_models(control)):
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert not all(torch.equal(a[k], c[k]) for k in a)  # without Kimad's state the run diverges


def test_an_auto_budget_object_sets_the_fraction_of_compute_time(hvd):
    from kimad.control import AutoBudget

    compression = kimad.Kimad(nn.Linear(4, 4).named_parameters(), budget_s=AutoBudget(fraction=1.0))
    compression.budget.observe_compute(0.04)
    assert compression.budget.budget_s() == pytest.approx(0.04)




def test_the_row_grid_is_geometric_in_multiples_of_8_bytes_and_the_same_built_any_way():
    from kimad.horovod import ROW_GRID_PERCENT, row_grid

    rows = sorted({row_grid(n) for n in range(0, 200_000, 7)})
    assert rows[0] == 8 and all(r % 8 == 0 for r in rows)
    for a, b in zip(rows, rows[1:]):  # consecutive: ROW_GRID_PERCENT apart (rounded down to 8 bytes), at least 8
        assert b - a == max(8, a * ROW_GRID_PERCENT // 100 // 8 * 8)
    for n in (0, 1, 8, 9, 1000, 123_457):  # the smallest grid row at or above n
        up = row_grid(n)
        assert up >= n and (up == 8 or rows[rows.index(up) - 1] < n)
    assert row_grid(rows[40]) == rows[40] and row_grid(rows[40] + 1) == rows[41]
    with pytest.raises(kimad.KimadError, match="int >= 0"):
        row_grid(-1)
    with pytest.raises(kimad.KimadError, match="int >= 0"):
        row_grid(2.5)


def test_a_plan_targets_the_largest_grid_row_its_byte_budget_holds(hvd):
    from kimad.control.cost import CostModel
    from kimad.horovod import DIGEST_PREFIX_BYTES, row_grid

    compression = kimad.Kimad(nn.Linear(64, 64).named_parameters(), budget_s=1e-3)
    cost = CostModel(bandwidth_bps=1e8, latency_s=1e-4, world_size=4, batched=True)
    assert compression._target_row(cost, 1e-3, 10**6) is None  # one rank: nothing crosses a link
    compression.world_size = 4  # (its rule; one real rank sends no bytes)
    compression._row = (40_000, 1_000)  # last step: 1 kB of dense float32 rode along

    def price(row):  # the row's contents as the plan prices them: dense as dense, the rest as top-k bytes
        return (cost.message_time("topk", max(0, row - 1_000 - DIGEST_PREFIX_BYTES - 3))
                + cost.message_time("dense32", 1_000))

    for budget in (price(40_000), price(40_000) * 1.02, price(123_456), price(2_000)):
        row, seconds = compression._target_row(cost, budget, 10**6)
        assert row == row_grid(row) and seconds == price(row) <= budget < price(row_grid(row + 1))
    assert compression._target_row(cost, 0.9 * price(8), 10**6) is None  # not even the smallest row fits
    assert compression._target_row(cost, price(2 * 10**6), 10**6) is None  # everything dense fits: no target


def test_ranks_with_different_options_or_state_have_different_fingerprints(hvd):
    model = nn.Linear(64, 64)
    a, b = (kimad.Kimad(model.named_parameters(), budget_s=s) for s in (1e-3, 2e-3))
    grads = [p.detach().clone() for p in model.parameters()]
    names = [n for n, _ in model.named_parameters()]
    same = kimad.Kimad(model.named_parameters(), budget_s=1e-3)
    assert a._fingerprint(names, grads) == same._fingerprint(names, grads) != b._fingerprint(names, grads)
    fingerprint = a._fingerprint(names, grads)
    assert fingerprint == int(fingerprint) and 0 <= fingerprint < 2**48  # exact in the agree row's float64
    same.step = 5
    assert same._fingerprint(names, grads) != fingerprint
    assert a._fingerprint(names[:1], grads[:1]) != fingerprint


def test_gathered_rows_whose_digests_differ_raise_a_plan_mismatch(hvd):
    from types import SimpleNamespace

    from kimad.horovod import PlanMismatchError

    compression = kimad.Kimad(nn.Linear(4, 4).named_parameters(), budget_s=1e-3)
    compression.world_size = 2
    prefix = torch.arange(8, dtype=torch.uint8)
    rows = torch.zeros(2, 16, dtype=torch.uint8)
    rows[:, :8] = prefix
    plan = SimpleNamespace(budget_s=1e-3, total_bytes=8)
    compression._verify(rows.view(-1), prefix, 16, plan)  # every rank planned the same
    rows[1, 3] += 1
    with pytest.raises(PlanMismatchError, match=r"plan mismatch at step 0 on rank 0: .*rank 1 digest 0001020404"):
        compression._verify(rows.view(-1), prefix, 16, plan)
    with pytest.raises(PlanMismatchError, match="gathered 24 bytes, expected 32"):
        compression._verify(rows.view(-1)[:24], prefix, 16, plan)


def test_a_steps_allgather_row_holds_its_message_in_multiples_of_8_bytes(hvd):
    from kimad.horovod import row_grid

    model = nn.Sequential(nn.Linear(64, 256), nn.Linear(256, 10))
    compression = kimad.Kimad(model.named_parameters(), budget_s=1e-3)
    for step in range(3):
        grads_of(model, step)
        run_step(compression, model)
        m = compression.metrics
        assert m["actual_bytes"] % 8 == 0 and m["actual_bytes"] >= m["predicted_bytes"]
        # one rank plans all-dense: the message's own size (no grid padding), the same row every step
        assert m["row"] == m["actual_bytes"] < row_grid(m["actual_bytes"] + 1)
        assert m["row_cached"] is (step > 0)
