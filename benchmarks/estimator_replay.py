"""Replay the link times of a real emulated-cluster run through a fresh BandwidthEstimator (a dev tool).

    python benchmarks/estimator_replay.py [RUN_DIR ...] [--method kimad+] [--old REV] [--warmup N]

Inputs, per run directory (written by ``python -m kimad.bench``): ``<method>.jsonl`` (one JSON line per
step; evaluation rows are skipped) and ``rates-<method>.jsonl`` (the shaped rate over time, with wall
clock). Where a step logged ``link_samples`` (runs from session 11 on), those are fed as logged: exactly the
``[collective, bytes per rank, link seconds]`` samples the plugin's estimator got at that step. Older logs are
paired up: each step's ``bytes`` (bytes per rank of its allgather) is paired with the next step's
``prev_link_comm_s`` (that allgather's link time, seconds: the minimum over ranks) and fed as one
allgather sample over the run's ranks (``meta.json``'s ``nodes``) at the next step, the step at which the
plugin learned it; so is its small "agree" allgather (``agree_bytes`` with the next step's
``prev_link_agree_s``) where the log has its size (runs from session 5 on; older logs replay without it).
Then the estimate that step would plan with is read. The "new" estimator counts ``--framing`` wire bytes
per payload byte (default the plugin's, TCP over Ethernet; the logged estimate of runs before framing
existed is the payload rate).

Output, per run and estimator (this worktree's ``kimad.control.estimator`` as "new", the one at git
revision ``--old`` as "old", and the estimate the run itself logged as "logged"): the median absolute
relative error of the bandwidth estimate against the shaped rate at the step's wall clock (MdAPE, over
steps from ``--warmup`` on), the worst ratio estimate / rate (or its inverse) after warm-up, the share of
steps within 15% and, after each rate change, the steps until the estimate is first within 15% of the new
rate and until it stays there up to the next change (``-`` when never). A last row, "samples", is no
estimator: the median rate the data samples since the latest change imply, told when the rate changed
(:func:`sample_oracle`): how soon the samples themselves showed a new rate.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import math
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from kimad.control.cost import TCP_ETHERNET_FRAMING  # noqa: E402  (this checkout's, like the "new" estimator)

DEFAULT_RUNS = [ROOT / "runs" / "e2e4-up", ROOT / "runs" / "e2e4-down"]


def load_estimator_class(rev: str | None):
    """BandwidthEstimator of this worktree (``rev=None``) or of ``git show REV:kimad/control/estimator.py``."""
    if rev is None:
        from kimad.control.estimator import BandwidthEstimator
        return BandwidthEstimator
    source = subprocess.run(["git", "show", f"{rev}:kimad/control/estimator.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / f"estimator_{rev.replace('/', '_')}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module.BandwidthEstimator


def read_run(run: Path, method: str) -> tuple[list[dict], list[tuple[float, float]]]:
    """The run's training rows (in order) and its rate changes ``(wall clock s, bits/s)`` of node 0."""
    rows = [json.loads(line) for line in (run / f"{method}.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if not r.get("eval") and "step" in r and "wall" in r]
    rates = [json.loads(line) for line in (run / f"rates-{method}.jsonl").read_text().splitlines() if line.strip()]
    changes = sorted((r["wall"], r["mbit"] * 1e6) for r in rates if r.get("node", 0) == 0)
    return rows, changes


def rate_at(changes: list[tuple[float, float]], wall: float) -> float:
    current = changes[0][1]
    for when, bps in changes:
        if when <= wall:
            current = bps
    return current


def world_size(run: Path) -> int:
    """The run's ranks (its ``meta.json``'s ``nodes``; 4 for a run directory without one)."""
    meta = run / "meta.json"
    return int(json.loads(meta.read_text())["nodes"]) if meta.is_file() else 4


def replay(estimator_class, rows: list[dict], world: int = 4, **options) -> list[float]:
    """The bandwidth estimate (bits/s) each row's step would plan with, ``world`` ranks (``options`` go to
    the estimator)."""
    est = estimator_class(**options)
    estimates = []
    for prev, row in zip([None] + rows[:-1], rows):
        if "link_samples" in row:  # the very samples the plugin fed its estimator at this step
            for collective, nbytes, seconds in row["link_samples"]:
                est.add(collective, world, int(nbytes), float(seconds), int(row["step"]))
            estimates.append(est.estimate().bandwidth_bps)
            continue
        for size, time in (("bytes", "prev_link_comm_s"), ("agree_bytes", "prev_link_agree_s")):
            if prev is not None and prev.get(size) is not None and row.get(time) is not None:
                est.add("allgather", world, int(prev[size]), float(row[time]), int(row["step"]))
        estimates.append(est.estimate().bandwidth_bps)
    return estimates


def sample_oracle(rows: list[dict], changes: list[tuple[float, float]], world: int, framing: float) -> list[float]:
    """What the samples themselves say, told when the rate changed: at each step, the median rate implied by the
    data allgathers since the latest change (``wire bits / (seconds - latency terms x latency)``, the latency the
    run had logged at the change held), the first of them, which may straddle the change, left out once there
    are others. Not an estimator (it knows the change times): where it is slow to come within 15% of a new rate,
    the samples the plan sent did not show the rate sooner."""
    from kimad.control.cost import latency_terms, link_bytes

    out, implied, current, latency = [], [], None, None
    for i, row in enumerate(rows):
        rate_start = max((w for w, _ in changes if w <= row["wall"]), default=None)
        if rate_start != current:  # a new rate: start over, holding the latency logged now
            current, implied, latency = rate_start, [], row.get("latency_s") or 0.0
            first = i
        # the sample of step i - 1 is known at step i
        prev = rows[i - 1] if i > first else None
        if prev is not None and row.get("prev_link_comm_s") and prev.get("bytes"):
            bits = 8 * framing * link_bytes("allgather", world, float(prev["bytes"]))
            busy = row["prev_link_comm_s"] - latency_terms("allgather", world) * latency
            if busy > 0:
                implied.append(bits / busy)
        seen = implied[1:] if len(implied) > 1 else implied
        out.append(statistics.median(seen) if seen else (out[-1] if out else math.nan))
    return out


def score(rows: list[dict], estimates: list[float], changes: list[tuple[float, float]], warmup: int) -> dict:
    rates = [rate_at(changes, r["wall"]) for r in rows]
    kept = [(r["step"], e, bw) for r, e, bw in zip(rows, estimates, rates)
            if r["step"] >= warmup and e is not None and e == e]
    errors = [abs(e / bw - 1) for _, e, bw in kept]
    result = {"mdape": statistics.median(errors), "within15": sum(x <= 0.15 for x in errors) / len(errors),
              "worst": max(max(e / bw, bw / e) for _, e, bw in kept), "recovery": []}
    for (when, bps), (until, _) in zip(changes[1:], changes[2:] + [(float("inf"), None)]):
        after = [(r, e) for r, e in zip(rows, estimates) if when <= r["wall"] < until and e is not None]
        if not after:
            continue
        ok = [abs(e / bps - 1) <= 0.15 for _, e in after]
        first = next((i for i, x in enumerate(ok) if x), None)
        stays = next((i for i in range(len(ok)) if all(ok[i:])), None)
        result["recovery"].append((first, stays))
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="*", type=Path, default=DEFAULT_RUNS, help="run directories")
    p.add_argument("--method", default="kimad+", help="the method's log to replay (default kimad+)")
    p.add_argument("--old", default="main", help="git revision of the old estimator (default main)")
    p.add_argument("--warmup", type=int, default=5, help="steps left out of the error figures (default 5)")
    p.add_argument("--framing", type=float, default=TCP_ETHERNET_FRAMING,
                   help="wire bytes per payload byte of the new estimator, and of an old one that has framing "
                        "(default 1514/1448, the plugin's)")
    args = p.parse_args()
    missing = [str(run) for run in args.runs if not (run / f"{args.method}.jsonl").is_file()]
    if missing:
        p.error(f"not a run directory with {args.method}.jsonl: {', '.join(missing)}")
    estimators = {"old": load_estimator_class(args.old), "new": load_estimator_class(None)}
    print(f"{'run':<12} {'estimator':<9} {'MdAPE':>7} {'in 15%':>7} {'worst x':>8}  steps to within 15% "
          "after each change (first / for good)")
    for run in args.runs:
        rows, changes = read_run(run, args.method)
        candidates = {"logged": [r.get("bandwidth_bps") for r in rows]}
        world = world_size(run)
        # an old estimator that knows framing counts the same wire bytes as the new one (older ones: payload)
        old_framing = "framing" in inspect.signature(estimators["old"]).parameters
        candidates["old"] = replay(estimators["old"], rows, world, **({"framing": args.framing} if old_framing else {}))
        candidates["new"] = replay(estimators["new"], rows, world, framing=args.framing)
        if any("latency_s" in r for r in rows):
            candidates["samples"] = sample_oracle(rows, changes, world, args.framing)
        for name, estimates in candidates.items():
            s = score(rows, estimates, changes, args.warmup)
            rec = ", ".join(f"{'-' if a is None else a} / {'-' if b is None else b}" for a, b in s["recovery"])
            print(f"{run.name:<12} {name:<9} {s['mdape']:>7.1%} {s['within15']:>7.1%} {s['worst']:>8.1f}  {rec}")


if __name__ == "__main__":
    main()
