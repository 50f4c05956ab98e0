"""Shared helpers of every benchmark: one timing summary, one provenance record, atomic JSON output.

    summary(ms)            median and spread (p10, p25, p75, p90, min) of times in milliseconds, and the run count
    timed_ms(fn)           wall time of one call, milliseconds
    provenance(model)      command, git commit (+ dirty flag), model sha256, date, machine: every result JSON
                           starts with it (cvqd.machine.provenance; cvqd-eval writes the same fields)
    machine()              cvqd.machine.describe_machine(): CPU, cores, memory, GPU + driver, versions, load average
    write_json(name, obj)  a bare name goes to benchmarks/results/, a name with a folder is used as given
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable

from cvqd.io import write_json as cvqd_write_json
from cvqd.machine import describe_machine, load_average, machine_words, provenance  # noqa: F401  (re-exported)

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    """What a number was measured on (cvqd.machine.describe_machine)."""
    return describe_machine()


def summary(ms: list[float]) -> dict[str, float]:
    """Median and spread of times in milliseconds: p10, p25, p75, p90 (inclusive quantiles), min, runs."""
    if not ms:
        raise ValueError("summary() of no times")
    ms = sorted(float(x) for x in ms)
    if len(ms) == 1:
        q = [ms[0]] * 19
    else:
        q = statistics.quantiles(ms, n=20, method="inclusive")  # 5% steps: q[1] = p10, q[4] = p25, q[14] = p75, q[17] = p90
    return {"median_ms": round(statistics.median(ms), 3), "p10_ms": round(q[1], 3), "p25_ms": round(q[4], 3),
            "p75_ms": round(q[14], 3), "p90_ms": round(q[17], 3), "min_ms": round(ms[0], 3), "runs": len(ms)}


def timed_ms(fn: Callable[[], Any]) -> float:
    """Wall time of one call of fn, in milliseconds."""
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def write_json(name: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Write payload atomically; a bare file name goes to benchmarks/results/, a name with a folder in it is a path."""
    path = Path(name) if Path(name).parent != Path(".") else RESULTS / name
    path.parent.mkdir(parents=True, exist_ok=True)
    return cvqd_write_json(path, payload)
