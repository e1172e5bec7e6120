"""benchmarks/control_step.py: its profiles, its rows and its arguments (not its timings)."""

import json

import pytest
import torch
from conftest import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("control_step")


def test_profiles_are_the_exact_top_k_errors_of_one_vector_per_parameter(bench):
    model = torch.nn.Linear(40, 50)  # weight 2000, bias 50
    profiles = bench.profiles_of(model, (1.0, 0.1, 0.001))
    assert [(p.name, p.numel) for p in profiles] == [("weight", 2000), ("bias", 50)]
    weight = profiles[0]
    gen = torch.Generator().manual_seed(0)
    squares = torch.randn(2000, generator=gen, dtype=torch.float64).square()
    assert weight.sq_norm == pytest.approx(float(squares.sum()))
    kept = squares.sort(descending=True).values
    assert weight.topk_errors == pytest.approx((0.0, float(kept[200:].sum()), float(kept[2:].sum())))
    bias = profiles[1]  # 50 elements: density 0.001 keeps k = 1 entry, its largest square
    assert bias.topk_errors[0] == 0.0 and bias.topk_errors[1] < bias.topk_errors[2] < bias.sq_norm


def test_a_short_run_writes_one_row_per_model_and_allocator(bench, tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert bench.main(["--models", "digits-cnn", "stdlib-lm", "--steps", "6", "--warmup", "2", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["model"], r["tensors"], r["allocator"]) for r in rows] == [
        ("digits-cnn", 10, "layerwise"), ("digits-cnn", 10, "uniform"),
        ("stdlib-lm", 30, "layerwise"), ("stdlib-lm", 30, "uniform")]
    for r in rows:
        assert 0 < r["fit_ms"] and 0 < r["plan_ms"] and 0 < r["digest_ms"] and 0 < r["compute_ms"]
        assert r["control_ms"] >= max(r["fit_ms"], r["plan_ms"], r["digest_ms"])
        assert r["ratio"] == pytest.approx(r["control_ms"] / r["compute_ms"])
    assert "control/compute" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["--steps", "0"], ["--warmup", "5", "--steps", "5"], ["--models", "vgg"]])
def test_bad_arguments_exit_with_a_message(bench, argv):
    with pytest.raises(SystemExit):
        bench.parse_args(argv)
