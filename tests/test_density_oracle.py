"""benchmarks/density_oracle.py on a synthetic comparison whose figures are known in closed form."""

import json

import pytest
from conftest import load_benchmark

from kimad.bench.report import read_comparison

PHASE_S, FAST, SLOW, T0 = 5.0, 100.0, 20.0, 1000.0
# static density -> (steps to the target, step seconds on the fast link, on the slow link)
METHODS = {"static0.1": (100, 0.1, 0.3), "static0.01": (200, 0.06, 0.08)}


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("density_oracle")


def rate_at(t: float) -> float:
    return FAST if int(t // PHASE_S) % 2 == 0 else SLOW


def write_method(out, name: str, steps_needed: int, fast_s: float, slow_s: float, seconds: float = 40.0) -> None:
    """A step log on the square trace (each step as long as the rate at its start says), an evaluation after
    every step (accuracy 0.95 from step ``steps_needed`` on), and the applied rates of two nodes."""
    lines, t, k = [], 0.0, 0
    while t < seconds:
        t += fast_s if rate_at(t) == FAST else slow_s
        k += 1
        step_s = fast_s if rate_at(t - 1e-9) == FAST else slow_s
        lines.append({"step": k - 1, "train_s": t, "wall": T0 + t, "step_s": step_s, "bytes": 1})
        lines.append({"eval": True, "step": k, "train_s": t, "wall": T0 + t,
                      "accuracy": 0.95 if k >= steps_needed else 0.5})
    (out / f"{name}.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    rates = [{"wall": T0 + j * PHASE_S, "node": n, "mbit": rate_at(j * PHASE_S)}
             for j in range(int(seconds // PHASE_S) + 1) for n in range(2)]
    (out / f"rates-{name}.jsonl").write_text("\n".join(json.dumps(x) for x in rates))


@pytest.fixture
def comparison(tmp_path):
    for name, figures in METHODS.items():
        write_method(tmp_path, name, *figures)
    write_method(tmp_path, "kimad+", 150, 0.07, 0.09)
    meta = {"workload": "digits", "target": 0.9, "methods": [*METHODS, "kimad+"], "repeats": 0}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    return tmp_path


def test_predictions_and_oracle_match_the_closed_form(bench, comparison):
    result = bench.analyse(read_comparison(comparison)[1], 0.9)
    assert result["rates"] == [SLOW, FAST]
    rows = result["statics"]
    assert rows["static0.1"]["steps"] == 100 and rows["static0.01"]["steps"] == 200
    assert rows["static0.1"]["step_s"] == pytest.approx({FAST: 0.1, SLOW: 0.3})
    # static 10%: 5 s fast = 0.5 of the way (10 s a unit), 5 s slow = 1/6 (30 s a unit), then 3.33 s fast
    assert rows["static0.1"]["predicted"] == pytest.approx(13.333, abs=0.15)
    # static 1%: 5/12 + 5/16 of the way after 10 s, then 0.271 x 12 s fast
    assert rows["static0.01"]["predicted"] == pytest.approx(13.25, abs=0.15)
    # the model is exact for a run that follows it: predicted = measured
    for row in rows.values():
        assert row["predicted"] == pytest.approx(row["measured"], abs=0.15)
    # the oracle runs 10% on the fast link (10 s a unit against 12) and 1% on the slow one (16 against 30)
    assert result["oracle_choice"] == {FAST: "static0.1", SLOW: "static0.01"}
    assert result["oracle"] == pytest.approx(11.875, abs=0.15)
    assert result["ceiling"] == pytest.approx(11.875 / 13.25, abs=0.02)
    runs = read_comparison(comparison)[1]
    assert result["others"] == {"kimad+": runs["kimad+"].steps[149]["train_s"]}  # measured only: its 150th step
    assert "oracle (static0.1 at 100" not in bench.render(result, "t")  # rates listed in ascending order
    assert "static0.01 at 20, static0.1 at 100" in bench.render(result, "t")


def test_main_prints_both_targets(bench, comparison, capsys):
    assert bench.main([str(comparison)]) == 0
    out = capsys.readouterr().out
    assert "### target 0.9" in out and "### target 0.95" in out
    assert "Oracle over the best static (predicted): **0.90x**" in out


def test_needs_two_static_densities(bench, comparison, capsys):
    (comparison / "static0.01.jsonl").unlink()
    with pytest.raises(ValueError, match="at least two static"):
        bench.analyse(read_comparison(comparison)[1], 0.9)
    with pytest.raises(SystemExit) as exc:
        bench.main([str(comparison)])
    assert exc.value.code == 2 and "at least two static" in capsys.readouterr().err


def test_refuses_a_path_that_is_no_comparison(bench, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main([str(tmp_path)])
    assert exc.value.code == 2 and "no comparison directory" in capsys.readouterr().err


def test_model_ceiling_needs_a_swing_and_a_density_dependence(bench):
    assert bench.model_ceiling(0.4, 1.0) == pytest.approx(1.0, abs=1e-4)  # no swing: one density is the oracle
    ratios = [bench.model_ceiling(0.4, swing) for swing in (2, 5, 10)]
    assert ratios == sorted(ratios, reverse=True) and ratios[-1] < 0.95  # the larger the swing, the more to gain
    assert bench.model_ceiling(0.4, 5.0) == pytest.approx(0.933, abs=0.003)
    with pytest.raises(ValueError, match="alpha"):
        bench.model_ceiling(1.0, 5.0)
    with pytest.raises(ValueError, match="swing"):
        bench.model_ceiling(0.4, 0.5)


def test_model_table_and_its_bad_input(bench, capsys):
    assert bench.main(["--model", "--alpha", "0.4", "--swing", "5", "20"]) == 0
    assert "| 0.4 | 0.933x | 0.865x |" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        bench.main(["--model", "--alpha", "1.5"])
    assert exc.value.code == 2 and "--alpha" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        bench.main([])
    assert exc.value.code == 2 and "--model" in capsys.readouterr().err
