"""benchmarks/ring_goodput.py: its report of measured allgather times (the measurement itself needs root and a
cluster; the shaped-link tests in test_horovod_plugin.py and test_emulate.py run those)."""

import pytest
from conftest import load_benchmark

from kimad.control.cost import TCP_ETHERNET_FRAMING


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("ring_goodput")


def ideal_seconds(nbytes: int, world: int, bps: float, latency_s: float) -> float:
    return (world - 1) * (latency_s + 8 * nbytes / bps)


def test_the_report_gives_each_kind_its_table_and_fit(bench, capsys):
    sizes = bench.SIZES
    same = {str(n): ideal_seconds(n, 4, 18e6, 0.5e-3) for n in sizes}  # 18 of 20 Mbit/s payload
    new = {str(n): ideal_seconds(n, 4, 15e6, 1.5e-3) for n in sizes}
    bench.report({"world": 4, "seconds": {"same": same, "new": new}}, 20.0, "reno")
    out = capsys.readouterr().out
    assert "the same size every time" in out and "a new size every time" in out
    fits = [line for line in out.splitlines() if line.startswith("alpha-beta fit")]
    assert len(fits) == 2
    assert "latency 0.500 ms per round, payload rate 18.00 Mbit/s = 0.900" in fits[0]
    assert "latency 1.500 ms per round, payload rate 15.00 Mbit/s = 0.750" in fits[1]
    assert f"(frames: {0.9 * TCP_ETHERNET_FRAMING:.3f})" in fits[0]


def test_the_latency_models_tell_a_per_collective_latency_from_the_rings(bench, capsys):
    # measured times made with ONE latency per collective (3 ms) and 18 of 20 Mbit/s: that model fits exactly
    n, bps = 4, 18e6
    sizes = bench.SIZES
    same = {str(k): 3e-3 + (n - 1) * 8 * k / bps for k in sizes}
    allreduce = {str(k): 3e-3 + 2 * (n - 1) / n * 8 * bench.allreduce_bytes(n, k) / bps for k in sizes}
    assert all(bench.allreduce_bytes(n, k) == n * k // 2 for k in sizes)  # (sizes are multiples of 4)
    bench.report({"world": n, "seconds": {"same": same, "new": same, "allreduce": allreduce}}, 20.0, "reno")
    out = capsys.readouterr().out
    assert "allreduce with the allgather's ring link bytes" in out
    ring = next(line for line in out.splitlines() if "ring (n-1 / 2(n-1) latencies)" in line)
    per = next(line for line in out.splitlines() if "one latency per collective" in line)
    assert "latency 3.000 ms, payload rate 0.900 of the shaped rate, RMS relative error 0.0%" in per
    assert float(ring.rsplit("error ", 1)[1].rstrip("%")) > 1.0
