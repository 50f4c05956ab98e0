"""What a measurement ran on: the CPU as /proc/cpuinfo names it.

A virtual machine's "model name" can be as bare as "AMD EPYC" on different hosts (this project's 2-core machine
has been a 2.0 GHz Zen 1 and a 2.45 GHz Zen 3 in different sessions, ~1.4-2x apart per step), so the family, model
and clock of the first core go with it. Every record (training, evaluation, benchmarks) takes it from here.
"""

from __future__ import annotations

import platform
from pathlib import Path

_KEYS = {"model name": "cpu", "cpu family": "cpu_family", "model": "cpu_model", "cpu MHz": "cpu_mhz"}


def cpu_info() -> dict[str, str]:
    """{"cpu": name, "cpu_family", "cpu_model", "cpu_mhz"} of the first core (fields the system lacks are left out;
    "cpu" falls back to platform.processor())."""
    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if not key and info:  # the end of the first core's block
                break
            if key in _KEYS and _KEYS[key] not in info:
                info[_KEYS[key]] = value.strip()
    except OSError:
        pass
    return {"cpu": info.pop("cpu", None) or platform.processor() or "unknown", **info}
