"""A cluster of network namespaces on one machine, with shaped, time-varying egress links.

Each node ``i`` is a namespace ``kimad-<pid>-<k>-n<i>`` holding one end of a veth pair, renamed
``eth0``, with address 198.18.X.(i+1)/24; the other end sits in a bridge in the root namespace
(address 198.18.X.254). Egress of every node's ``eth0`` is shaped by an ``htb`` class (under
``netem`` when a delay or loss is asked for) with a burst of only 1 ms of traffic, so that short
messages see the rate too, and packets under 128 bytes (ACKs, Gloo's rendezvous notices) ahead of
bulk data, as a host's fq_codel would put them; and each namespace keeps TCP's congestion window across idle gaps
(``net.ipv4.tcp_slow_start_after_idle=0``, as tuned training hosts do) and uses a loss-based congestion control,
Linux's default cubic, or reno where cubic cannot be loaded (:data:`CONGESTION_CONTROLS`): BBR, the default of
some hosts (this one's), sizes its window to the path's delay, and on these sub-millisecond links held it at a
few packets, so a ring allgather got 0.70 of a 100 Mbit/s link (reno: 0.91; 0.957 is the framing's limit).
A :class:`TracePlayer` thread changes the rates over time.

``Cluster`` is a context manager: everything it creates (namespaces, links, qdiscs,
``/etc/netns/<ns>`` files, processes it started) is removed on exit, on exceptions, on SIGTERM
(turned into ``SystemExit`` while a cluster is up) and, as a last resort, at interpreter exit.
"""

from __future__ import annotations

import atexit
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from kimad.emulate.traces import RateChange, initial_rates, load_trace
from kimad.errors import KimadError


class ClusterError(KimadError, RuntimeError):
    """Setting up, shaping or tearing down the emulated cluster failed."""


class PrivilegeError(ClusterError):
    """The emulator needs root and the ``ip`` and ``tc`` tools (iproute2); one is missing."""


SUBNETS = 512  # /24s in 198.18.0.0/15
CONGESTION_CONTROLS = ("cubic", "reno")  # each namespace's TCP congestion control: the first the kernel accepts
NETNS_ETC = Path("/etc/netns")
_serial = itertools.count()
_live: set["Cluster"] = set()


