"""How much of an emulated link's shaped rate Horovod's ring allgather gets, per message size (as root).

    python benchmarks/ring_goodput.py [--nodes 4] [--rate 20] [--congestion-control reno] [--reps 25]

Builds a :class:`kimad.emulate.Cluster` of ``--nodes`` nodes at a constant ``--rate`` Mbit/s and runs one idle
Horovod rank per node. Each rank times ``--reps`` allgathers of each size after a barrier (a 1-element
allreduce and 5 ms of sleep), in two kinds taken in turn: the same size every time, which Horovod's response
cache holds (keyed by name, with the shape), and a size 1-3 elements larger than the last, which misses it, so
the ranks negotiate through the coordinator again (as every Kimad step did until its allgather kept its row
size: ``kimad.horovod.ROW_BAND``). Measured here (4 nodes, 2 cores, session 11): at 20 Mbit/s a new size cost
2-3 ms more (4 kB: 8.6 ms against 5.4), at 100 Mbit/s 1.1-1.7x as long (30 kB: 21.7 ms against 12.5).
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
    medians = {"same": {}, "new": {}}
    for nbytes in SIZES:
        elements = max(1, nbytes // 4)
        times = {"same": [], "new": []}
        for rep in range(2 * reps):  # the two kinds in turn
            kind = "new" if rep % 2 else "same"
            # "new": one to three elements more than the last time, as Kimad's message changes size every step
            x = torch.zeros(elements + (rep // 2) % 3 + 1 if kind == "new" else elements)
            hvd.allreduce(torch.zeros(1), name="barrier")
            time.sleep(0.005)
            t0 = time.perf_counter()
            hvd.allgather(x, name=f"ag{nbytes}{kind}")
            times[kind].append(time.perf_counter() - t0)
        for kind, ts in times.items():
            per_rank = hvd.allgather(torch.tensor([ts], dtype=torch.float64), name=f"times{nbytes}{kind}")
            medians[kind][nbytes] = statistics.median(per_rank.min(0).values.tolist())
    if hvd.rank() == 0:
        print(RESULT + json.dumps({"world": hvd.size(), "seconds": medians}), flush=True)


def report(result: dict, rate_mbit: float, congestion_control: str) -> None:
    import numpy as np

    from kimad.control.cost import TCP_ETHERNET_FRAMING, latency_terms, link_bytes

    n, bps = result["world"], rate_mbit * 1e6
    print(f"{n} nodes at {rate_mbit:g} Mbit/s, TCP {congestion_control}; median over repetitions of the min over ranks")
    for kind, label in (("same", "the same size every time (Horovod's response cache hits)"),
                        ("new", "a new size every time, as Kimad's data allgather (the cache misses)")):
        seconds = {int(k): v for k, v in result["seconds"][kind].items()}
        print(f"{label}:")
        print(f"{'bytes/rank':>10} {'ms':>8} {'ideal payload ms':>16} {'ideal frames ms':>15} {'frames/ms ratio':>15}")
        for nbytes, s in seconds.items():
            payload = 8 * link_bytes("allgather", n, nbytes) / bps
            print(f"{nbytes:>10,} {s * 1e3:>8.2f} {payload * 1e3:>16.2f} {payload * TCP_ETHERNET_FRAMING * 1e3:>15.2f} "
                  f"{payload * TCP_ETHERNET_FRAMING / s:>15.3f}")
        fit = [k for k in seconds if k >= FIT_FROM]
        design = np.array([[latency_terms("allgather", n), 8 * link_bytes("allgather", n, k)] for k in fit])
        (alpha, beta), *_ = np.linalg.lstsq(design, np.array([seconds[k] for k in fit]), rcond=None)
        print(f"alpha-beta fit over sizes >= {FIT_FROM:,} B: latency {alpha * 1e3:.3f} ms per round, payload rate "
              f"{1 / beta / 1e6:.2f} Mbit/s = {1 / beta / bps:.3f} of the shaped rate (frames: "
              f"{TCP_ETHERNET_FRAMING / beta / bps:.3f})")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nodes", type=int, default=4, help="emulated nodes, one rank each (default 4)")
    p.add_argument("--rate", type=float, default=20.0, help="every node's shaped rate, Mbit/s (default 20)")
    p.add_argument("--congestion-control", default=None, help="TCP congestion control in every namespace "
                   "(default: the cluster's, cubic or reno)")
    p.add_argument("--reps", type=int, default=25, help="allgathers per size (default 25)")
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
            print(f"timing {len(SIZES)} sizes x {args.reps} allgathers on {args.nodes} nodes ...", file=sys.stderr,
                  flush=True)
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
