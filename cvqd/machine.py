"""What a measurement ran on: every result record (training, evaluation, benchmarks) takes it from here.

`describe_machine()` gives the CPU (name, family, model and clock of the first core: a virtual machine's model name
can be as bare as "AMD EPYC" on quite different hosts), cores, memory, the GPU with its driver, and the versions
of the libraries that shape the numbers. `provenance(model_path)` adds what a published record needs besides the
machine: the command that wrote it, the git commit of the source (and whether the working tree was dirty), the
sha256 of the model measured and the date.
"""

from __future__ import annotations

import importlib
import os
import platform
import shlex
import subprocess
import sys
from datetime import datetime, timezone
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
    info["load_average"] = load_average()
    return info


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (None where the system has none): how busy the machine was."""
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def machine_words(m: dict[str, Any]) -> str:
    """One line for a record's machine: "AMD EPYC (2 cores; family 25, model 1, 2445 MHz)[, NVIDIA H100 (driver X)]"."""
    details = [f"{label} {m[k]}" for label, k in (("family", "cpu_family"), ("model", "cpu_model")) if k in m]
    details += [f"{float(m['cpu_mhz']):.0f} MHz"] if "cpu_mhz" in m else []
    text = f"{m.get('cpu', 'unknown CPU')} ({m.get('cores', '?')} cores" + (f"; {', '.join(details)})" if details else ")")
    if m.get("gpu"):
        text += f", {m['gpu']}" + (f" (driver {m['driver']})" if m.get("driver") else "")
    return text


def command_line(argv: list[str] | None = None) -> str:
    """sys.argv as a shell line: `python -m pkg.mod ...` for a module run with -m, `python path.py ...` for a
    script, the bare name of a console script (`cvqd-eval ...`)."""
    argv = list(sys.argv if argv is None else argv)
    if not argv:
        return ""
    head, rest = argv[0], argv[1:]
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if head.endswith(".py") and spec is not None and spec.name:
        words = ["python", "-m", spec.name.removesuffix(".__main__")]
    elif head.endswith(".py"):
        try:
            head = os.path.relpath(head)
        except ValueError:
            pass
        words = ["python", head]
    else:
        words = [Path(head).name]
    return shlex.join(words + rest)


def git_state(root: str | os.PathLike | None = None) -> dict[str, Any]:
    """{"commit": `git rev-parse HEAD`, "dirty": tracked files differ from it, "dirty_files": [...]} of the
    repository holding cvqd's source ({"commit": None} outside a git checkout, e.g. an installed wheel)."""
    root = Path(root) if root is not None else Path(__file__).resolve().parents[1]

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no") or ""
    files = sorted(line[3:] for line in status.splitlines() if line.strip())
    return {"commit": commit.strip(), "dirty": bool(files), "dirty_files": files}


def model_sha256(model_path: str | os.PathLike | None) -> str | None:
    """sha256 of a checkpoint file, or of a plan directory's manifest.json (which holds every file's sha256)."""
    if model_path is None:
        return None
    from cvqd.io import file_sha256

    path = Path(model_path)
    return file_sha256(path / "manifest.json" if path.is_dir() else path)


def provenance(model_path: str | os.PathLike | None, argv: list[str] | None = None) -> dict[str, Any]:
    """What every published result record carries: the command that wrote it, the git commit (and a dirty
    flag), the model measured with its sha256 (None for random weights), the date (ISO, UTC) and the machine."""
    return {"command": command_line(argv), **git_state(), "model": None if model_path is None else str(model_path),
            "model_sha256": model_sha256(model_path),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": describe_machine()}
