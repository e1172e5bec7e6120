"""Run under horovodrun: allreduce and allgather with different sizes per rank, checked on every rank."""

import sys

import horovod.torch as hvd
import torch


def main() -> int:
    hvd.init()
    rank, size = hvd.rank(), hvd.size()

    summed = hvd.allreduce(torch.full((5,), float(rank + 1)), op=hvd.Sum, name="smoke.sum")
    expected_sum = float(sum(r + 1 for r in range(size)))
    assert torch.equal(summed, torch.full((5,), expected_sum)), f"rank {rank}: allreduce sum gave {summed}"

    averaged = hvd.allreduce(torch.full((3,), float(rank)), op=hvd.Average, name="smoke.avg")
    assert torch.allclose(averaged, torch.full((3,), (size - 1) / 2)), f"rank {rank}: average gave {averaged}"

    # Rank r contributes r + 1 rows of value r: sizes differ per rank, as sparse messages do.
    mine = torch.full((rank + 1, 2), float(rank))
    gathered = hvd.allgather(mine, name="smoke.gather")
    expected = torch.cat([torch.full((r + 1, 2), float(r)) for r in range(size)])
    assert torch.equal(gathered, expected), f"rank {rank}: allgather gave {gathered}"

    print(f"horovod smoke: rank {rank}/{size} OK", flush=True)
    hvd.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
