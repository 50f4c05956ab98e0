"""Compile the CUDA C kernels with NVRTC (cuda-python 13) and cache the results on disk per GPU architecture.

NVRTC compiles without a GPU or a driver, so every kernel source is compiled in the CPU test suite. A build is
keyed by the source text, the options (the compile-time constants CVQD_K and CVQD_THREADS included), the NVRTC
version and the target ("sm_90" -> CUBIN, "compute_90" -> PTX); the file lands in
`$CVQD_CACHE/kernels/` (default ~/.cache/cvqd/kernels/), written atomically, so a second process or run reuses it.

    from cvqd.kernels.nvrtc import compile_sampling
    cubin = compile_sampling(num_classes=4096, arch="sm_90")          # bytes, cached
    ptx = compile_sampling(num_classes=4096, arch="compute_80")
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cvqd.errors import CvqdError
from cvqd.paths import cache_root

SOURCE_DIR = Path(__file__).resolve().parent
SAMPLING_SOURCE = "sampling.cu"
# --fmad=false: no contraction of a * b + c, so the kernel rounds like the PyTorch reference does (parity).
BASE_OPTIONS = ("--std=c++17", "--fmad=false", "-default-device")


class KernelUnavailable(CvqdError):
    """NVRTC (cuda-python) is missing or cannot build for this GPU; the runtime falls back to the torch step."""


def _nvrtc():
    try:
        from cuda.bindings import nvrtc
    except ImportError as exc:  # pragma: no cover - cuda-python is a dependency
        raise KernelUnavailable(f"cuda-python's NVRTC bindings are not importable ({exc}); "
                                "install cuda-python>=13 for the fused CUDA kernels") from None
    return nvrtc


def _check(result, what: str, nvrtc, prog=None) -> tuple:
    err, *rest = result
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        log = _program_log(nvrtc, prog) if prog is not None else ""
        raise RuntimeError(f"NVRTC {what} failed: {err.name}{': ' + log if log else ''}")
    return tuple(rest)


def _program_log(nvrtc, prog) -> str:
    err, size = nvrtc.nvrtcGetProgramLogSize(prog)
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS or size <= 1:
        return ""
    buf = b" " * size
    nvrtc.nvrtcGetProgramLog(prog, buf)
    return buf.decode(errors="replace").rstrip("\x00").strip()


def nvrtc_version() -> tuple[int, int]:
    nvrtc = _nvrtc()
    major, minor = _check(nvrtc.nvrtcVersion(), "version query", nvrtc)
    return int(major), int(minor)


def supported_archs() -> list[int]:
    """Compute capabilities this NVRTC can target, e.g. [75, 80, 86, 89, 90, 100, 120]."""
    nvrtc = _nvrtc()
    (archs,) = _check(nvrtc.nvrtcGetSupportedArchs(), "arch query", nvrtc)
    return [int(a) for a in archs]


def compile_source(source: str, name: str, arch: str, options: tuple[str, ...] = ()) -> tuple[bytes, str]:
    """Compile CUDA C `source` for `arch` ("sm_XY" -> CUBIN, "compute_XY" -> PTX): -> (image bytes, compile log)."""
    nvrtc = _nvrtc()
    if not (arch.startswith("sm_") or arch.startswith("compute_")) or not arch.split("_", 1)[1].isdigit():
        raise ValueError(f"arch must look like 'sm_90' or 'compute_90', got {arch!r}")
    cc = int(arch.split("_", 1)[1])
    if cc not in supported_archs():
        raise KernelUnavailable(f"this NVRTC {'.'.join(map(str, nvrtc_version()))} cannot target {arch}; "
                                f"it supports compute capabilities {supported_archs()}")
    (prog,) = _check(nvrtc.nvrtcCreateProgram(source.encode(), name.encode(), 0, [], []), "create", nvrtc)
    try:
        opts = [o.encode() for o in (*BASE_OPTIONS, f"--gpu-architecture={arch}", *options)]
        err, = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        log = _program_log(nvrtc, prog)
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise RuntimeError(f"NVRTC could not compile {name} for {arch}: {err.name}\n{log}")
        if arch.startswith("sm_"):
            (size,) = _check(nvrtc.nvrtcGetCUBINSize(prog), "CUBIN size", nvrtc, prog)
            image = b" " * size
            _check(nvrtc.nvrtcGetCUBIN(prog, image), "CUBIN", nvrtc, prog)
        else:
            (size,) = _check(nvrtc.nvrtcGetPTXSize(prog), "PTX size", nvrtc, prog)
            image = b" " * size
            _check(nvrtc.nvrtcGetPTX(prog, image), "PTX", nvrtc, prog)
        return image, log
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def sampling_block_size(num_classes: int) -> int:
    """Threads per block for K classes: one 4-class group per thread up to 256 threads (K <= 1024), then
    several groups per thread (K = 4096 -> 256 threads x 4 groups x 4 classes, 16 registers of values)."""
    groups = (num_classes + 3) // 4
    threads = 32
    while threads < groups and threads < 256:
        threads *= 2
    return threads


def sampling_options(num_classes: int) -> tuple[str, ...]:
    if num_classes < 2 or num_classes > (1 << 20):
        raise ValueError(f"num_classes must be in 2..2^20, got {num_classes}")
    return (f"-DCVQD_K={num_classes}", f"-DCVQD_THREADS={sampling_block_size(num_classes)}")


def read_source(name: str = SAMPLING_SOURCE) -> str:
    return (SOURCE_DIR / name).read_text()


def compile_cached(name: str, arch: str, options: tuple[str, ...], cache_dir: str | os.PathLike | None = None) -> bytes:
    """`compile_source` of kernels/<name> with a disk cache keyed by source, options, NVRTC version and arch."""
    source = read_source(name)
    key = hashlib.sha256("\0".join([source, *BASE_OPTIONS, *options, str(nvrtc_version()), arch]).encode())
    suffix = "cubin" if arch.startswith("sm_") else "ptx"
    root = Path(cache_dir) if cache_dir is not None else cache_root() / "kernels"
    path = root / f"{Path(name).stem}-{arch}-{key.hexdigest()[:20]}.{suffix}"
    if path.is_file():
        return path.read_bytes()
    image, _ = compile_source(source, name, arch, options)
    try:
        from cvqd.io import atomic_write_bytes

        root.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, image)
    except (OSError, CvqdError):
        pass  # an unwritable cache only costs a recompile next time
    return image


def compile_sampling(num_classes: int, arch: str, cache_dir: str | os.PathLike | None = None) -> bytes:
    """The sampling kernels of kernels/sampling.cu specialised for K = num_classes, for `arch`."""
    return compile_cached(SAMPLING_SOURCE, arch, sampling_options(num_classes), cache_dir)
