"""benchmarks/estimator_replay.py: what it feeds the estimator from a run's step log (not its figures)."""

import json

import pytest
from conftest import load_benchmark

from kimad.control.estimator import BandwidthEstimator

WORLD = 4


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("estimator_replay")


def link_seconds(nbytes: int, bps: float, latency_s: float = 1e-3) -> float:
    """A ring allgather of ``nbytes`` per rank over ``WORLD`` ranks on a ``bps`` link (payload bits)."""
    return (WORLD - 1) * (latency_s + 8 * nbytes / bps)


def logged_rows(steps: int = 30, change_at: int = 15) -> list[dict]:
    """A step log with ``link_samples``: 100 then 20 Mbit/s, a data and an agree allgather per step, and
    ``bytes`` / ``prev_link_comm_s`` fields that contradict the samples (the replay must not read them)."""
    rows = []
    for step in range(steps):
        bps = 100e6 if step < change_at else 20e6
        samples = [] if step == 0 else [["allgather", 40_000 + 100 * step, link_seconds(40_000 + 100 * step, bps)],
                                        ["allgather", 200, link_seconds(200, bps)]]
        rows.append({"step": step, "wall": 1000.0 + step, "bytes": 1, "prev_link_comm_s": 9.0,
                     "agree_bytes": 1, "prev_link_agree_s": 9.0, "link_samples": samples})
    return rows


def test_logged_link_samples_are_replayed_exactly_as_the_plugin_fed_them(bench):
    rows = logged_rows()
    replayed = bench.replay(BandwidthEstimator, rows, WORLD, framing=1.0)
    direct, estimator = [], BandwidthEstimator(framing=1.0)
    for row in rows:
        for collective, nbytes, seconds in row["link_samples"]:
            estimator.add(collective, WORLD, nbytes, seconds, row["step"])
        direct.append(estimator.estimate().bandwidth_bps)
    assert replayed == direct
    # and the estimate follows the logged link, not the contradicting paired fields
    assert replayed[14] == pytest.approx(100e6, rel=0.05) and replayed[-1] == pytest.approx(20e6, rel=0.05)


def test_logs_without_link_samples_pair_each_step_with_the_next_steps_link_time(bench):
    rows = [{"step": s, "wall": 1000.0 + s, "bytes": 50_000, "agree_bytes": 200,
             "prev_link_comm_s": None if s == 0 else link_seconds(50_000, 50e6),
             "prev_link_agree_s": None if s == 0 else link_seconds(200, 50e6)} for s in range(12)]
    estimates = bench.replay(BandwidthEstimator, rows, WORLD, framing=1.0)
    assert estimates[-1] == pytest.approx(50e6, rel=0.05)


def test_a_run_directory_reads_back_its_steps_and_node_0s_rate_changes(bench, tmp_path):
    rows = logged_rows(steps=4)
    (tmp_path / "kimad+.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows)
                                           + json.dumps({"eval": True, "step": 3, "wall": 1003.5}) + "\n")
    (tmp_path / "rates-kimad+.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in ({"wall": 1000.0, "node": 0, "mbit": 100},
                                                {"wall": 1000.0, "node": 1, "mbit": 50},
                                                {"wall": 1002.0, "node": 0, "mbit": 20})))
    steps, changes = bench.read_run(tmp_path, "kimad+")
    assert [r["step"] for r in steps] == [0, 1, 2, 3]
    assert changes == [(1000.0, 100e6), (1002.0, 20e6)]
    assert bench.rate_at(changes, 1001.5) == 100e6 and bench.rate_at(changes, 1002.0) == 20e6


def test_a_path_that_is_no_run_directory_exits_2_naming_it(bench, tmp_path, monkeypatch, capsys):
    (tmp_path / "run.log").write_text("not a run\n")
    monkeypatch.setattr("sys.argv", ["estimator_replay.py", str(tmp_path / "run.log")])
    with pytest.raises(SystemExit) as exit_:
        bench.main()
    assert exit_.value.code == 2 and "not a run directory with kimad+.jsonl" in capsys.readouterr().err
