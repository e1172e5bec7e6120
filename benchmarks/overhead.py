"""Per-step cost of Kimad in Horovod: ResNet-18 (32x32 images) on local ranks, plain Horovod vs Kimad top-k EF21 1%.

    python benchmarks/overhead.py [--np 2] [--steps 10] [--warmup 3] [--batch-size 32] [--json PATH]

Run plainly, it launches itself under ``horovodrun -np N -H localhost:N --gloo`` (with this Python
and this repository on PYTHONPATH) and waits; every rank then runs the measurement and rank 0 prints
the table and writes ``--json``. It can also be launched by horovodrun directly (it then measures at
once: ``HOROVOD_RANK`` is set).

Two copies of one ResNet-18 (:mod:`kimad.bench.resnet`, 11.2M parameters in 62 tensors) train side
by side on the same synthetic random batches, one step each in turn (so machine load drifts hit both
alike): one with ``hvd.DistributedOptimizer`` (no compression, fp32 allreduce overlapping backward),
one with :func:`kimad.horovod.DistributedOptimizer`, top-k + EF21, whose menus offer only density 1%
(``densities=(0.01,)``) and a budget far below any plan (1 us at a fixed 1 Gbit/s link model): every
tensor takes its cheapest option every step, i.e. a static plan of top-k 1% for tensors of >= 1024
elements and dense for the rest (batchnorm and bias vectors, 0.09% of the parameters).

Figures, medians over the steps after ``--warmup`` (rank 0's measurements; step times are maxima
over ranks, since the slowest rank sets the pace):
  step_ms       wall time of zero_grad + forward + backward + optimizer step;
  comm_ms       Kimad only: its allgather + allreduce (metrics ``actual_comm_s``) and, apart, its
                ``kimad.agree`` allgather; plain Horovod's allreduce overlaps backward, so it has no
                separable communication time;
  overhead_ms   Kimad's own work: error profiles + plan + encode + decode (metrics ``overhead_s``),
                and ``overhead_pct`` = overhead / Kimad's step time (target <= 5%);
  bytes/rank    payload each rank contributes per step: plain = 4 bytes x parameters (the fp32 allreduce
                buffer); Kimad = its allgather message (values + indices + 8-byte digest) + dense buffer
                (metrics ``actual_bytes``). At 2 ranks a ring allreduce and a ring allgather each send
                exactly this payload per rank, so these are also the bytes on the wire.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def launch(args: argparse.Namespace) -> int:
    """Re-run this script under horovodrun with ``args.np`` local ranks."""
    exe = Path(sys.executable).parent / "horovodrun"
    if not exe.exists():
        print(f"horovodrun not found next to {sys.executable}", file=sys.stderr)
        return 2
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    cmd = [str(exe), "-np", str(args.np), "-H", f"localhost:{args.np}", "--gloo", "--start-timeout", "120",
           sys.executable, __file__, *sys.argv[1:]]
    if args.json and "--json" in cmd:  # the ranks may not share this working directory
        cmd[cmd.index("--json") + 1] = str(Path(args.json).resolve())
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    prefix = "[0]<stdout>:"
    lines = [line[len(prefix):] for line in proc.stdout.splitlines() if line.startswith(prefix)]
    print("\n".join(lines))
    if proc.returncode != 0:
        print(proc.stdout[-4000:], proc.stderr[-4000:], file=sys.stderr)
    return proc.returncode


def timed_step(model, opt, x, y) -> float:
    import torch

    t0 = time.perf_counter()
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    return time.perf_counter() - t0


def measure(args: argparse.Namespace) -> int:
    import copy

    import horovod.torch as hvd
    import torch

    import kimad.horovod
    from kimad.bench.machine import describe_cpu
    from kimad.bench.resnet import ResNet18, synthetic_images

    hvd.init()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rank, size = hvd.rank(), hvd.size()
    base = ResNet18()
    hvd.broadcast_parameters(base.state_dict(), root_rank=0)
    plain, mine = base, copy.deepcopy(base)
    plain_opt = hvd.DistributedOptimizer(torch.optim.SGD(plain.parameters(), lr=0.01, momentum=0.9),
                                         named_parameters=[(f"plain.{n}", p) for n, p in plain.named_parameters()])
    kimad_opt = kimad.horovod.DistributedOptimizer(
        torch.optim.SGD(mine.parameters(), lr=0.01, momentum=0.9), named_parameters=mine.named_parameters(),
        budget_s=1e-6, bandwidth_bps=1e9, latency_s=1e-5, densities=(args.density,), compressors=("topk",),
        error_feedback="ef21", allocator="layerwise")
    rows: list[dict] = []
    for step in range(args.warmup + args.steps):
        x, y = synthetic_images(args.batch_size, step, rank)
        plain_s = timed_step(plain, plain_opt, x, y)
        kimad_s = timed_step(mine, kimad_opt, x, y)
        m = kimad_opt.kimad.metrics
        rows.append({"plain_step_s": plain_s, "kimad_step_s": kimad_s, **{k: m[k] for k in (
            "actual_comm_s", "agree_s", "overhead_s", "profile_s", "plan_s", "encode_s", "decode_s", "actual_bytes")}})
    # The slowest rank sets the pace: take every step's maximum over ranks.
    keys = ("plain_step_s", "kimad_step_s", "actual_comm_s", "agree_s", "overhead_s", "profile_s", "plan_s",
            "encode_s", "decode_s")
    local = torch.tensor([[r[k] for k in keys] for r in rows], dtype=torch.float64)
    slowest = hvd.allreduce(local, op=hvd.Max, name="overhead.max")
    after = slowest[args.warmup:]
    med = {k: statistics.median(after[:, i].tolist()) for i, k in enumerate(keys)}
    labels = sorted({t["option"] for t in kimad_opt.kimad.metrics["tensors"].values()})
    params = sum(p.numel() for p in base.parameters())
    plain_bytes = 4 * params
    kimad_bytes = statistics.median(r["actual_bytes"] for r in rows[args.warmup:])
    result = {
        "machine": describe_cpu(), "ranks": size, "model": "ResNet18 (32x32)", "parameters": params,
        "tensors": len(list(base.parameters())), "batch_size": args.batch_size, "threads_per_rank": args.threads,
        "density": args.density, "steps": args.steps, "warmup": args.warmup, "kimad_options": labels,
        "plain_step_ms": 1e3 * med["plain_step_s"], "kimad_step_ms": 1e3 * med["kimad_step_s"],
        "kimad_comm_ms": 1e3 * med["actual_comm_s"], "kimad_agree_ms": 1e3 * med["agree_s"],
        "overhead_ms": 1e3 * med["overhead_s"], "profile_ms": 1e3 * med["profile_s"], "plan_ms": 1e3 * med["plan_s"],
        "encode_ms": 1e3 * med["encode_s"], "decode_ms": 1e3 * med["decode_s"],
        "overhead_pct": 100 * statistics.median((after[:, keys.index("overhead_s")] / after[:, 1]).tolist()),
        "plain_bytes_per_rank": plain_bytes, "kimad_bytes_per_rank": kimad_bytes,
        "byte_reduction": plain_bytes / kimad_bytes,
    }
    if rank == 0:
        r = result
        print(f"machine: {r['machine']}")
        print(f"{r['model']}, {r['parameters']:,} parameters in {r['tensors']} tensors, {size} ranks x "
              f"{r['threads_per_rank']} thread(s), batch {r['batch_size']}/rank, medians of {r['steps']} steps "
              f"after {r['warmup']} warm-up (max over ranks); Kimad options used: {', '.join(labels)}")
        print(f"{'':<28}{'step ms':>10}{'bytes/rank':>14}")
        print(f"{'plain Horovod (fp32)':<28}{r['plain_step_ms']:>10.1f}{plain_bytes:>14,}")
        print(f"{'Kimad top-k EF21 1%':<28}{r['kimad_step_ms']:>10.1f}{int(kimad_bytes):>14,}"
              f"   ({r['byte_reduction']:.1f}x fewer bytes)")
        print(f"  Kimad allgather+allreduce {r['kimad_comm_ms']:.1f} ms; agree allgather {r['kimad_agree_ms']:.1f} ms "
              "(where the ranks meet after backward: it absorbs their skew)")
        print(f"  Kimad own work {r['overhead_ms']:.1f} ms = {r['overhead_pct']:.1f}% of its step (target <= 5%): "
              f"profile {r['profile_ms']:.1f}, plan {r['plan_ms']:.1f}, encode {r['encode_ms']:.1f}, "
              f"decode {r['decode_ms']:.1f} ms")
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    hvd.shutdown()
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--np", type=int, default=2, help="local ranks when launching horovodrun")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--density", type=float, default=0.01)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if "HOROVOD_RANK" not in os.environ:
        return launch(args)
    return measure(args)


if __name__ == "__main__":
    sys.exit(main())
