"""The end-to-end comparison: Kimad against its peers, training a real model on the emulated cluster.

    python benchmarks/e2e.py --nodes 2 --trace step-down --rate 100 --seconds 60 --out runs/e2e
    python benchmarks/e2e.py --workload stdlib-lm --nodes 2 --seconds 60 --out runs/e2e-lm
    python -m kimad.bench e2e --quick

One Horovod job per method, same seed, each on a freshly set-up cluster whose bandwidth trace plays
on that job's training clock (evaluations excluded; so every method sees the same rate at the same
training time): uncompressed Horovod, Horovod's fp16, static top-k + EF (the GRACE/DGC
baseline, through Kimad's plugin with ``allocator="static"``) at 10% and 1% (any density D on request as
``static<D>``), Kimad (uniform) and Kimad+ (layerwise). Each job trains ``--workload`` (the digits CNN,
or the language model on the standard library's source) for ``--seconds`` of training time and evaluates
it (test accuracy, or validation loss) every ``--eval-every-s`` seconds of training (snapshots of the weights, evaluated
after training so that evaluation never competes with the training steps for the machine). Every
job waits for its collectives without spinning (``--quiet-wait``): the emulated nodes share this
machine's cores, and Horovod's spinning wait would let a waiting rank take a working rank's core,
which real nodes do not share. Every job runs at the same Horovod cycle time (``--cycle-time-ms``, set as
``HOROVOD_CYCLE_TIME``). Per method ``runs/NAME/`` gets ``<method>.jsonl``
(per-step log of :mod:`kimad.bench.train`), ``rates-<method>.jsonl`` (every shaped rate applied, from
the emulator) and ``<method>.out`` (the ranks' output); then :mod:`kimad.bench.report` writes
``report.md`` and plots. The ranks import a copy of this checkout's ``kimad`` package made when the
comparison starts (``runs/NAME/code/``; ``meta.json`` records the git commit and whether the checkout
differed from it), so the checkout can be edited while a comparison runs. With ``--repeats N`` the whole
comparison runs N times, each into ``runs/NAME/repeat-<i>/`` (every method in turn within a repeat, repeat i
starting at the i-th method, so that drift does not favour one method) with
its own report, and ``runs/NAME/report.md`` gives the median and range of every figure and judges the
targets on the medians: one comparison's time to 90% varies by a second or more.

Without root (no network namespaces) it says so and runs the same jobs with ``horovodrun`` on
localhost, unshaped; the rate targets are then reported as not measurable.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from kimad.bench.report import KIMAD_METHODS, TARGET_LOSS, method_parts, static_density
from kimad.bench.train import FEEDBACK_CHOICES, WORKLOADS, parse_budget
from kimad.errors import KimadError

# method -> arguments of kimad.bench.train (the budget is added for Kimad's plugin).
METHODS: dict[str, list[str]] = {
    "none": ["--compression", "none"],
    "fp16": ["--compression", "fp16"],
    "static0.1": ["--compression", "kimad", "--allocator", "static", "--density", "0.1"],
    "static0.01": ["--compression", "kimad", "--allocator", "static", "--density", "0.01"],
    # between the two: on a link that swings 5x the best single density may lie here (not in the default list)
    "static0.03": ["--compression", "kimad", "--allocator", "static", "--density", "0.03"],
    "kimad": ["--compression", "kimad", "--allocator", "uniform"],
    "kimad+": ["--compression", "kimad", "--allocator", "layerwise"],
    # Kimad+ whose menus also offer QSGD 8/4/2-bit and scaled sign (not in the default comparison).
    "kimad+q": ["--compression", "kimad", "--allocator", "layerwise", "--compressors", "topk", "qsgd", "sign"],
    # Kimad+ without the controller's lift (an ablation: its plans wait for the estimator after a speed-up).
    "kimad+nolift": ["--compression", "kimad", "--allocator", "layerwise", "--lift-trigger", "inf"],
}
# A Kimad method may carry its own budget: "kimad+@0.25" is Kimad+ at 0.25 times the compute time (--budget auto:0.25
# for that method alone), so that budgets are compared within one comparison.
BUDGETED = KIMAD_METHODS  # (the methods whose plans Kimad makes)
DEFAULT_METHODS = ("none", "fp16", "static0.1", "static0.01", "kimad", "kimad+")
QUICK_METHODS = ("none", "static0.01", "kimad+")
REPO_ROOT = Path(__file__).resolve().parents[2]
# Horovod's cycle time for every job of a comparison, ms (HOROVOD_CYCLE_TIME; Horovod's own default is 5 ms).
CYCLE_TIME_MS = 5.0


class E2EError(KimadError, RuntimeError):
    """A training job of the comparison failed or never started."""


def method_arguments(base: str) -> list[str] | None:
    """The :mod:`kimad.bench.train` arguments of method ``base`` (no ``@F``): those of :data:`METHODS`, or for
    ``static<D>`` static top-k at density D (0 < D <= 1; the named ones are its common cases). ``None``: unknown."""
    if base in METHODS:
        return METHODS[base]
    density = static_density(base)
    return None if density is None else ["--compression", "kimad", "--allocator", "static", "--density", f"{density:g}"]


def method_name(text: str) -> str:
    """``--methods`` entry: a name of :data:`METHODS`, ``static<D>`` (static top-k at density 0 < D <= 1), or one
    of :data:`BUDGETED` with ``@F`` (F > 0: its budget is F times the measured compute time, whatever
    ``--budget`` says). Raises ``argparse.ArgumentTypeError``."""
    base, budget = method_parts(text)
    if method_arguments(base) is None:
        raise argparse.ArgumentTypeError(f"unknown method {text!r}; known: {', '.join(METHODS)}, static<D> (static "
                                         f"top-k at density 0 < D <= 1), or "
                                         f"{'/'.join(BUDGETED)}@F (budget F times the compute time)")
    if budget is not None:
        if base not in BUDGETED:
            raise argparse.ArgumentTypeError(f"{text!r}: only {', '.join(BUDGETED)} take a budget (@F)")
        try:
            parse_budget(budget)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: @F needs a fraction F > 0 of the compute time") from None
    return text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="benchmarks/e2e.py", description=__doc__.splitlines()[0])
    p.add_argument("--workload", choices=tuple(WORKLOADS), default="digits-cnn",
                   help="digits-cnn (test accuracy) or stdlib-lm (validation loss) (default: digits-cnn)")
    p.add_argument("--nodes", type=int, default=2, help="emulated nodes = Horovod ranks (default: 2)")
    p.add_argument("--trace", default="step-down", help="kimad.emulate trace (default: step-down)")
    p.add_argument("--rate", type=float, default=100.0, help="base rate of the trace, Mbit/s (default: 100)")
    p.add_argument("--period", type=float, default=None,
                   help="phase length of the square trace (default: 5 s), sampling period of sine/cloud (1 s)")
    p.add_argument("--methods", nargs="+", type=method_name, default=None, metavar="METHOD",
                   help=f"methods to compare, of {', '.join(METHODS)}, static<D> (static top-k at density D); "
                        f"{'/'.join(BUDGETED)}@F: that method at a "
                        f"budget of F times the compute time (default: {' '.join(DEFAULT_METHODS)}; --quick: "
                        f"{' '.join(QUICK_METHODS)})")
    p.add_argument("--seconds", type=float, default=None,
                   help="training seconds per method = the trace's duration (default: 90; --quick: 50)")
    p.add_argument("--epochs", type=int, default=1000, help="upper bound on epochs per method (default: 1000)")
    p.add_argument("--eval-every-s", type=float, default=2.0,
                   help="evaluate (accuracy or validation loss) every this many seconds (default: 2)")
    p.add_argument("--budget", default="auto",
                   help="Kimad's communication budget per step, seconds, 'auto': half the measured compute "
                        "time of a step, Kimad's own default, or 'auto:F': F times it; a method named with @F "
                        "keeps its own (default: auto)")
    p.add_argument("--error-feedback", choices=FEEDBACK_CHOICES, default="ef21",
                   help="error feedback of every top-k method, static and Kimad: ef21, ef (classic) or none "
                        "(default: ef21)")
    p.add_argument("--target", type=float, default=0.90, help="digits-cnn: target test accuracy (default: 0.90)")
    p.add_argument("--target-loss", type=float, default=None,
                   help=f"stdlib-lm: target validation loss, nats/token (default: {TARGET_LOSS})")
    p.add_argument("--seed", type=int, default=0, help="seed of every job (default: 0)")
    p.add_argument("--cycle-time-ms", type=float, default=CYCLE_TIME_MS,
                   help="Horovod's cycle time (HOROVOD_CYCLE_TIME) of every job, ms: a collective waits for the next "
                        f"cycle of Horovod's background loop (Horovod's default: 5) (default: {CYCLE_TIME_MS:g})")
    p.add_argument("--repeats", type=int, default=1,
                   help="run the whole comparison this many times, into OUT/repeat-<i>/, and report the median "
                        "over them in OUT/report.md (default: 1: one comparison, in OUT/)")
    p.add_argument("--out", default="runs/e2e", help="output directory (default: runs/e2e)")
    p.add_argument("--quick", action="store_true", help=f"methods {' '.join(QUICK_METHODS)}, 50 s each")
    p.add_argument("--localhost", action="store_true", help="run unshaped on localhost even as root")
    args = p.parse_args(argv)
    args.code_root = REPO_ROOT  # run() points it at the comparison's snapshot of the code
    if args.methods is None:
        args.methods = list(QUICK_METHODS if args.quick else DEFAULT_METHODS)
    if len(set(args.methods)) != len(args.methods):
        p.error(f"--methods names a method twice: {' '.join(args.methods)}")
    if args.seconds is None:
        args.seconds = 50.0 if args.quick else 90.0
    if args.nodes < 2:
        p.error("--nodes must be >= 2 (one rank has nothing to communicate)")
    if args.target_loss is not None and not args.target_loss > 0:
        p.error("--target-loss must be > 0 nats/token")
    if not args.seconds > 0 or not args.eval_every_s > 0:
        p.error("--seconds and --eval-every-s must be > 0")
    if args.period is not None and not args.period > 0:
        p.error("--period must be > 0 seconds")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if not 0 < args.cycle_time_ms <= 1000:
        p.error("--cycle-time-ms must be in (0, 1000] ms")
    try:
        parse_budget(args.budget)
    except ValueError as error:
        p.error(str(error))
    return args


def train_command(method: str, args: argparse.Namespace, log_path: Path) -> list[str]:
    """The rank command of ``method``: ``python -m kimad.bench.train`` with the comparison's options."""
    base, budget = method_parts(method)
    return [sys.executable, "-m", "kimad.bench.train", "--workload", args.workload, *method_arguments(base),
            "--budget", budget or str(args.budget), "--error-feedback", args.error_feedback,
            "--epochs", str(args.epochs), "--max-seconds", str(args.seconds),
            "--eval-every-s", str(args.eval_every_s), "--eval-after", "--quiet-wait",
            "--seed", str(args.seed), "--log-every", "100", "--step-log", str(log_path)]


