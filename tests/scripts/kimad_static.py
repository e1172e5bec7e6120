"""Run under horovodrun: a static top-k plan (``allocator="static"``, EF21) skips the agree allgather and still
hands the optimizer exactly what top-k + EF21 on every rank gives.

Every step each rank also allgathers its raw gradients (a plain Horovod allgather), replays every rank's EF21 --
``h_r += TopK(g_r - h_r)`` (its values rounded to bfloat16, as sent), ``H += mean_r TopK(g_r - h_r)`` for the
top-k tensors, ``H = mean_r g_r`` for the dense ones -- and checks the gradients Kimad handed the optimizer
against ``H``, and that the step issued no agree allgather, profiled nothing and gathered a row of the same
size every step. Rank 0 prints ``kimad static: {json}``.
"""

import json
import sys

import horovod.torch as hvd
import torch
from torch import nn

import kimad.horovod

DENSITY, STEPS = 0.05, 6


def topk(v: torch.Tensor, k: int) -> torch.Tensor:
    """TopK_k(v) as the wire carries it: the kept values rounded to bfloat16."""
    out = torch.zeros_like(v)
    idx = v.abs().topk(k).indices
    out[idx] = v[idx].to(torch.bfloat16).to(torch.float32)
    return out


def main() -> int:
    hvd.init()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    world = hvd.size()
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
    opt = kimad.horovod.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05),
                                             named_parameters=model.named_parameters(), allocator="static",
                                             densities=(DENSITY,))
    compression = opt.kimad
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    params = dict(model.named_parameters())
    h = {name: torch.zeros(world, p.numel()) for name, p in params.items()}  # every rank's local EF21 state
    H = {name: torch.zeros(p.numel()) for name, p in params.items()}
    gen = torch.Generator().manual_seed(1 + hvd.rank())
    rows, worst = [], 0.0
    for step in range(STEPS):
        opt.zero_grad()
        nn.functional.cross_entropy(model(torch.randn(16, 64, generator=gen)),
                                    torch.randint(0, 10, (16,), generator=gen)).backward()
        raw = {name: p.grad.detach().clone().view(-1) for name, p in params.items()}
        opt.step()  # Horovod's synchronize() writes Kimad's result into p.grad
        for name, p in params.items():
            g = hvd.allgather(raw[name].view(1, -1), name=f"reference.{name}")  # (world, n)
            n = p.numel()
            if n >= compression.controller.min_compress_numel:
                k = min(n, max(1, round(DENSITY * n)))
                sent = torch.stack([topk(g[r] - h[name][r], k) for r in range(world)])
            else:
                sent = g - h[name]  # dense: the message is v itself
            h[name] += sent
            H[name] += sent.sum(0) / world
            diff = float((p.grad.view(-1) - H[name]).abs().max())
            worst = max(worst, diff)
            assert torch.allclose(p.grad.view(-1), H[name], rtol=1e-5, atol=1e-6), (step, name, diff)
        m = compression.metrics
        assert m["agree_s"] == 0.0 and m["agree_bytes"] == 0 and m["profile_s"] == 0.0, m
        assert m["link_samples"] == [] and m["prev_link_comm_s"] is None, m
        rows.append(m["row"])
    assert len(set(rows)) == 1, rows  # one size every step: Horovod's cache holds it
    if hvd.rank() == 0:
        print("kimad static: " + json.dumps({"world": world, "steps": STEPS, "row": rows[0], "max_abs_diff": worst}),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
