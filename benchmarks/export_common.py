"""Shared helpers of the export benchmarks: machine description, robust timing summaries, JSON output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_model() -> dict[str, str]:
    """The CPU's name with its family, model and clock (cvqd.machine.cpu_info), to spread into a machine record."""
    from cvqd.machine import cpu_info

    return cpu_info()


def memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return round(int(line.split()[1]) / (1 << 20), 1)
    except OSError:
        pass
    return None


def machine() -> dict[str, Any]:
    """CPU model, cores, memory and library versions: what a number was measured on."""
    import onnx
    import onnxruntime
    import torch

    return {**cpu_model(), "cores": os.cpu_count(), "memory_gib": memory_gib(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": str(torch.__version__), "torch_threads": torch.get_num_threads(),
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "note": "the 2 cores are shared with other jobs; see load_average"}


def summary(times_s: list[float]) -> dict[str, float]:
    """Median and spread (p10, p90, IQR) in milliseconds."""
    ms = sorted(t * 1e3 for t in times_s)
    q = statistics.quantiles(ms, n=20, method="inclusive")  # 5% steps: q[1] = p10, q[4] = p25, q[14] = p75, q[17] = p90
    return {"median_ms": statistics.median(ms), "p10_ms": q[1], "p25_ms": q[4], "p75_ms": q[14], "p90_ms": q[17],
            "min_ms": ms[0], "runs": len(ms)}


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def write_json(name: str, payload: dict[str, Any]) -> Path:
    """A bare file name goes to benchmarks/results/; a name with a folder in it is a path, used as given."""
    path = Path(name) if Path(name).parent != Path(".") else RESULTS / name
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)
    return path
