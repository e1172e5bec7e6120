"""Steps to a target against top-k density, on simulated data-parallel workers (no network).

    python benchmarks/density_steps.py [--workload digits-cnn] [--densities 0.003 0.01 0.03 0.1 1]
                                       [--plan NAME=D,NAME=D ...] [--error-feedback ef21 ef] [--workers 4]
                                       [--seeds 3] [--max-steps 200] [--json PATH]

How many steps does training need when every gradient goes through top-k with error feedback at density ``d``,
and how does that follow the compression error the controller minimises? ``--workers`` workers take turns on
one model (each on its own shard, batch 32, the seed's shuffling, SGD lr 0.05 momentum 0.9, as
``kimad.bench.train``); every tensor of at least 1,024 elements (the menus' ``min_compress_numel``) goes
through :func:`kimad.ops.topk_encode` (EF21: worker state ``h += TopK(g - h)``) at ``k = ceil(d * numel)``,
smaller ones are sent dense (a ``--plan`` row instead gives the named tensors their own density and sends
every other one dense, as Kimad+'s knapsack does with small layers), and the step's gradient is the mean
of the workers' ``h`` (EF21's global estimate). ``--error-feedback ef`` (classic EF, Seide et al. 2014; the plugin's
``error_feedback="ef"``) keeps each worker's residual ``e`` instead, sends ``TopK(g + e)``, keeps
``e = g + e - TopK(g + e)``, and the step's gradient is the mean of the messages; several modes give a row per
mode and density. The model is evaluated every ``--eval-every`` steps (test
accuracy of the digits CNN, or validation loss of the language model) until the harder target is met or
``--max-steps`` pass.

Output, per density or plan: median [min-max] over seeds of the steps to each target; ``delta``, the
median over steps of the step's relative compression error ``sum ||v - TopK(v)||^2 / sum ||v||^2`` over every
tensor (``v = g - h``, or ``g + e`` with EF; dense tensors count with zero error), from step 5 on -- what Kimad+'s
knapsack minimises under its budget; and ``dense / (1 - delta)``, the steps the dense run's median would become if each
step moved the model by its share ``1 - delta`` only: a naive model of what the error costs, to hold
against the measured steps (on the digits CNN the measured steps do not follow it: which layers lose
their entries matters more than the total error, see issue 6's notes).

Batch-norm running statistics see every worker's batch in turn (one model), which the real ranks do not;
the trainable weights are averaged as Horovod averages them. CPU only, single-threaded, minutes.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from kimad.bench.train import WORKLOADS, load_workload  # noqa: E402
from kimad.bench.workloads import CharTransformer, DigitsCNN  # noqa: E402
from kimad.ops import topk_encode  # noqa: E402

MIN_COMPRESS_NUMEL = 1024  # kimad.control.menu's default: smaller tensors are always sent dense
TARGETS = {"accuracy": (0.90, 0.95), "val_loss": (2.6, 2.5)}
MODELS = {"digits-cnn": DigitsCNN, "stdlib-lm": CharTransformer}  # load_workload's models, built without data
BATCH, LR, MOMENTUM = 32, 0.05, 0.9


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", choices=tuple(WORKLOADS), default="digits-cnn",
                   help="digits-cnn (test accuracy) or stdlib-lm (validation loss) (default: digits-cnn)")
    p.add_argument("--densities", type=float, nargs="+", default=[0.003, 0.01, 0.03, 0.1, 1.0],
                   help="top-k densities to compare, each in (0, 1] (default: 0.003 0.01 0.03 0.1 1)")
    p.add_argument("--plan", nargs="+", default=[], metavar="NAME=D,NAME=D",
                   help="extra rows: these tensors at these densities, every other tensor dense")
    p.add_argument("--error-feedback", nargs="+", choices=("ef21", "ef"), default=["ef21"],
                   help="error feedback of the top-k messages, one row per mode and density: ef21 (the "
                        "worker's estimate h) or ef (classic: the worker's residual e) (default: ef21)")
    p.add_argument("--workers", type=int, default=4, help="simulated data-parallel workers (default: 4)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per density: 0 .. N-1 (default: 3)")
    p.add_argument("--max-steps", type=int, default=200, help="give up on a target after this many steps")
    p.add_argument("--eval-every", type=int, default=2, help="evaluate every this many steps (default: 2)")
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)
    if not all(0 < d <= 1 for d in args.densities):
        p.error("--densities must each be in (0, 1]")
    try:
        args.plan = [parse_plan(text) for text in args.plan]
    except ValueError as error:
        p.error(str(error))
    if args.plan:  # named tensors are checked before minutes of training, against the model's (built, no data)
        names = [name for name, _ in MODELS[args.workload]().named_parameters()]
        for plan in args.plan:
            if (error := plan_error(plan, names)) is not None:
                p.error(error)
    for name in ("workers", "seeds", "max_steps", "eval_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def parse_plan(text: str) -> dict[str, float]:
    """``"a=0.1,b=0.01"`` -> ``{"a": 0.1, "b": 0.01}``; raises ValueError naming the bad part."""
    plan = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        try:
            density = float(value)
        except ValueError:
            density = math.nan
        if not name or not 0 < density <= 1:
            raise ValueError(f"--plan: {part!r} is not NAME=DENSITY with a density in (0, 1]")
        plan[name] = density
    return plan


def plan_error(plan: dict[str, float], names: list[str]) -> str | None:
    """Why ``plan`` does not fit a model of these tensor ``names`` (it names others), or None."""
    unknown = sorted(set(plan) - set(names))
    return f"--plan names tensors the model does not have: {unknown}; it has {names}" if unknown else None


def train(workload: str, density: float | dict[str, float], workers: int, seed: int, max_steps: int,
          eval_every: int, feedback: str = "ef21") -> dict:
    """One simulated run at a uniform ``density`` or a plan ``{tensor name: density}`` (others dense), with
    ``feedback`` ``"ef21"`` or ``"ef"``: ``{"steps": {target: step or None}, "delta": [per-step relative error]}``."""
    if feedback not in ("ef21", "ef"):
        raise ValueError(f"feedback must be 'ef21' or 'ef', got {feedback!r}")
    torch.manual_seed(seed)
    data, held_out, model, loss_fn, evaluate = load_workload(workload, seed)
    metric = WORKLOADS[workload][1]
    targets = TARGETS[metric]
    reached = (lambda value, t: value >= t) if metric == "accuracy" else (lambda value, t: value <= t)
    shards = [data.shard(rank, workers) for rank in range(workers)]
    orders = [torch.randperm(len(s), generator=torch.Generator().manual_seed(seed + 1 + rank))
              for rank, s in enumerate(shards)]
    params = list(model.named_parameters())
    if isinstance(density, dict) and (error := plan_error(density, [name for name, _ in params])) is not None:
        raise ValueError(error)
    states = [{name: torch.zeros(p.numel()) for name, p in params} for _ in range(workers)]
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    steps: dict[float, int | None] = {t: None for t in targets}
    deltas = []
    for step in range(max_steps):
        total = {name: torch.zeros(p.numel()) for name, p in params}
        sq_error = sq_norm = 0.0
        for rank, shard in enumerate(shards):
            start = (step * BATCH) % (len(shard) - BATCH + 1)
            batch = orders[rank][start:start + BATCH]
            model.zero_grad()
            loss_fn(model(shard.x[batch]), shard.y[batch]).backward()
            for name, p in params:
                grad, h = p.grad.detach().reshape(-1), states[rank][name]
                d = density.get(name, 1.0) if isinstance(density, dict) else density
                k = p.numel() if p.numel() < MIN_COMPRESS_NUMEL else math.ceil(d * p.numel())
                # EF21: h += TopK(grad - h), the workers' h averaged; EF: e = grad + e - TopK(grad + e), the
                # messages averaged
                message = topk_encode(grad, h, k, mode=feedback, name=name)
                sq_error, sq_norm = sq_error + message.sq_error, sq_norm + message.sq_norm
                if feedback == "ef21":
                    total[name] += h
                else:
                    total[name].index_add_(0, message.indices.long(), message.values)
        deltas.append(sq_error / sq_norm if sq_norm > 0 else 0.0)
        for name, p in params:
            p.grad = (total[name] / workers).view_as(p)
        opt.step()
        if (step + 1) % eval_every == 0:
            value = evaluate(model, held_out)
            for t in targets:
                if steps[t] is None and reached(value, t):
                    steps[t] = step + 1
            if steps[targets[-1]] is not None:
                break
    return {"steps": steps, "delta": deltas}


def _steps_text(values: list[int | None], max_steps: int) -> str:
    known = sorted(math.inf if v is None else v for v in values)
    show = [f"> {max_steps}" if math.isinf(v) else f"{v:g}" for v in (statistics.median(known), known[0], known[-1])]
    return show[0] if known[0] == known[-1] else f"{show[0]} [{show[1]}-{show[2]}]"


def main(argv: list[str] | None = None) -> int:
    from tqdm import tqdm

    args = parse_args(argv)
    torch.set_num_threads(1)
    metric = WORKLOADS[args.workload][1]
    targets = TARGETS[metric]
    modes = list(dict.fromkeys(args.error_feedback))
    # Dense sends every entry under either mode (EF21's h becomes g, EF's residual stays 0): run it once.
    configs = [(mode, d) for d in sorted(set(args.densities), reverse=True) + args.plan
               for mode in (modes[:1] if d == 1.0 else modes)]
    jobs = [(i, mode, d, seed) for i, (mode, d) in enumerate(configs) for seed in range(args.seeds)]
    results: list[list[dict]] = [[] for _ in configs]
    for i, mode, d, seed in tqdm(jobs, desc="runs", unit="run", file=sys.stderr):
        results[i].append(train(args.workload, d, args.workers, seed, args.max_steps, args.eval_every, mode))
    dense = next(([r["steps"][targets[0]] for r in runs] for (_, d), runs in zip(configs, results) if d == 1.0), [])
    dense_steps = statistics.median(dense) if dense and None not in dense else None
    unit = "accuracy" if metric == "accuracy" else "loss"
    head = " | ".join(f"steps to {unit} {t:g}" for t in targets)
    names = {"ef21": "EF21", "ef": "EF"}
    print(f"{args.workload}, {args.workers} workers, top-k + {' or '.join(names[m] for m in modes)}, "
          f"{args.seeds} seeds (median [min-max])\n")
    print(f"| density or plan | error feedback | {head} | delta | dense / (1 - delta), to {unit} {targets[0]:g} |")
    print("|---:|---|" + "---:|" * (len(targets) + 2))
    rows = []
    for (mode, d), runs in zip(configs, results):
        label = ", ".join(f"{n} {v:g}" for n, v in d.items()) if isinstance(d, dict) else f"{d:g}"
        delta = statistics.median(x for r in runs for x in (r["delta"][5:] or r["delta"]))
        model = f"{dense_steps / (1 - delta):.0f}" if dense_steps is not None and delta < 1 else "-"
        cells = " | ".join(_steps_text([r["steps"][t] for r in runs], args.max_steps) for t in targets)
        print(f"| {label} | {'-' if d == 1.0 else names[mode]} | {cells} | {delta:.3f} | {model} |")
        rows.append({"density": d, "error_feedback": mode,
                     "steps": {str(t): [r["steps"][t] for r in runs] for t in targets}, "delta": delta})
    if dense_steps is None:
        print("\n(the last column needs density 1 among --densities, every seed reaching the first target)")
    if args.json:
        Path(args.json).write_text(json.dumps({"workload": args.workload, "workers": args.workers, "rows": rows},
                                              indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
