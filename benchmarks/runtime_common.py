"""Shared helpers of the runtime benchmarks: machine description, timing summaries, atomic JSON output."""

from __future__ import annotations

import os
import platform
import statistics
from typing import Any

# one implementation for every benchmark (write_json is re-exported for the runtime benchmarks)
from export_common import cpu_model, memory_gib, write_json  # noqa: F401

def machine() -> dict[str, Any]:
    """What a number was measured on: CPU model, cores, memory, GPU, library versions, load average."""
    import onnxruntime
    import torch

    info = {**cpu_model(), "cores": os.cpu_count(), "memory_gib": memory_gib(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": str(torch.__version__),
            "onnxruntime": onnxruntime.__version__, "ort_providers": onnxruntime.get_available_providers(),
            "load_average_start": os.getloadavg()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / (1 << 30), 1),
                    compute_capability=f"{p.major}.{p.minor}", cuda=torch.version.cuda)
    return info


def summary(ms: list[float]) -> dict[str, float]:
    """Median and spread (p10, p25, p75, p90) of times in milliseconds."""
    ms = sorted(ms)
    if len(ms) < 2:
        return {"median_ms": ms[0], "p10_ms": ms[0], "p25_ms": ms[0], "p75_ms": ms[0], "p90_ms": ms[0], "runs": len(ms)}
    q = statistics.quantiles(ms, n=20, method="inclusive")  # q[1] = p10, q[4] = p25, q[14] = p75, q[17] = p90
    return {"median_ms": round(statistics.median(ms), 3), "p10_ms": round(q[1], 3), "p25_ms": round(q[4], 3),
            "p75_ms": round(q[14], 3), "p90_ms": round(q[17], 3), "min_ms": round(ms[0], 3), "runs": len(ms)}
