"""Run under horovodrun: Kimad's state_dict restores a run bit for bit.

    python kimad_checkpoint.py DIR --start S --steps N [--resume [--without-kimad-state]]

Trains steps ``S .. S+N-1`` of a deterministic run (batches depend on step and rank only; top-k +
EF21 at a fixed budget and a fixed link model, so plans depend only on the gradients) and saves
model, optimizer and Kimad state to ``DIR/rank{r}.pt``; with ``--resume`` it first loads them.
"""

import argparse
import sys
from pathlib import Path

import horovod.torch as hvd
import torch
from torch import nn

import kimad.horovod


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("dir", type=Path)
    p.add_argument("--start", type=int, default=0)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--error-feedback", default="ef21")
    p.add_argument("--without-kimad-state", action="store_true", help="resume without Kimad's state (a control)")
    args = p.parse_args()
    hvd.init()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rank = hvd.rank()
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 64), nn.ReLU(),
                          nn.Linear(64, 10))
    opt = kimad.horovod.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), named_parameters=model.named_parameters(),
        budget_s=1e-4, bandwidth_bps=1e9, latency_s=1e-6, error_feedback=None if args.error_feedback == "none"
        else args.error_feedback)
    path = args.dir / f"rank{rank}.pt"
    if args.resume:
        state = torch.load(path, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if not args.without_kimad_state:
            opt.kimad.load_state_dict(state["kimad"])
    for step in range(args.start, args.start + args.steps):
        g = torch.Generator().manual_seed(100 * step + rank)
        x, y = torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    labels = sorted({t["option"] for t in opt.kimad.metrics["tensors"].values()})
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "kimad": opt.kimad.state_dict()}, path)
    print(f"kimad checkpoint: rank {rank} at step {opt.kimad.step}, options {labels}", flush=True)
    hvd.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
