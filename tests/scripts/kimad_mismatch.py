"""Run under horovodrun: every rank but 0 uses a different budget, so the ranks' plans differ (``--static``: a
static plan, whose ranks agree on nothing before the row's allgather, at a different density).

Every rank must raise ``PlanMismatchError`` on the first step (the process exits non-zero with
the message on every rank) instead of hanging in a collective with mismatched sizes.
"""

import sys

import horovod.torch as hvd
import torch
from torch import nn

import kimad.horovod


def main() -> int:
    hvd.init()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
    differ = hvd.rank() > 0  # deliberately different on ranks >= 1
    if "--static" in sys.argv[1:]:
        options = dict(allocator="static", densities=(0.02 if differ else 0.01,))
    else:
        options = dict(budget_s=3e-3 if differ else 1e-3, bandwidth_bps=1e9, latency_s=1e-5)
    opt = kimad.horovod.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                             named_parameters=model.named_parameters(), **options)
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()  # raises PlanMismatchError on every rank
    print(f"kimad mismatch: rank {hvd.rank()} was NOT stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