def rank_environment(code_root: Path = REPO_ROOT, cycle_time_ms: float | None = None) -> dict[str, str]:
    """This environment with ``code_root`` (the folder holding the ``kimad`` package the ranks import: this
    checkout, or a comparison's snapshot of it) first on PYTHONPATH. For a snapshot also ``PYTHONSAFEPATH=1``:
    ``python -m`` and ``-c`` otherwise put the working directory (often this checkout) ahead of PYTHONPATH.
    With ``cycle_time_ms``, ``HOROVOD_CYCLE_TIME`` (Horovod reads it in ``hvd.init()``)."""
    path = os.environ.get("PYTHONPATH", "")
    env = dict(os.environ, PYTHONPATH=f"{code_root}{os.pathsep}{path}" if path else str(code_root))
    if Path(code_root) != REPO_ROOT:
        env["PYTHONSAFEPATH"] = "1"
    if cycle_time_ms is not None:
        env["HOROVOD_CYCLE_TIME"] = f"{cycle_time_ms:g}"
    return env


def snapshot_code(out: Path) -> Path:
    """Copy this checkout's ``kimad`` package (the built extension included) to ``out/code/`` and return that
    folder, for the ranks to import: a comparison runs for many minutes, and editing the checkout meanwhile
    must not change the code of its later jobs."""
    dest = out / "code"
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(REPO_ROOT / "kimad", dest / "kimad", ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def code_version() -> dict:
    """The checkout's git commit and whether tracked files differ from it (``None`` values without git)."""
    def git(*argv: str) -> str | None:
        try:
            done = subprocess.run(["git", *argv], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "dirty": None if status is None else bool(status)}


def _last_step(log_path: Path) -> dict | None:
    """The last per-step entry of a training log so far (``None`` before the first)."""
    try:
        lines = log_path.read_text().splitlines()
    except FileNotFoundError:
        return None
    for line in reversed(lines):
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line being written
        if not entry.get("eval"):
            return entry
    return None


def job_deadline_s(args: argparse.Namespace) -> float:
    """How long one job may take: its training, start-up and a slow tail (180 s), and up to 2 s for each
    evaluation of the snapshots taken every ``--eval-every-s`` (evaluated after training)."""
    return args.seconds + 180.0 + 2.0 * args.seconds / args.eval_every_s


def training_clock(entry: dict, now: float | None = None) -> float:
    """Seconds of training (evaluations excluded) at Unix time ``now``, from the job's latest step entry.

    The entry's ``train_s`` plus the wall time since it was logged: exact between evaluations; while one
    runs (it is logged when it ends) the clock runs on, at most one evaluation's length ahead.
    """
    return entry["train_s"] + max(0.0, (time.time() if now is None else now) - entry["wall"])


def _follow(done, log_path: Path, bar, seconds: float, on_tick=None) -> None:
    """Poll ``log_path`` until ``done()``: update ``bar``; from the first step on, call ``on_tick(latest step)``."""
    while not done():
        entry = _last_step(log_path)
        if entry is not None:
            bar.n = min(seconds, round(entry["train_s"], 1))
            bar.set_postfix(step=entry["step"], loss=f"{entry['loss']:.3f}", refresh=False)
            bar.update(0)  # redraws at most every mininterval
            if on_tick is not None:
                on_tick(entry)
        time.sleep(0.1)


def run_shaped(method: str, args: argparse.Namespace, out: Path, bar) -> int:
    """Run ``method`` on a fresh emulated cluster, playing the trace on its training clock.

    A rate change at trace time T is applied when the job has trained T seconds (:func:`training_clock`),
    so evaluations do not shift the trace and every method meets each rate at the same training time.
    """
    from kimad.emulate import Cluster, run_horovod

    log_path, rates_path = out / f"{method}.jsonl", out / f"rates-{method}.jsonl"
    cluster = Cluster(args.nodes, args.trace, rate_mbit=args.rate, duration_s=args.seconds, period_s=args.period,
                      log_path=rates_path, play=False)
    result: dict[str, int] = {}
    with cluster, open(out / f"{method}.out", "w") as console:
        env = rank_environment(args.code_root, args.cycle_time_ms)
        job = threading.Thread(target=lambda: result.update(code=run_horovod(
            cluster, train_command(method, args, log_path), env=env, out=console)), daemon=True)
        pending = sorted((c for c in cluster.trace if c.time_s > 0), key=lambda c: c.time_s)

        def tick(entry: dict) -> None:
            while pending and training_clock(entry) >= pending[0].time_s:
                change = pending.pop(0)
                cluster.set_rate(change.node, change.mbit)

        job.start()
        deadline = time.monotonic() + job_deadline_s(args)
        _follow(lambda: not job.is_alive() or time.monotonic() > deadline, log_path, bar, args.seconds, tick)
        if job.is_alive():
            raise E2EError(f"method {method!r} did not finish within {job_deadline_s(args):.0f} s; "
                           f"see {out / method}.out")
    return result.get("code", 1)


def run_localhost(method: str, args: argparse.Namespace, out: Path, bar) -> int:
    """Run ``method`` with horovodrun on localhost (no shaping)."""
    horovodrun = shutil.which("horovodrun") or str(Path(sys.executable).with_name("horovodrun"))
    log_path = out / f"{method}.jsonl"
    command = [horovodrun, "-np", str(args.nodes), "-H", f"localhost:{args.nodes}", "--gloo",
               *train_command(method, args, log_path)]
    with open(out / f"{method}.out", "w") as console:
        proc = subprocess.Popen(command, stdout=console, stderr=subprocess.STDOUT,
                                env=rank_environment(args.code_root, args.cycle_time_ms), start_new_session=True)
        try:
            deadline = time.monotonic() + job_deadline_s(args)
            _follow(lambda: proc.poll() is not None or time.monotonic() > deadline, log_path, bar, args.seconds)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
                proc.wait()
    return proc.returncode


def run(args: argparse.Namespace) -> Path:
    """Run every method of ``args`` (``--repeats`` times), then write the report; returns the report's path."""
    from tqdm import tqdm

    from kimad.bench import report
    from kimad.emulate import PrivilegeError, require_privileges

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shaped, unshaped_reason = not args.localhost, "--localhost was given"
    if shaped:
        try:
            require_privileges()
        except PrivilegeError as error:
            print(f"e2e: {error}; running the same comparison on localhost WITHOUT shaping", file=sys.stderr)
            shaped, unshaped_reason = False, str(error)
    meta = {"workload": args.workload, "nodes": args.nodes, "trace": args.trace if shaped else None,
            "rate_mbit": args.rate if shaped else None, "period_s": args.period if shaped else None,
            "seconds": args.seconds, "budget": args.budget, "error_feedback": args.error_feedback,
            "eval_every_s": args.eval_every_s, "target": args.target,
            "target_loss": args.target_loss, "seed": args.seed, "methods": args.methods,
            "cycle_time_ms": args.cycle_time_ms,
            "shaped": shaped, **({} if shaped else {"unshaped_reason": unshaped_reason}), "method_order": "rotated",
            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "code": code_version()}
    args.code_root = snapshot_code(out)
    dirs = [out] if args.repeats == 1 else [out / f"{report.REPEAT_PREFIX}{i + 1}" for i in range(args.repeats)]
    for stale in sorted(out.glob(f"{report.REPEAT_PREFIX}*")):
        if stale.is_dir() and stale.name[len(report.REPEAT_PREFIX):].isdigit() and stale not in dirs:
            print(f"e2e: removing {stale}, a repeat of an earlier comparison in {out}", file=sys.stderr)
            shutil.rmtree(stale)  # this comparison's meta.json replaces the one that counted it
    for d in dirs:  # each repeat is a comparison of its own; OUT's meta.json says how many there are
        d.mkdir(exist_ok=True)
        (d / "meta.json").write_text(json.dumps(meta, indent=1))
    if args.repeats > 1:
        (out / "meta.json").write_text(json.dumps({**meta, "repeats": args.repeats}, indent=1))
    runner = run_shaped if shaped else run_localhost
    calm = 0.1 if sys.stderr.isatty() else 10.0  # piped output: a line every 10 s, not a stream of redraws
    # Each repeat runs every method in turn, repeat i starting at method i (rotated), so that a drift of the
    # machine over the comparison does not always favour the same method.
    m = len(args.methods)
    jobs = [(d, args.methods[(i + j) % m]) for i, d in enumerate(dirs) for j in range(m)]
    for d, method in tqdm(jobs, desc="methods", unit="method", position=0, mininterval=calm):
        for stale in (d / f"{method}.jsonl", d / f"rates-{method}.jsonl"):
            stale.unlink(missing_ok=True)
        label = method if d == out else f"{method} ({d.name})"
        with tqdm(total=args.seconds, desc=f"  {label}", unit="s", position=1, leave=False, mininterval=calm) as bar:
            code = runner(method, args, d, bar)
        if code != 0:
            raise E2EError(f"method {method!r} failed with exit code {code}; "
                           f"its ranks' output is in {d / method}.out")
    return report.write_report(out) if args.repeats == 1 else report.write_repeats_report(out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        path = run(args)
    except KimadError as error:
        print(f"e2e: error: {error}", file=sys.stderr)
        return 1
    print(f"e2e: report written to {path}")
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
