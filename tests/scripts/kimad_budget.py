"""Run under horovodrun: with a fixed budget and a learned (not given) link, Kimad's measured
communication time per step tracks the budget.

A ~4.2M-parameter MLP (16.8 MB of fp32 gradients) trains on random batches. First the script times
the dense fp32 allreduce of a buffer that size over this very link (median of a few, maximum over
ranks), then sets Kimad's budget to ``--fraction`` of it, so compression is needed for the budget to
bind. Kimad learns bandwidth and latency from its own timed collectives. After ``--warmup`` steps,
every step's communication time on the link (``prev_link_comm_s`` of the next step: Kimad's
allgather + allreduce, measured, minimum over ranks) is compared with the budget.
Rank 0 prints one line ``kimad budget: {json}`` with the per-step ratios measured comm / budget
and predicted comm / budget (None where the plan was over budget), and ``dense_spread``, the
slowest / fastest of the dense timings: how stable the link was.

    python kimad_budget.py [--steps 40] [--warmup 10] [--fraction 0.25]
"""

import argparse
import json
import math
import statistics
import sys
import time

import horovod.torch as hvd
import torch
from torch import nn

import kimad.horovod


def dense_allreduce_s(numel: int, repeats: int) -> tuple[float, float]:
    """Median seconds of a Sum allreduce of ``numel`` float32 over all ranks, and the spread of the
    timings (slowest / fastest; a stable link gives ~1), both maxima over ranks."""
    buffer = torch.randn(numel)
    times = []
    for i in range(repeats + 1):
        hvd.allreduce(torch.zeros(1), name=f"budget.sync.{i}")  # start together
        t0 = time.perf_counter()
        hvd.allreduce(buffer, op=hvd.Sum, name=f"budget.dense.{i}")
        times.append(time.perf_counter() - t0)
    local = torch.tensor([statistics.median(times[1:]), max(times[1:]) / min(times[1:])], dtype=torch.float64)
    median, spread = hvd.allreduce(local, op=hvd.Max, name="budget.max").tolist()
    return median, spread


def link_samples_disagree(m: dict, prev: dict | None) -> bool:
    """Whether the step's ``link_samples`` (what it fed the estimator) disagree with the previous step's
    collectives: its data allgather (its row's bytes, and link seconds = ``prev_link_comm_s`` when no dense
    allreduce followed it: that one is timed, not fed, unless the allgather held the digest prefix alone), then
    its agree allgather."""
    samples = m["link_samples"]
    if prev is None:
        return samples != []
    *data, agree = samples
    # the dense allreduce is fed after an allgather of the digest prefix alone
    fed_allreduce = prev["dense_route"] == "allreduce" and prev["row"] <= kimad.horovod.DIGEST_PREFIX_BYTES
    data_ok = [(c, b) for c, b, _ in data] == [("allgather", prev["row"])] + (
        [("allreduce", prev["actual_bytes"] - prev["row"])] if fed_allreduce else [])
    if prev["dense_route"] != "allreduce" or fed_allreduce:
        data_ok = data_ok and math.isclose(sum(s for _, _, s in data), m["prev_link_comm_s"], rel_tol=1e-9)
    return not (data_ok and agree == ["allgather", prev["agree_bytes"], m["prev_link_agree_s"]])


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--fraction", type=float, default=0.25)
    p.add_argument("--width", type=int, default=1024)
    args = p.parse_args()
    hvd.init()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rank = hvd.rank()
    width = args.width
    hidden = [m for _ in range(4) for m in (nn.Linear(width, width), nn.ReLU())]
    model = nn.Sequential(*hidden, nn.Linear(width, 10))
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    numel = sum(q.numel() for q in model.parameters())
    dense_s, spread = dense_allreduce_s(numel, repeats=7)
    budget = args.fraction * dense_s
    opt = kimad.horovod.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01),
                                             named_parameters=model.named_parameters(), budget_s=budget,
                                             allocator="layerwise", compressors=("topk",), error_feedback="ef21")
    ratios, nbytes, predicted, probes, hedges, lifts, unlogged, cached = [], [], [], [], [], [], [], []
    prev = None
    for step in range(args.warmup + args.steps):
        g = torch.Generator().manual_seed(100 * step + rank)
        x, y = torch.randn(32, width, generator=g), torch.randint(0, 10, (32,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        m = opt.kimad.metrics
        if step > args.warmup:  # the link's time of the previous step (minimum over ranks: no wait for stragglers)
            ratios.append(m["prev_link_comm_s"] / budget)
        if step >= args.warmup:
            nbytes.append(m["actual_bytes"])
            predicted.append(None if m["over_budget"] else m["predicted_comm_s"] / budget)
        unlogged += [step] if link_samples_disagree(m, prev) else []
        cached += [step] if m["row_cached"] else []
        prev = m
        probes += [step] if m["probe"] else []
        hedges += [step] if m["hedge"] else []
        lifts += [step] if m["lift"] else []
    within = sum(0.75 <= r <= 1.25 for r in ratios) / len(ratios)
    result = {"rank": rank, "ranks": hvd.size(), "parameters": numel, "dense_allreduce_s": dense_s,
              "dense_spread": spread, "budget_s": budget, "within_25pct": within,
              "median_ratio": statistics.median(ratios), "ratios": [round(r, 3) for r in ratios],
              "predicted_ratios": [None if r is None else round(r, 4) for r in predicted],
              "median_bytes": statistics.median(nbytes), "dense_bytes": 4 * numel,
              "bandwidth_bps": opt.kimad.metrics["bandwidth_bps"],
              "latency_s": opt.kimad.metrics["latency_s"], "probe_steps": probes, "hedge_steps": hedges,
              "lift_steps": lifts,
              "link_samples_disagree": unlogged, "row_cached_share": len(cached) / (args.warmup + args.steps)}
    if rank == 0:
        print("kimad budget: " + json.dumps(result), flush=True)
    hvd.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
