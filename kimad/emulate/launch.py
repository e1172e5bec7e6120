"""Start a Horovod (Gloo) job across an emulated :class:`~kimad.emulate.cluster.Cluster`.

Reproduces what ``horovodrun --gloo`` does for each rank: a ``RendezvousServer`` initialised with
``get_host_assignments(parse_hosts("h0:s,h1:s,..."), n)`` listens in the root namespace (ranks
reach it at the bridge address), and every rank gets the environment of Horovod's gloo launcher
(``create_run_env_vars`` and ``create_slot_env_vars``), here with ``HOROVOD_GLOO_IFACE=eth0``,
the name of every node's interface. Ranks run under ``ip netns exec``, each in its own process
group; their output is line-prefixed with ``[rank]``. When a rank fails the others are stopped,
as horovodrun does, and the first failing rank's exit code is returned.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from typing import TextIO

from kimad.emulate.cluster import Cluster, ClusterError, _kill_group


def _forward(proc: subprocess.Popen, rank: int, out: TextIO, lock: threading.Lock) -> None:
    for line in proc.stdout:
        with lock:
            out.write(f"[{rank}] {line}" if line.endswith("\n") else f"[{rank}] {line}\n")
            out.flush()


def run_horovod(
    cluster: Cluster,
    command: list[str],
    ranks_per_node: int = 1,
    env: dict[str, str] | None = None,
    out: TextIO | None = None,
) -> int:
    """Run ``command`` as ``nodes * ranks_per_node`` Horovod ranks; return 0 or the first failing rank's code."""
    try:
        from horovod.runner.common.util.hosts import get_host_assignments, parse_hosts
        from horovod.runner.gloo_run import create_run_env_vars, create_slot_env_vars
        from horovod.runner.http.http_server import RendezvousServer
    except ImportError as error:
        raise ClusterError(f"Horovod's runner is not importable ({error}); install Horovod 0.28.1 with Gloo") from None
    if not command:
        raise ClusterError("no command to run on the cluster; give it after `--`")
    if ranks_per_node < 1:
        raise ClusterError(f"ranks_per_node must be >= 1, got {ranks_per_node!r}")
    out = out if out is not None else sys.stdout
    size = cluster.nodes * ranks_per_node
    plan = get_host_assignments(parse_hosts(",".join(f"h{i}:{ranks_per_node}" for i in range(cluster.nodes))), size)

    rendezvous = RendezvousServer(verbose=0)
    port = rendezvous.start()  # binds every root-namespace address, the bridge's included
    rendezvous.init(plan)
    base = dict(os.environ if env is None else env, PYTHONUNBUFFERED="1")
    base.update({k: str(v) for k, v in create_run_env_vars(cluster.bridge_address, [cluster.iface], port).items()})
    # Shaped links at a few Mbit/s can stall a Gloo receive past Horovod's default 30 s (TCP back-off after
    # drops at the shaper, seen at 4 nodes and 20 Mbit/s with a 50 ms tbf queue); a value the caller set wins.
    base.setdefault("HOROVOD_GLOO_TIMEOUT_SECONDS", "300")

    lock = threading.Lock()
    procs: list[subprocess.Popen] = []
    forwarders: list[threading.Thread] = []
    try:
        for slot in plan:
            rank_env = dict(base, **create_slot_env_vars(slot))
            node = int(slot.hostname[1:])
            proc = cluster.popen(node, list(command), env=rank_env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, errors="replace")
            procs.append(proc)
            forwarder = threading.Thread(target=_forward, args=(proc, slot.rank, out, lock), daemon=True)
            forwarder.start()
            forwarders.append(forwarder)
        first_failure: int | None = None
        running = set(range(len(procs)))
        while running:
            for rank in sorted(running):
                code = procs[rank].poll()
                if code is None:
                    continue
                running.discard(rank)
                if code != 0 and first_failure is None:
                    first_failure = code
                    with lock:
                        out.write(f"kimad.emulate: rank {rank} exited with {code}; stopping the other ranks\n")
                        out.flush()
                    for other in running:
                        _kill_group(procs[other])
            time.sleep(0.05)
        for forwarder in forwarders:
            forwarder.join(timeout=5.0)
        return 0 if first_failure is None else first_failure
    finally:
        for proc in procs:
            _kill_group(proc, grace_s=1.0)
        rendezvous.stop()
