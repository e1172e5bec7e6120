"""``python -m kimad.emulate --nodes N --trace NAME|FILE.csv [--check] [-- COMMAND ...]`` (as root).

Sets up N namespaces with shaped links, plays the trace, runs COMMAND as N Horovod ranks
(output prefixed ``[rank]``) and exits with the first failing rank's code. ``--check`` instead
measures each node's shaped egress with a short TCP stream and prints measured vs requested.
Errors of the emulator itself (no root, no iproute2, a bad trace) exit with code 2.
"""

from __future__ import annotations

import argparse
import sys

from kimad.emulate.cluster import Cluster
from kimad.emulate.launch import run_horovod
from kimad.emulate.traces import BUILTIN_TRACES
from kimad.errors import KimadError


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    command: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, command = argv[:at], argv[at + 1:]
    p = argparse.ArgumentParser(prog="python -m kimad.emulate", description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=2, help="namespaces (nodes) in the cluster (default: 2)")
    p.add_argument("--trace", default="constant",
                   help=f"built-in trace ({', '.join(BUILTIN_TRACES)}) or a CSV file time_s,node,mbit")
    p.add_argument("--rate", type=float, default=100.0, help="base rate of built-in traces, Mbit/s (default: 100)")
    p.add_argument("--duration", type=float, default=60.0,
                   help="time scale of built-in traces, seconds (step-down switches at half) (default: 60)")
    p.add_argument("--period", type=float, default=None,
                   help="sampling period of sine/cloud (default: 1 s), phase length of square (default: 5 s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the cloud trace (default: 0)")
    p.add_argument("--delay-ms", type=float, default=0.0, help="netem delay on every node's egress, ms (default: 0)")
    p.add_argument("--loss", type=float, default=0.0, help="netem loss on every node's egress, percent (default: 0)")
    p.add_argument("--ranks-per-node", type=int, default=1, help="Horovod ranks per node (default: 1)")
    p.add_argument("--log", default=None, help="append every applied rate as a JSON line to this file")
    p.add_argument("--check", action="store_true", help="measure each node's shaped rate with TCP and exit")
    p.add_argument("--check-seconds", type=float, default=2.0, help="length of each --check transfer, s (default: 2)")
    args = p.parse_args(argv)
    if not args.check and not command:
        p.error("give a command after `--`, or --check")
    if args.check and args.nodes < 2:
        p.error("--check needs --nodes >= 2 (it sends from one node to another)")
    return args, command


def check(cluster: Cluster, seconds: float) -> None:
    """Measure node i -> node i+1 (egress of node i) and print requested vs measured Mbit/s."""
    print(f"{'node':>4}  {'requested Mbit/s':>16}  {'measured Mbit/s':>15}  {'ratio':>5}", flush=True)
    for node in range(cluster.nodes):
        requested = cluster.rates[node]
        measured = cluster.measure_rate(node, (node + 1) % cluster.nodes, seconds) / 1e6
        print(f"{node:>4}  {requested:>16.2f}  {measured:>15.2f}  {measured / requested:>5.3f}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args, command = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cluster = Cluster(args.nodes, args.trace, rate_mbit=args.rate, delay_ms=args.delay_ms, loss_pct=args.loss,
                          duration_s=args.duration, period_s=args.period, seed=args.seed, log_path=args.log,
                          play=not args.check)
        with cluster:
            print(f"kimad.emulate: {args.nodes} nodes {cluster.prefix}n*, {cluster.address(0)}.., "
                  f"bridge {cluster.bridge} at {cluster.bridge_address}, trace {args.trace}, "
                  f"TCP {cluster.congestion_control}", file=sys.stderr, flush=True)
            if args.check:
                check(cluster, args.check_seconds)
                return 0
            code = run_horovod(cluster, command, ranks_per_node=args.ranks_per_node)
            return code if code >= 0 else 128 - code  # a rank killed by signal s exits as 128 + s
    except KimadError as error:
        print(f"kimad.emulate: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kimad.emulate: interrupted; cluster torn down", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
