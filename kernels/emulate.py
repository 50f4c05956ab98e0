"""Run the CUDA kernels of kernels/sampling.cu on a CPU, for parity tests where no GPU is available.

The unmodified kernel source is compiled as C++20 against kernels/emulation.h (CUDA's thread/block model on OS
threads and barriers) into a shared library, and called through ctypes with the same methods and argument
order as `cvqd.kernels.sampling.SamplingKernels`, on CPU torch tensors. This checks the kernels' arithmetic and
indexing against the PyTorch references (tests/test_kernels_emulated.py); it is not a GPU and says nothing
about the kernels' GPU behaviour or speed. Needs a C++20 compiler (g++ >= 11 or clang++ >= 14): `$CXX` or g++.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from cvqd.kernels.nvrtc import SOURCE_DIR, read_source, sampling_block_size
from cvqd.paths import cache_root

# kernel -> C argument kinds after (grid_x, grid_y, threads): p = pointer, i = int, f = float
SIGNATURES = {
    "cvqd_sample_step": "pppppp" + "iii" + "ff",
    "cvqd_advance_step": "p",
    "cvqd_guide": "pp" + "iii" + "f",
    "cvqd_truncate": "pp" + "i" + "f",
    "cvqd_posterior": "ppppp" + "i",
    "cvqd_gumbel_argmax": "pppp" + "i",
    "cvqd_philox_bits": "ppp" + "ii",
}
_CTYPES = {"p": ctypes.c_void_p, "i": ctypes.c_int, "f": ctypes.c_float}
_C_DECL = {"p": "void*", "i": "int", "f": "float"}
_CASTS = {  # the kernels' pointer parameter types, in order
    "cvqd_sample_step": ["const float*", "const long long*", "long long*", "const float*", "const long long*",
                         "const long long*"],
    "cvqd_advance_step": ["long long*"],
    "cvqd_guide": ["const float*", "float*"],
    "cvqd_truncate": ["const float*", "float*"],
    "cvqd_posterior": ["const float*", "const long long*", "const float*", "const long long*", "float*"],
    "cvqd_gumbel_argmax": ["const float*", "const long long*", "const long long*", "long long*"],
    "cvqd_philox_bits": ["const long long*", "const long long*", "unsigned*"],
}


class EmulationUnavailable(RuntimeError):
    """No C++20 compiler to build the CPU emulation."""


def compiler() -> str:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")
    if not cxx:
        raise EmulationUnavailable("no C++ compiler (set CXX, or install g++) to build the kernel emulation")
    return cxx


def _wrappers() -> str:
    out = ['#include "emulation.h"', '#include "sampling.cu"', 'extern "C" {']
    for name, kinds in SIGNATURES.items():
        params = ", ".join(f"{_C_DECL[k]} a{i}" for i, k in enumerate(kinds))
        casts = _CASTS[name]
        args = []
        for i, k in enumerate(kinds):
            args.append(f"({casts[i]})a{i}" if k == "p" else f"a{i}")
        out.append(f"void emu_{name}(unsigned gx, unsigned gy, unsigned th, {params}) {{\n"
                   f"  cvqd_emulate_launch(gx, gy, th, [&] {{ {name}({', '.join(args)}); }});\n}}")
    out.append("}")
    return "\n".join(out) + "\n"


def build(num_classes: int, cache_dir: str | os.PathLike | None = None, threads: int | None = None) -> Path:
    """Compile (or find in the cache) the emulation library for K = num_classes (block size `threads`, default
    the one the GPU build uses; a smaller one exercises several class groups per thread on small K)."""
    cxx = compiler()
    threads = threads or sampling_block_size(num_classes)
    assert threads % 32 == 0 and threads <= 1024, threads
    flags = ["-std=c++20", "-O2", "-ffp-contract=off", "-fno-fast-math", "-shared", "-fPIC", "-pthread",
             f"-DCVQD_K={num_classes}", f"-DCVQD_THREADS={threads}", f"-I{SOURCE_DIR}"]
    wrapper = _wrappers()
    key = hashlib.sha256("\0".join([read_source(), read_source("emulation.h"), wrapper, cxx, *flags]).encode())
    root = Path(cache_dir) if cache_dir is not None else cache_root() / "kernels"
    lib = root / f"emulated-sampling-K{num_classes}-{key.hexdigest()[:16]}.so"
    if lib.is_file():
        return lib
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:  # same filesystem: the final rename is atomic
        src = Path(tmp) / "emulated.cpp"
        src.write_text(wrapper)
        out = Path(tmp) / "lib.so"
        proc = subprocess.run([cxx, *flags, str(src), "-o", str(out)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"compiling the kernel emulation failed:\n{proc.stderr[-4000:]}")
        os.replace(out, lib)
    return lib


class EmulatedKernels:
    """`SamplingKernels`' methods, running kernels/sampling.cu on the CPU (tensors on the CPU)."""

    def __init__(self, num_classes: int, cache_dir: str | os.PathLike | None = None, threads: int | None = None):
        self.num_classes = num_classes
        self.threads = threads or sampling_block_size(num_classes)
        self.device = torch.device("cpu")
        self._lib = ctypes.CDLL(str(build(num_classes, cache_dir, self.threads)))
        for name, kinds in SIGNATURES.items():
            fn = getattr(self._lib, f"emu_{name}")
            fn.argtypes = [ctypes.c_uint, ctypes.c_uint, ctypes.c_uint] + [_CTYPES[k] for k in kinds]
            fn.restype = None

    def _launch(self, name: str, grid: tuple[int, int], block: int, args: list) -> None:
        conv = []
        for kind, a in zip(SIGNATURES[name], args):
            if kind == "p":
                assert isinstance(a, torch.Tensor) and a.device.type == "cpu" and a.is_contiguous(), (name, a)
                conv.append(ctypes.c_void_p(a.data_ptr()))
            else:
                conv.append(_CTYPES[kind](a))
        getattr(self._lib, f"emu_{name}")(grid[0], grid[1], block, *conv)

    def sample_step(self, logits, x_t, x_out, table, step, keys, *, guidance: float, truncation: float,
                    use_null: bool) -> None:
        B, N = x_t.shape
        self._launch("cvqd_sample_step", (N, B), self.threads,
                     [logits, x_t, x_out, table, step, keys, B, N, int(use_null), float(guidance), float(truncation)])

    def advance_step(self, step) -> None:
        self._launch("cvqd_advance_step", (1, 1), 32, [step])

    def guide(self, logits, batch: int, guidance: float, use_null: bool):
        R, K, N = logits.shape
        out = torch.empty(batch, K, N)
        self._launch("cvqd_guide", (N, batch), self.threads, [logits, out, batch, N, int(use_null), float(guidance)])
        return out

    def truncate(self, log_x0, rate: float):
        B, K, N = log_x0.shape
        out = torch.empty_like(log_x0)
        self._launch("cvqd_truncate", (N, B), self.threads, [log_x0, out, N, float(rate)])
        return out

    def posterior(self, log_x0, x_t, table, step):
        B, K, N = log_x0.shape
        out = torch.empty(B, K + 1, N)
        self._launch("cvqd_posterior", (N, B), self.threads, [log_x0, x_t, table, step, out, N])
        return out

    def gumbel_argmax(self, log_post, step, keys):
        B, C, N = log_post.shape
        out = torch.empty(B, N, dtype=torch.int64)
        self._launch("cvqd_gumbel_argmax", (N, B), self.threads, [log_post, step, keys, out, N])
        return out

    def philox_bits(self, keys, step, num_classes: int, seq_len: int):
        B = keys.shape[0]
        out = torch.empty(B, num_classes, seq_len, dtype=torch.int32)
        self._launch("cvqd_philox_bits", (seq_len, B), 64, [keys, step, out, num_classes, seq_len])
        return out.to(torch.int64) & 0xFFFFFFFF
