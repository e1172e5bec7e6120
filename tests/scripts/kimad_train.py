"""Run under horovodrun: DigitsCNN on mnist_digits, uncompressed vs Kimad top-k + EF21 at a small budget.

Both runs start from the same weights and see the same batches for the same number of steps.
The link model is fixed (1 Gbit/s, 10 us) so the plan depends only on the gradients and the budget.
Rank 0 prints one line ``kimad train: {json}`` with both accuracies and Kimad's bytes per step.

    python kimad_train.py [--epochs E] [--budget SECONDS]
"""

import argparse
import copy
import json
import statistics
import sys

import horovod.torch as hvd
import torch

import kimad.horovod
from kimad.bench.workloads import DigitsCNN, accuracy, mnist_digits


def train(model, opt, shard, steps_per_epoch, epochs, batch_size, seed, rank, on_step=None):
    shuffle = torch.Generator().manual_seed(seed + 1 + rank)
    for _ in range(epochs):
        order = torch.randperm(len(shard), generator=shuffle)
        for step in range(steps_per_epoch):
            idx = order[step * batch_size: (step + 1) * batch_size]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(shard.x[idx]), shard.y[idx]).backward()
            opt.step()
            if on_step:
                on_step()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--budget", type=float, default=2e-3)
    args = p.parse_args()
    hvd.init()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rank, size = hvd.rank(), hvd.size()
    train_set, test_set = mnist_digits(seed=0)
    shard = train_set.shard(rank, size)
    batch_size = 32
    steps_per_epoch = len(shard) // batch_size

    base = DigitsCNN()
    hvd.broadcast_parameters(base.state_dict(), root_rank=0)
    plain = copy.deepcopy(base)
    opt = hvd.DistributedOptimizer(torch.optim.SGD(plain.parameters(), lr=0.05, momentum=0.9),
                                   named_parameters=[(f"plain.{n}", q) for n, q in plain.named_parameters()])
    train(plain, opt, shard, steps_per_epoch, args.epochs, batch_size, 0, rank)

    model = copy.deepcopy(base)
    kopt = kimad.horovod.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), named_parameters=model.named_parameters(),
        budget_s=args.budget, allocator="layerwise", compressors=("topk",), error_feedback="ef21",
        bandwidth_bps=1e9, latency_s=1e-5)
    sent = []
    train(model, kopt, shard, steps_per_epoch, args.epochs, batch_size, 0, rank,
          on_step=lambda: sent.append(kopt.kimad.metrics["actual_bytes"]))
    dense_bytes = 4 * sum(q.numel() for q in model.parameters())
    result = {"rank": rank, "steps": steps_per_epoch * args.epochs, "plain_accuracy": accuracy(plain, test_set),
              "kimad_accuracy": accuracy(model, test_set), "kimad_median_bytes": statistics.median(sent),
              "dense_bytes": dense_bytes, "budget_s": args.budget}
    print("kimad train: " + json.dumps(result), flush=True)
    hvd.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
