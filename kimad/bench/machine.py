"""What machine a benchmark ran on, for the line every benchmark prints beside its figures."""

from __future__ import annotations

import os
import platform


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or what ``platform`` knows elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def describe_cpu() -> str:
    """E.g. ``"AMD EPYC, 2 CPUs, Python 3.11.7"``."""
    return f"{cpu_model()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
