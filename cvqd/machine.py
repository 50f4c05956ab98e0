"""What a measurement ran on: every result record (training, evaluation, benchmarks) takes it from here.

`describe_machine()` gives the CPU (name, family, model and clock of the first core: a virtual machine's model name
can be as bare as "AMD EPYC" on quite different hosts), cores, memory, the GPU with its driver, and the versions
of the libraries that shape the numbers.
"""

from __future__ import annotations

import importlib
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

LIBRARIES = ("torch", "onnxruntime", "onnx", "numpy")

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


def memory_gib() -> float | None:
    """Total memory from /proc/meminfo, GiB (None where it cannot be read)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return round(int(line.split()[1]) / (1 << 20), 1)
    except OSError:
        pass
    return None


def gpu_info() -> dict[str, Any]:
    """{"gpu", "gpu_memory_gib", "compute_capability", "cuda", "driver"} of GPU 0, {} without one.

    Read through torch only when torch is already imported (a measurement of a torch-free process must not pay
    for importing it); the driver version comes from nvidia-smi when it is on PATH.
    """
    torch = sys.modules.get("torch")
    info: dict[str, Any] = {}
    if torch is not None and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / (1 << 30), 1),
                    compute_capability=f"{p.major}.{p.minor}", cuda=torch.version.cuda)
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            name, _, driver = out.stdout.splitlines()[0].partition(",")
            info.setdefault("gpu", name.strip())
            info["driver"] = driver.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def library_versions(names: tuple[str, ...] = LIBRARIES) -> dict[str, str]:
    """Versions of the libraries that are installed (imported only to read __version__)."""
    out = {}
    for name in names:
        try:
            out[name] = str(importlib.import_module(name).__version__)
        except Exception:  # not installed, or broken: the record says what is there
            continue
    return out


def describe_machine(libraries: tuple[str, ...] = LIBRARIES) -> dict[str, Any]:
    """CPU, cores, memory, GPU and driver, OS, Python and library versions, torch threads and load average."""
    info: dict[str, Any] = {**cpu_info(), "cores": os.cpu_count(), "memory_gib": memory_gib(),
                            "platform": platform.platform(), "python": platform.python_version(),
                            **gpu_info(), "versions": library_versions(libraries)}
    torch = sys.modules.get("torch")
    if torch is not None:
        info["torch_threads"] = torch.get_num_threads()
    if hasattr(os, "getloadavg"):
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    return info


def machine_words(m: dict[str, Any]) -> str:
    """One line for a record's machine: "AMD EPYC (2 cores; family 25, model 1, 2445 MHz)[, NVIDIA H100 (driver X)]"."""
    details = [f"{label} {m[k]}" for label, k in (("family", "cpu_family"), ("model", "cpu_model")) if k in m]
    details += [f"{float(m['cpu_mhz']):.0f} MHz"] if "cpu_mhz" in m else []
    text = f"{m.get('cpu', 'unknown CPU')} ({m.get('cores', '?')} cores" + (f"; {', '.join(details)})" if details else ")")
    if m.get("gpu"):
        text += f", {m['gpu']}" + (f" (driver {m['driver']})" if m.get("driver") else "")
    return text
