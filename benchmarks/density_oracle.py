"""How much any per-rate density schedule could gain over the best static density, from a comparison's logs.

    python benchmarks/density_oracle.py RUN_DIR [--targets 0.9 0.95]
    python benchmarks/density_oracle.py --model [--alpha 0.3 0.4 0.46] [--swing 5 10 20 50]

RUN_DIR is a comparison of ``python -m kimad.bench e2e`` (with or without ``--repeats``) that ran static top-k
at several densities (methods ``static<d>``, :func:`kimad.bench.report.static_density`) on a trace that moves
between a few link rates (``square``: two).
Per repeat and static method it reads the steps the method took to each target and its median step time at each
shaped rate (the slowest node's, at the step's end). Then it models progress as linear in steps: a step at
density d brings ``1 / steps(d)`` of the way to the target, whatever density came before. Under this model:

- each static method's time to target on the repeat's own trace (on the training clock, as the trace is played)
  is predicted; set beside the measured time it tells how far to trust the model;
- the *oracle* schedule runs, at each rate, the density with the least time per unit of progress,
  ``steps(d) x step_s(d, rate)``, switching with the link at no cost; its predicted time over the best static
  method's predicted time is the ceiling of what adapting the density to the link can gain here. Where that
  ratio is above a target ratio (issue 6: 0.8x), no density schedule, Kimad+'s included, can meet it on this
  workload and machine, as far as the model holds.

``--model`` needs no run: with steps to target ``~ d**-alpha`` (measured on the digits CNN: alpha 0.4-0.46 with
EF21, ~0.3 with classic EF; ``benchmarks/density_steps.py``) and a step of ``c + k d / rate`` (compute plus
bits, no latency), the oracle's time over the best static density's on a square wave that spends equal time
at ``rate`` and ``rate / swing`` depends on alpha and the swing alone (:func:`model_ceiling`): a table of it.

The model ignores that early steps gain more than late ones (it credits a schedule for the steps it runs, not
for when), and the error feedback's memory across a density change. Methods that are not ``static<d>`` (such
as ``kimad+``) are listed with their measured times only. Output: one table per target and repeat, then the
medians over the repeats.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from kimad.bench import report  # noqa: E402
from kimad.bench.report import Run, evaluation_target, harder_target, read_comparison, repeat_dirs  # noqa: E402


def rate_of(run: Run, step: dict) -> float | None:
    """The shaped rate (Mbit/s, the slowest node's) when ``step`` ended; ``None`` unshaped."""
    bps = run.shaped_bps(step["wall"])
    return None if bps is None else round(bps / 1e6, 3)


def steps_to(run: Run, target: float) -> int | None:
    """Training steps taken before the first evaluation that reached ``target`` (``None``: never)."""
    t = run.time_to_target(target)
    return None if t is None else sum(1 for s in run.steps if s["train_s"] <= t + 1e-9)


def step_times(run: Run) -> dict[float, float]:
    """Median step seconds at each shaped rate (Mbit/s)."""
    by_rate: dict[float, list[float]] = {}
    for step in run.steps:
        rate = rate_of(run, step)
        if rate is not None:
            by_rate.setdefault(rate, []).append(step["step_s"])
    return {rate: statistics.median(times) for rate, times in by_rate.items()}


def trace_segments(run: Run) -> list[tuple[float, float, float]]:
    """``(start, end, rate)`` on the training clock, one per step of ``run``: the trace as that run saw it."""
    segments, start = [], 0.0
    for step in run.steps:
        rate = rate_of(run, step)
        if rate is not None and step["train_s"] > start:
            segments.append((start, step["train_s"], rate))
        start = max(start, step["train_s"])
    return segments


def predicted_time(segments, seconds_per_progress: dict[float, float]) -> float | None:
    """Training seconds until progress reaches 1 along ``segments``, progressing ``1 / seconds_per_progress[rate]``
    a second at each rate (``None``: not within the segments, or a rate without a figure)."""
    done = 0.0
    for start, end, rate in segments:
        per = seconds_per_progress.get(rate)
        if per is None or not math.isfinite(per):
            return None
        gain = (end - start) / per
        if done + gain >= 1.0:
            return start + (1.0 - done) * per
        done += gain
    return None


def analyse(runs: dict[str, Run], target: float) -> dict:
    """One repeat's figures for one target: per static method its density, steps to target, step time per
    rate, predicted and measured time; the oracle's density per rate and predicted time; other methods'
    measured times."""
    statics = {name: d for name in runs if (d := report.static_density(name)) is not None}
    if len(statics) < 2:
        raise ValueError(f"the oracle needs at least two static<d> methods, found {sorted(statics)}")
    reference = max(runs.values(), key=lambda r: r.steps[-1]["train_s"] if r.steps else 0.0)
    segments = trace_segments(reference)
    if not segments:
        raise ValueError("the comparison logged no shaped rate (unshaped runs have no link to adapt to)")
    rates = sorted({rate for _, _, rate in segments})
    rows = {}
    for name, density in statics.items():
        run, steps = runs[name], steps_to(runs[name], target)
        times = step_times(run)
        per = {rate: steps * times[rate] for rate in rates if steps and rate in times}
        rows[name] = {"density": density, "steps": steps, "step_s": times, "per_progress": per,
                      "predicted": predicted_time(segments, per) if steps else None,
                      "measured": run.time_to_target(target)}
    oracle_choice, oracle_per = {}, {}
    for rate in rates:
        known = {n: r["per_progress"][rate] for n, r in rows.items() if rate in r["per_progress"]}
        if known:
            oracle_choice[rate] = min(known, key=known.get)
            oracle_per[rate] = known[oracle_choice[rate]]
    oracle = predicted_time(segments, oracle_per)
    predicted = [r["predicted"] for r in rows.values() if r["predicted"] is not None]
    best = min(predicted) if predicted else None
    others = {name: run.time_to_target(target) for name, run in runs.items() if name not in statics}
    return {"rates": rates, "statics": rows, "oracle_choice": oracle_choice, "oracle": oracle,
            "best_static": best, "ceiling": oracle / best if oracle and best else None, "others": others}


def model_ceiling(alpha: float, swing: float) -> float:
    """The oracle's time to target over the best static density's (the ``--model`` of the module docstring):
    steps ``d**-alpha``, a step ``1 + d / rate``, equal time at rate 1 and ``1 / swing``; the progress rate is
    the mean of the two phases' (a long run), the oracle takes each phase's best density, the static one the
    best single density (searched on a log grid, 400 points a decade over 1e-6..1e6)."""
    if not (0 < alpha < 1) or not (math.isfinite(swing) and swing >= 1):
        raise ValueError(f"need 0 < alpha < 1 and a finite swing >= 1, got alpha={alpha!r}, swing={swing!r}")

    def per_progress(d: float, rate: float) -> float:
        return d ** -alpha * (1.0 + d / rate)

    def time(f_fast: float, f_slow: float) -> float:
        return 2.0 / (1.0 / f_fast + 1.0 / f_slow)

    best_d = alpha / (1.0 - alpha)  # argmin of per_progress at rate 1 (it scales with the rate)
    oracle = time(per_progress(best_d, 1.0), per_progress(best_d / swing, 1.0 / swing))
    static = min(time(per_progress(d, 1.0), per_progress(d, 1.0 / swing))
                 for d in (10 ** (i / 400) for i in range(-2400, 2401)))
    return oracle / static


def _s(x: float | None, fmt: str = "{:.1f}") -> str:
    return "-" if x is None else fmt.format(x)


def render(result: dict, title: str) -> str:
    """One analysis as a Markdown table."""
    rates = result["rates"]
    head = ["method", "steps to target"] + [f"step at {r:g} Mbit/s (ms)" for r in rates] + \
        ["predicted (s)", "measured (s)"]
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in sorted(result["statics"].items(), key=lambda kv: -kv[1]["density"]):
        cells = [name, _s(row["steps"], "{:d}")] + [_s(1e3 * row["step_s"][r] if r in row["step_s"] else None)
                                                   for r in rates]
        lines.append("| " + " | ".join(cells + [_s(row["predicted"]), _s(row["measured"])]) + " |")
    choice = ", ".join(f"{result['oracle_choice'].get(r, '-')} at {r:g}" for r in rates)
    lines.append("| oracle (" + choice + ") | | " + " | " * len(rates) + _s(result["oracle"]) + " | |")
    for name, measured in result["others"].items():
        lines.append(f"| {name} | | " + " | " * len(rates) + f" | {_s(measured)} |")
    lines += ["", f"Oracle over the best static (predicted): **{_s(result['ceiling'], '{:.2f}x')}**", ""]
    return "\n".join(lines)


def _median(values) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_dir", type=Path, nargs="?", help="a comparison's output directory (e2e --out)")
    p.add_argument("--targets", type=float, nargs="+", default=None,
                   help="accuracies (digits) or validation losses (LM) to reach (default: the report's two)")
    p.add_argument("--model", action="store_true", help="print the model's ceiling per alpha and swing (no run)")
    p.add_argument("--alpha", type=float, nargs="+", default=[0.3, 0.4, 0.46],
                   help="--model: exponents of steps to target ~ density**-alpha, each in (0, 1)")
    p.add_argument("--swing", type=float, nargs="+", default=[5, 10, 20, 50],
                   help="--model: ratios of the fast rate to the slow one, each >= 1")
    args = p.parse_args(argv)
    if args.model:
        if any(not 0 < a < 1 for a in args.alpha) or any(not (math.isfinite(w) and w >= 1) for w in args.swing):
            p.error("--alpha needs values in (0, 1) and --swing finite values >= 1")
        print("| alpha | " + " | ".join(f"swing {w:g}x" for w in args.swing) + " |")
        print("|---|" + "---:|" * len(args.swing))
        for alpha in args.alpha:
            print(f"| {alpha:g} | " + " | ".join(f"{model_ceiling(alpha, w):.3f}x" for w in args.swing) + " |")
        return 0
    if args.run_dir is None:
        p.error("give a comparison's directory, or --model")
    if not (args.run_dir / "meta.json").is_file():
        p.error(f"{args.run_dir} is no comparison directory (no meta.json)")
    dirs = repeat_dirs(args.run_dir) or [args.run_dir]
    read = [read_comparison(d) for d in dirs]
    comparisons = [runs for _, runs in read]
    if not all(comparisons):
        p.error(f"{args.run_dir} holds a repeat without any method's log")
    metric, target = evaluation_target(read[0][0])
    targets = args.targets or sorted({target, harder_target(metric, target)}, reverse=metric == "val_loss")
    for target in targets:
        try:
            results = [analyse(runs, target) for runs in comparisons]
        except ValueError as error:
            p.error(f"{args.run_dir}: {error}")
        for d, result in zip(dirs, results):
            print(render(result, f"target {target:g}, {d.name}"))
        if len(results) > 1:
            ceilings = [r["ceiling"] for r in results]
            kimad = {n: _median(r["others"].get(n) for r in results) for n in results[0]["others"]}
            best = _median(min((s["measured"] for s in r["statics"].values() if s["measured"]), default=None)
                           for r in results)
            print(f"target {target:g}, {len(results)} repeats: oracle over best static (predicted) "
                  f"{', '.join(_s(c, '{:.2f}x') for c in ceilings)}, median {_s(_median(ceilings), '{:.2f}x')}; "
                  f"best static measured {_s(best)} s" +
                  "".join(f"; {n} measured {_s(t)} s" for n, t in kimad.items()) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