def require_privileges() -> None:
    """Raise :class:`PrivilegeError` unless running as root with ``ip`` and ``tc`` on PATH."""
    if os.geteuid() != 0:
        raise PrivilegeError("kimad.emulate needs root (network namespaces, bridges, tc); run it as root")
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        raise PrivilegeError(f"kimad.emulate needs iproute2: {' and '.join(missing)} not found on PATH")


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise ClusterError(f"`{' '.join(argv)}` failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def _used_subnets() -> set[int]:
    """Indices of the 198.18.0.0/15 /24s already holding an address in the root namespace."""
    used = set()
    for line in _run("ip", "-4", "-o", "addr", "show").stdout.splitlines():
        for word in line.split():
            if word.startswith(("198.18.", "198.19.")):
                a, b, c = word.split(".")[:3]
                used.add((int(b) - 18) * 256 + int(c))
    return used


# Shaping: an HTB class at the node's rate with two leaves. Packets under 128 bytes (pure TCP ACKs and
# Gloo's send/recv-ready notices) go first; everything else queues behind them. With one FIFO (tbf) a
# node's notices and ACKs waited behind its own outgoing data, and Gloo's rendezvous (a sender waits for
# the receiver's recv-ready) turned each ring round into up to two transfers: a 4-node allgather reached
# 0.70-0.85 of the shaped rate (2 nodes: 0.94). Hosts avoid that with fq_codel, which this kernel lacks.
_SMALL_PACKET_MASK = "0xff80"  # IPv4 total length & 0xff80 == 0: under 128 bytes


def _rate_classes(mbit: float, handle: str) -> list[tuple[str, str, list[str]]]:
    """``(classid, parent, htb arguments)`` of the shaping classes for ``mbit`` Mbit/s under the HTB qdisc
    ``handle`` (``"1:"``, or ``"10:"`` under netem).

    Burst of 1 ms of traffic (>= 4 KiB): at 32 KiB a 45 kB message crossed a 20 Mbit/s link at ~40
    Mbit/s, which no real 20 Mbit/s link does. The small-packet leaf is guaranteed 1% of the rate and
    may borrow all of it; the bulk leaf the rest; neither exceeds the node's rate together.
    """
    kbit = max(2, round(mbit * 1000))
    small = max(1, kbit // 100)
    burst = str(max(4 * 1024, int(mbit * 1e6 / 8 / 1000)))
    shape = ["burst", burst, "cburst", burst, "quantum", "1514"]
    node = handle + "1"
    return [(node, handle, ["rate", f"{kbit}kbit", "ceil", f"{kbit}kbit", *shape]),
            (handle + "10", node, ["rate", f"{small}kbit", "ceil", f"{kbit}kbit", "prio", "0", *shape]),
            (handle + "20", node, ["rate", f"{kbit - small}kbit", "ceil", f"{kbit}kbit", "prio", "1", *shape])]


class Cluster:
    """``nodes`` namespaces behind one bridge, egress shaped per node by ``trace`` (Mbit/s over seconds).

    ``trace`` is a built-in name, a CSV path, or a tuple of :class:`RateChange`; ``rate_mbit``,
    ``duration_s``, ``period_s`` (``None``: the trace's default) and ``seed`` parametrise built-ins.
    ``delay_ms`` and ``loss_pct`` add netem delay (milliseconds) and loss (percent) on every node's egress.
    Every applied rate is kept in :attr:`applied` and, when ``log_path`` is given, appended there as JSON lines.
    Each namespace's TCP congestion control is the first of ``congestion_controls`` the kernel accepts (default
    :data:`CONGESTION_CONTROLS`; e.g. ``("bbr",)`` to measure BBR), kept in :attr:`congestion_control`.
    """

    def __init__(
        self,
        nodes: int,
        trace: str | tuple[RateChange, ...] = "constant",
        rate_mbit: float = 100.0,
        delay_ms: float = 0.0,
        loss_pct: float = 0.0,
        duration_s: float = 60.0,
        period_s: float | None = None,
        seed: int = 0,
        log_path: str | os.PathLike | None = None,
        play: bool = True,
        congestion_controls: tuple[str, ...] = CONGESTION_CONTROLS,
    ) -> None:
        if not isinstance(nodes, int) or nodes < 1 or nodes > 253:
            raise ClusterError(f"nodes must be an integer in 1..253, got {nodes!r}")
        if delay_ms < 0 or not 0 <= loss_pct < 100:
            raise ClusterError(f"delay_ms must be >= 0 and loss_pct in [0, 100), got {delay_ms!r} and {loss_pct!r}")
        if isinstance(congestion_controls, str) or not congestion_controls \
                or not all(isinstance(c, str) and c for c in congestion_controls):
            raise ClusterError(f"congestion_controls must be a non-empty sequence of TCP congestion control names, "
                               f"got {congestion_controls!r}")
        self.congestion_controls = tuple(congestion_controls)
        self.nodes = nodes
        self.trace = (trace if isinstance(trace, tuple)
                      else load_trace(trace, nodes, rate_mbit, duration_s, period_s, seed))
        self.rates = initial_rates(self.trace, nodes)
        self.delay_ms, self.loss_pct = float(delay_ms), float(loss_pct)
        self.log_path = Path(log_path) if log_path is not None else None
        self.play = play
        self._serial = next(_serial) % 256
        self.prefix = f"kimad-{os.getpid()}-{self._serial}-"
        # Link names have at most 15 characters: k<pid hex>x<serial hex>-<role><node hex>.
        self.link_prefix = f"k{os.getpid():x}x{self._serial:x}-"
        self.namespaces = [f"{self.prefix}n{i}" for i in range(nodes)]
        self.host_links = [f"{self.link_prefix}h{i:x}" for i in range(nodes)]
        self.bridge = f"{self.link_prefix}br"
        self.iface = "eth0"
        self.applied: list[dict] = []
        self.processes: list[subprocess.Popen] = []
        self._lock = threading.Lock()
        self._player: TracePlayer | None = None
        self._old_handlers: dict[int, object] = {}
        self._torn_down = True
        self.subnet = None
        self.t0 = None
        self.congestion_control: str | None = None  # set up: the namespaces' TCP congestion control

    # -- addresses -----------------------------------------------------------------------
    def address(self, node: int) -> str:
        """IPv4 address of node ``node`` inside its namespace."""
        return f"{self._net}.{node + 1}"

    @property
    def bridge_address(self) -> str:
        """IPv4 address of the bridge in the root namespace (where the rendezvous server listens)."""
        return f"{self._net}.254"

    @property
    def _net(self) -> str:
        return f"198.{18 + self.subnet // 256}.{self.subnet % 256}"

    # -- life cycle ----------------------------------------------------------------------
    def __enter__(self) -> "Cluster":
        require_privileges()
        self._torn_down = False
        _live.add(self)
        self._trap_signals()
        try:
            self._set_up()
        except BaseException:
            self.tear_down()
            raise
        if self.play:
            self.start_trace()
        return self

    def __exit__(self, *exc) -> None:
        self.tear_down()

    def _set_up(self) -> None:
        used = _used_subnets()
        start = (os.getpid() * 7 + self._serial) % SUBNETS
        free = [s for s in range(SUBNETS) if (start + s) % SUBNETS not in used]
        if not free:
            raise ClusterError("every /24 of 198.18.0.0/15 is in use on this machine")
        self.subnet = (start + free[0]) % SUBNETS
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        _run("ip", "addr", "add", f"{self.bridge_address}/24", "dev", self.bridge)
        _run("ip", "link", "set", self.bridge, "up")
        hostname = socket.gethostname()
        for i, (ns, host) in enumerate(zip(self.namespaces, self.host_links)):
            inner = f"{self.link_prefix}n{i:x}"
            _run("ip", "netns", "add", ns)
            _run("ip", "link", "add", inner, "type", "veth", "peer", "name", host)
            _run("ip", "link", "set", host, "master", self.bridge)
            _run("ip", "link", "set", host, "up")
            _run("ip", "link", "set", inner, "netns", ns)
            _run("ip", "-n", ns, "link", "set", inner, "name", self.iface)
            _run("ip", "-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", self.iface)
            # One TCP segment per packet: HTB charges a GSO super-packet (up to 64 KB) whole, after sending it
            # at line rate, so a message of tens of kB would cross before the rate applied.
            _run("ip", "-n", ns, "link", "set", self.iface, "gso_max_segs", "1")
            _run("ip", "-n", ns, "link", "set", self.iface, "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            # Keep TCP's congestion window across the idle gap between steps (as tuned training hosts do):
            # with the default, every step's collective restarts from slow start, and a message of tens of
            # kB never reaches the shaped rate.
            _run("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.tcp_slow_start_after_idle=0")
            self._set_congestion_control(ns)
            self._shape(i, self.rates[i], add=True)
            # Gloo resolves the machine's hostname; inside the namespace it must be this node's address.
            (NETNS_ETC / ns).mkdir(parents=True, exist_ok=True)
            (NETNS_ETC / ns / "hosts").write_text(
                f"127.0.0.1 localhost\n{self.address(i)} {hostname}\n::1 localhost ip6-localhost\n"
            )
        self.t0 = time.monotonic()
        for i, mbit in enumerate(self.rates):
            self._log(i, mbit)

    def _set_congestion_control(self, ns: str) -> None:
        """Set the first of :attr:`congestion_controls` the kernel takes in namespace ``ns`` (in
        :attr:`congestion_control`; the one the previous namespace took is tried first). Reno, the default's
        fallback, is built into every Linux, so failing all is an error."""
        taken = [c for c in self.congestion_controls if c == self.congestion_control]
        for name in taken + [c for c in self.congestion_controls if c != self.congestion_control]:
            key = f"net.ipv4.tcp_congestion_control={name}"
            if _run("ip", "netns", "exec", ns, "sysctl", "-qw", key, check=False).returncode == 0:
                self.congestion_control = name
                return
        raise ClusterError(f"namespace {ns} accepts none of the TCP congestion controls {self.congestion_controls}")

    def _shape(self, node: int, mbit: float, add: bool = False) -> None:
        ns, verb = self.namespaces[node], ("add" if add else "change")
        netem = self.delay_ms > 0 or self.loss_pct > 0
        if netem and add:
            args = ["netem", "delay", f"{self.delay_ms}ms", "loss", f"{self.loss_pct}%", "limit", "100000"]
            proc = _run("tc", "-n", ns, "qdisc", "add", "dev", self.iface, "root", "handle", "1:", *args, check=False)
            if proc.returncode != 0:
                raise ClusterError(f"cannot add netem delay {self.delay_ms} ms / loss {self.loss_pct}% on node {node}: "
                                   f"{proc.stderr.strip()} (is the kernel's sch_netem available?); "
                                   "run without delay and loss, or load sch_netem")
        # under netem (root 1:) the shaper's handle is 10:, else it is the root 1:
        handle = "10:" if netem else "1:"
        if add:
            where = ["parent", "1:", "handle", handle] if netem else ["root", "handle", handle]
            _run("tc", "-n", ns, "qdisc", "add", "dev", self.iface, *where, "htb", "default", "20")
        for classid, parent, args in _rate_classes(mbit, handle):
            _run("tc", "-n", ns, "class", verb, "dev", self.iface, "parent", parent, "classid", classid, "htb", *args)
        if add:
            _run("tc", "-n", ns, "filter", "add", "dev", self.iface, "parent", handle, "protocol", "ip", "prio", "1",
                 "u32", "match", "u16", "0x0000", _SMALL_PACKET_MASK, "at", "2", "flowid", handle + "10")

    def set_rate(self, node: int, mbit: float) -> None:
        """Change node ``node``'s egress rate to ``mbit`` Mbit/s now, and log it."""
        if not mbit > 0:
            raise ClusterError(f"rate for node {node} must be > 0 Mbit/s, got {mbit!r}")
        self._shape(node, mbit)
        self.rates[node] = float(mbit)
        self._log(node, mbit)

    def _log(self, node: int, mbit: float) -> None:
        entry = {"t": round(time.monotonic() - self.t0, 6), "wall": time.time(), "node": node, "mbit": float(mbit)}
        with self._lock:
            self.applied.append(entry)
            if self.log_path is not None:
                with open(self.log_path, "a") as log:
                    log.write(json.dumps(entry) + "\n")

    def start_trace(self) -> None:
        """Start playing the trace's changes after time 0 (seconds since set-up finished)."""
        if self._player is None:
            self._player = TracePlayer(self, [c for c in self.trace if c.time_s > 0])
            self._player.start()

    # -- processes -----------------------------------------------------------------------
    def popen(self, node: int, argv: list[str], **kwargs) -> subprocess.Popen:
        """Start ``argv`` inside node ``node``'s namespace, in its own process group, killed at tear-down."""
        proc = subprocess.Popen(["ip", "netns", "exec", self.namespaces[node], *argv], start_new_session=True, **kwargs)
        self.processes.append(proc)
        return proc

    def measure_rate(self, src: int, dst: int, seconds: float = 2.0) -> float:
        """Goodput in bits/s of one TCP stream from node ``src`` to node ``dst`` over ``seconds`` seconds."""
        port = 20000 + (os.getpid() + len(self.processes)) % 20000
        # Run the probe as a plain script: importing the kimad package would load torch (seconds).
        probe = [sys.executable, str(Path(__file__).with_name("probe.py"))]
        recv = self.popen(dst, [*probe, "recv", self.address(dst), str(port)], stdout=subprocess.PIPE, text=True)
        try:
            if recv.stdout.readline().strip() != "ready":
                raise ClusterError(f"TCP probe receiver on node {dst} did not start")
            send = self.popen(src, [*probe, "send", self.address(dst), str(port), str(seconds)])
            if send.wait(timeout=seconds + 30) != 0:
                raise ClusterError(f"TCP probe sender on node {src} failed ({send.returncode})")
            result = json.loads(recv.stdout.readline())
            recv.wait(timeout=30)
        finally:
            _kill_group(recv)
        return 8 * result["bytes"] / result["seconds"]

    # -- tear-down -----------------------------------------------------------------------
    def tear_down(self) -> list[str]:
        """Remove everything this cluster created; idempotent. Returns the problems met (also raised)."""
        if self._torn_down:
            return []
        self._torn_down = True
        if threading.current_thread() is threading.main_thread():
            # A second Ctrl-C must not cut the clean-up short; _restore_signals puts the handler back.
            self._old_handlers.setdefault(signal.SIGINT, signal.signal(signal.SIGINT, signal.SIG_IGN))
        problems: list[str] = []
        if self._player is not None:
            self._player.stop()
        for proc in self.processes:
            _kill_group(proc)
        for ns in self.namespaces:
            _run("ip", "netns", "del", ns, check=False)
            shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)
        for link in [*self.host_links, self.bridge]:
            _run("ip", "link", "del", link, check=False)
        # Namespaces die asynchronously in the kernel, taking their veth peers with them.
        deadline = time.monotonic() + 5.0
        while (left := self.leftovers()) and time.monotonic() < deadline:
            time.sleep(0.1)
        if left:
            problems.append(f"left behind: {left}")
        self._restore_signals()
        _live.discard(self)
        if problems:
            raise ClusterError("; ".join(problems))
        return problems

    def leftovers(self) -> list[str]:
        """Namespaces, links and /etc/netns entries of this cluster that still exist."""
        found = [ns for ns in _run("ip", "netns", "list", check=False).stdout.split() if ns.startswith(self.prefix)]
        links = _run("ip", "-o", "link", "show", check=False).stdout
        found += [word.split("@")[0].rstrip(":") for line in links.splitlines() for word in line.split()[1:2]
                  if word.startswith(self.link_prefix)]
        if NETNS_ETC.is_dir():
            found += [str(NETNS_ETC / d) for d in os.listdir(NETNS_ETC) if d.startswith(self.prefix)]
        return found

    def _trap_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGTERM, signal.SIGHUP):
            self._old_handlers[signum] = signal.signal(signum, _raise_exit)

    def _restore_signals(self) -> None:
        for signum, handler in self._old_handlers.items():
            signal.signal(signum, handler)
        self._old_handlers.clear()


def _raise_exit(signum, frame) -> None:
    # Turn the signal into an exception once, so every `with Cluster` unwinds and tears down.
    signal.signal(signum, signal.SIG_IGN)
    raise SystemExit(128 + signum)


def _kill_group(proc: subprocess.Popen, grace_s: float = 3.0) -> None:
    """SIGTERM the process group of ``proc`` (started with a new session), then SIGKILL it."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=grace_s)
            break
        except subprocess.TimeoutExpired:
            continue
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # stragglers that outlived the group leader
    except ProcessLookupError:
        pass


@atexit.register
def _tear_down_live_clusters() -> None:
    for cluster in list(_live):
        try:
            cluster.tear_down()
        except ClusterError as error:
            print(f"kimad.emulate: {error}", file=sys.stderr)


class TracePlayer(threading.Thread):
    """Applies ``changes`` (times in seconds since the cluster's set-up) to ``cluster`` with ``tc qdisc change``."""

    def __init__(self, cluster: Cluster, changes: list[RateChange]) -> None:
        super().__init__(name="kimad-trace-player", daemon=True)
        self.cluster, self.changes = cluster, changes
        self.errors: list[str] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        for change in self.changes:
            wait = self.cluster.t0 + change.time_s - time.monotonic()
            if self._stop_event.wait(max(0.0, wait)):
                return
            try:
                self.cluster.set_rate(change.node, change.mbit)
            except ClusterError as error:
                if self._stop_event.is_set():
                    return
                self.errors.append(str(error))
                print(f"kimad.emulate: trace player: {error}", file=sys.stderr)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5.0)
