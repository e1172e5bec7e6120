"""An emulated multi-node cluster on one machine: network namespaces, shaped links, bandwidth traces.

    with Cluster(nodes=2, trace="step-down", rate_mbit=100, duration_s=20) as cluster:
        code = run_horovod(cluster, [sys.executable, "train.py"])
        print(cluster.applied)          # every rate the trace player set, with timestamps

or from a shell (as root): ``python -m kimad.emulate --nodes 4 --trace step-down -- python train.py``.
"""

from kimad.emulate.cluster import Cluster, ClusterError, PrivilegeError, require_privileges
from kimad.emulate.launch import run_horovod
from kimad.emulate.traces import BUILTIN_TRACES, RateChange, TraceError, builtin_trace, load_trace, parse_csv_trace

__all__ = [
    "BUILTIN_TRACES",
    "Cluster",
    "ClusterError",
    "PrivilegeError",
    "RateChange",
    "TraceError",
    "builtin_trace",
    "load_trace",
    "parse_csv_trace",
    "require_privileges",
    "run_horovod",
]
