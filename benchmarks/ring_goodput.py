"""How much of an emulated link's shaped rate Horovod's ring collectives get, per message size (as root).

    python benchmarks/ring_goodput.py [--nodes 4] [--rate 20] [--congestion-control reno] [--reps 25]

Builds a :class:`kimad.emulate.Cluster` of ``--nodes`` nodes at a constant ``--rate`` Mbit/s and runs one idle
Horovod rank per node. Each rank times ``--reps`` collectives of each size after a barrier (a 1-element
allreduce and 5 ms of sleep), in three kinds taken in turn: an allgather of the same size every time, which
Horovod's response cache holds (keyed by name, with the shape); an allgather 1-3 elements larger than the last,
which misses it, so the ranks negotiate through the coordinator again (as every Kimad step did until its
allgather's rows were named by size: ``kimad.horovod.row_grid``); and a (cached) Sum allreduce with as many
bytes on each ring link as the allgather (``n * m / 2`` bytes for ``m`` per rank). Measured here (4 nodes, 2
cores, session 11): at 20 Mbit/s a new size cost 2-3 ms more (4 kB: 8.6 ms against 5.4), at 100 Mbit/s
1.1-1.7x as long (30 kB: 21.7 ms against 12.5). The allreduce and the cached allgather are then fitted jointly
by two latency models, the ring's (``2 (n - 1)`` latencies for the allreduce, ``n - 1`` for the allgather:
:func:`kimad.control.cost.latency_terms`) and one latency per collective, and each model's RMS relative error
is printed: which of them describes the link's fixed costs.
Per size and kind the figure is the median over repetitions of the minimum over ranks
(the rank that entered last waited for nobody: the link's time, as Kimad measures it). It prints, per size,
the time against the shaped rate's ideal for the payload (``(n - 1) * m * 8 / rate``) and for the frames
(times :data:`kimad.control.cost.TCP_ETHERNET_FRAMING`), and an alpha-beta least-squares fit over the
sizes of at least 12 kB: the per-round latency and the rate it implies, as a share of the shaped rate
(1 / framing = 0.957 is what TCP over Ethernet can carry).

``--congestion-control`` overrides the namespaces' TCP congestion control (the cluster picks cubic, or reno
where cubic cannot be loaded) to compare, e.g., ``bbr``, the default of some hosts. Measured here (4 nodes,
2 cores, session 5): bbr 0.82 of 20 Mbit/s and 0.70 of 100 Mbit/s, reno 0.93 and 0.91.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SIZES = (200, 4_000, 12_000, 30_000, 60_000, 120_000)  # bytes per rank
FIT_FROM = 12_000
RESULT = "ring goodput: "


def measure(reps: int) -> None:
    """One rank's part (run under Horovod): time every size; rank 0 prints the result as one JSON line."""
    import horovod.torch as hvd
    import torch

    hvd.init()
    torch.set_num_threads(1)
    kinds = ("same", "new", "allreduce")
    medians = {kind: {} for kind in kinds}
    for nbytes in SIZES:
        elements = max(1, nbytes // 4)
        times = {kind: [] for kind in kinds}
        for rep in range(len(kinds) * reps):  # the kinds in turn
            kind = kinds[rep % len(kinds)]
            if kind == "new":  # one to three elements more than the last time, as Kimad's message changes size
                x = torch.zeros(elements + (rep // 3) % 3 + 1)
            elif kind == "allreduce":  # as many bytes on each ring link as the allgather's
                x = torch.zeros(allreduce_bytes(hvd.size(), nbytes) // 4)
            else:
                x = torch.zeros(elements)
            hvd.allreduce(torch.zeros(1), name="barrier")
            time.sleep(0.005)
            t0 = time.perf_counter()
            if kind == "allreduce":
                hvd.allreduce(x, op=hvd.Sum, name=f"ar{nbytes}")
            else:
                hvd.allgather(x, name=f"ag{nbytes}{kind}")
            times[kind].append(time.perf_counter() - t0)
        for kind, ts in times.items():
            per_rank = hvd.allgather(torch.tensor([ts], dtype=torch.float64), name=f"times{nbytes}{kind}")
            medians[kind][nbytes] = statistics.median(per_rank.min(0).values.tolist())
    if hvd.rank() == 0:
        print(RESULT + json.dumps({"world": hvd.size(), "seconds": medians}), flush=True)


def allreduce_bytes(world: int, nbytes: int) -> int:
    """Bytes of the "allreduce" kind's buffer for an allgather of ``nbytes`` per rank: the same ring link bytes."""
    return 4 * max(1, world * max(1, nbytes // 4) // 2)


def report(result: dict, rate_mbit: float, congestion_control: str) -> None:
    import numpy as np

    from kimad.control.cost import TCP_ETHERNET_FRAMING, latency_terms, link_bytes

    n, bps = result["world"], rate_mbit * 1e6
    print(f"{n} nodes at {rate_mbit:g} Mbit/s, TCP {congestion_control}; median over repetitions of the min over ranks")
    for kind, label in (("same", "allgather, the same size every time (Horovod's response cache hits)"),
                        ("new", "allgather, a new size every time (the cache misses)"),
                        ("allreduce", "allreduce with the allgather's ring link bytes, labelled by the "
                                      "allgather's bytes/rank")):
        if kind not in result["seconds"]:  # (results from before the allreduce kind)
            continue
        seconds = {int(k): v for k, v in result["seconds"][kind].items()}
        print(f"{label}:")
        print(f"{'bytes/rank':>10} {'ms':>8} {'ideal payload ms':>16} {'ideal frames ms':>15} {'frames/ms ratio':>15}")
        for nbytes, s in seconds.items():
            payload = 8 * link_bytes("allgather", n, nbytes) / bps
            print(f"{nbytes:>10,} {s * 1e3:>8.2f} {payload * 1e3:>16.2f} {payload * TCP_ETHERNET_FRAMING * 1e3:>15.2f} "
                  f"{payload * TCP_ETHERNET_FRAMING / s:>15.3f}")
        fit = [k for k in seconds if k >= FIT_FROM]
        collective = "allreduce" if kind == "allreduce" else "allgather"
        design = np.array([[latency_terms(collective, n), 8 * link_bytes("allgather", n, k)] for k in fit])
        (alpha, beta), *_ = np.linalg.lstsq(design, np.array([seconds[k] for k in fit]), rcond=None)
        print(f"alpha-beta fit over sizes >= {FIT_FROM:,} B: latency {alpha * 1e3:.3f} ms per round, payload rate "
              f"{1 / beta / 1e6:.2f} Mbit/s = {1 / beta / bps:.3f} of the shaped rate (frames: "
              f"{TCP_ETHERNET_FRAMING / beta / bps:.3f})")
    if "allreduce" in result["seconds"]:
        latency_models(result, n, bps)


def latency_models(result: dict, n: int, bps: float) -> None:
    """Fit the cached allgather and the allreduce (sizes >= FIT_FROM) jointly, relative least squares, with the
    ring's latency terms and with one latency per collective; print each model's fit and RMS relative error."""
    import numpy as np

    from kimad.control.cost import latency_terms, link_bytes

    samples = [(c, int(k), s) for kind, c in (("same", "allgather"), ("allreduce", "allreduce"))
               for k, s in result["seconds"][kind].items() if int(k) >= FIT_FROM]
    y = np.array([s for _, _, s in samples])
    bits = [8 * link_bytes("allgather", n, k) for _, k, _ in samples]  # both kinds carry the same link bytes
    print("latency models, the cached allgather and the allreduce fitted jointly (relative least squares):")
    for label, terms in (("ring (n-1 / 2(n-1) latencies)", lambda c: latency_terms(c, n)),
                         ("one latency per collective", lambda c: 1)):
        design = np.array([[terms(c), b] for (c, _, _), b in zip(samples, bits)])
        (alpha, beta), *_ = np.linalg.lstsq(design / y[:, None], np.ones_like(y), rcond=None)
        rms = float(np.sqrt(np.mean((design @ np.array([alpha, beta]) / y - 1.0) ** 2)))
        print(f"  {label:<32} latency {alpha * 1e3:.3f} ms, payload rate {1 / beta / bps:.3f} of the shaped rate, "
              f"RMS relative error {rms:.1%}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nodes", type=int, default=4, help="emulated nodes, one rank each (default 4)")
    p.add_argument("--rate", type=float, default=20.0, help="every node's shaped rate, Mbit/s (default 20)")
    p.add_argument("--congestion-control", default=None, help="TCP congestion control in every namespace "
                   "(default: the cluster's, cubic or reno)")
    p.add_argument("--reps", type=int, default=25, help="collectives per size and kind (default 25)")
    p.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)  # a rank's part
    args = p.parse_args()
    if args.measure:
        measure(args.reps)
        return 0
    if args.nodes < 2 or args.reps < 1 or not args.rate > 0:
        p.error("--nodes must be >= 2, --reps >= 1 and --rate > 0")
    sys.path.insert(0, str(ROOT))
    from kimad.bench.e2e import rank_environment
    from kimad.emulate import Cluster, run_horovod
    from kimad.emulate.cluster import CONGESTION_CONTROLS
    from kimad.errors import KimadError

    controls = (args.congestion_control,) if args.congestion_control else CONGESTION_CONTROLS
    try:
        with Cluster(args.nodes, "constant", rate_mbit=args.rate, congestion_controls=controls) as cluster, \
                tempfile.TemporaryFile("w+") as out:
            cc = cluster.congestion_control
            print(f"timing {len(SIZES)} sizes x 3 kinds x {args.reps} collectives on {args.nodes} nodes ...",
                  file=sys.stderr, flush=True)
            code = run_horovod(cluster, [sys.executable, os.path.abspath(__file__), "--measure", "--reps",
                                         str(args.reps)], env=rank_environment(), out=out)
            out.seek(0)
            text = out.read()
    except KimadError as error:
        print(f"ring_goodput: error: {error}", file=sys.stderr)
        return 2
    lines = [line.split(RESULT, 1)[1] for line in text.splitlines() if RESULT in line]
    if code != 0 or not lines:
        print(f"ring_goodput: the ranks failed (exit {code}):\n{text[-3000:]}", file=sys.stderr)
        return 1
    report(json.loads(lines[0]), args.rate, cc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
