"""benchmarks/density_steps.py: the simulated workers' compression and its plan option (not its figures)."""

import pytest
from conftest import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("density_steps")


def test_a_plan_parses_and_bad_ones_are_named_errors(bench):
    assert bench.parse_plan("a.weight=0.1,b=1") == {"a.weight": 0.1, "b": 1.0}
    for bad in ("a=0", "a=1.5", "a=x", "=0.1", "a"):
        with pytest.raises(ValueError, match="--plan"):
            bench.parse_plan(bad)
    with pytest.raises(SystemExit):  # argparse reports it and exits 2
        bench.parse_args(["--plan", "a=2"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--densities", "0"])


def test_dense_sends_everything_and_top_k_loses_a_share_of_the_error_feedback_difference(bench):
    dense = bench.train("digits-cnn", 1.0, workers=2, seed=0, max_steps=3, eval_every=3)
    assert dense["delta"] == [0.0, 0.0, 0.0]
    sparse = bench.train("digits-cnn", 0.01, workers=2, seed=0, max_steps=3, eval_every=3)
    assert all(0.0 < d < 1.0 for d in sparse["delta"])
    # a plan compressing only the large classifier loses less than top-k 1% on every large tensor
    plan = bench.train("digits-cnn", {"classifier.1.weight": 0.01}, workers=2, seed=0, max_steps=3, eval_every=3)
    assert all(0.0 < p < s for p, s in zip(plan["delta"], sparse["delta"]))
    assert set(dense["steps"]) == {0.90, 0.95}


def test_a_plan_naming_a_tensor_the_model_lacks_is_refused_before_training_with_its_names(bench, capsys):
    with pytest.raises(SystemExit):  # at parse time: argparse names the model's tensors and exits 2
        bench.parse_args(["--plan", "classifier.1.weight=0.1,nope.weight=0.1"])
    err = capsys.readouterr().err
    assert "['nope.weight']" in err and "classifier.1.weight" in err
    assert bench.parse_args(["--plan", "classifier.1.weight=0.1"]).plan == [{"classifier.1.weight": 0.1}]
    with pytest.raises(SystemExit):
        bench.parse_args(["--workload", "stdlib-lm", "--plan", "classifier.1.weight=0.1"])  # not the LM's
    with pytest.raises(ValueError, match="classifier.1.weight"):  # train() called directly says the same
        bench.train("digits-cnn", {"nope.weight": 0.1}, workers=2, seed=0, max_steps=1, eval_every=1)


def test_classic_error_feedback_averages_the_messages_and_keeps_the_residual(bench):
    ef = bench.train("digits-cnn", 0.01, workers=2, seed=0, max_steps=3, eval_every=3, feedback="ef")
    ef21 = bench.train("digits-cnn", 0.01, workers=2, seed=0, max_steps=3, eval_every=3)
    assert all(0.0 < d < 1.0 for d in ef["delta"])
    # step 1 is the same message (zero state) under both modes; from step 2 on EF compresses g + e, EF21 g - h
    assert ef["delta"][0] == ef21["delta"][0] and ef["delta"][1:] != ef21["delta"][1:]
    with pytest.raises(ValueError, match="feedback"):
        bench.train("digits-cnn", 0.01, workers=2, seed=0, max_steps=1, eval_every=1, feedback="ef14")
    assert bench.parse_args(["--error-feedback", "ef21", "ef"]).error_feedback == ["ef21", "ef"]
    with pytest.raises(SystemExit):
        bench.parse_args(["--error-feedback", "none"])


def test_the_table_has_one_dense_row_and_a_row_per_mode_of_each_density(bench, capsys, tmp_path):
    out = tmp_path / "rows.json"
    assert bench.main(["--densities", "1", "0.01", "--error-feedback", "ef21", "ef", "--seeds", "1",
                       "--max-steps", "2", "--eval-every", "2", "--workers", "2", "--json", str(out)]) == 0
    import json

    rows = json.loads(out.read_text())["rows"]
    assert [(r["density"], r["error_feedback"]) for r in rows] == [(1.0, "ef21"), (0.01, "ef21"), (0.01, "ef")]
    table = capsys.readouterr().out
    assert "| 0.01 | EF21 |" in table and "| 0.01 | EF |" in table and "| 1 | - |" in table
