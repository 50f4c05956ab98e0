"""Launch the fused sampling kernels (kernels/sampling.cu) on torch's current CUDA stream (GPU only).

    from cvqd.kernels.sampling import SamplingKernels
    kern = SamplingKernels(num_classes=K, device="cuda")           # NVRTC compile (cached) + cuModuleLoadData
    kern.sample_step(logits, x, x, table.terms, step_buf, keys, guidance=3.0, truncation=0.9, use_null=True)
    kern.advance_step(step_buf)                                     # step index += 1, on the device

Launches go through the driver API (cuLaunchKernel) on `torch.cuda.current_stream()`, so they order with the
denoiser's work and are recorded when a CUDA graph is being captured on that stream. Each launch copies its
arguments, so the small numpy buffers used to pass them need only live for the call. The single-stage kernels
(guide, truncate, posterior, gumbel_argmax, philox_bits) exist for the parity tests against cvqd/model/step.py.
"""

from __future__ import annotations

import numpy as np
import torch

from cvqd.kernels.nvrtc import KernelUnavailable, compile_sampling, sampling_block_size, supported_archs

KERNEL_NAMES = ("cvqd_sample_step", "cvqd_advance_step", "cvqd_guide", "cvqd_truncate", "cvqd_posterior",
                "cvqd_gumbel_argmax", "cvqd_philox_bits")


def _driver():
    from cuda.bindings import driver

    return driver


def _check(result, what: str):
    driver = _driver()
    err, *rest = result if isinstance(result, tuple) else (result,)
    if err != driver.CUresult.CUDA_SUCCESS:
        _, msg = driver.cuGetErrorString(err)
        raise RuntimeError(f"CUDA driver {what} failed: {err.name} ({msg.decode() if msg else '?'})")
    return rest[0] if len(rest) == 1 else tuple(rest)


def device_arch(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


class SamplingKernels:
    """The sampling kernels compiled for K classes and loaded on one CUDA device."""

    def __init__(self, num_classes: int, device: torch.device | str = "cuda"):
        device = torch.device(device)
        if device.type != "cuda" or not torch.cuda.is_available():
            raise KernelUnavailable(f"the fused sampling kernels need a CUDA device, got {device}")
        self.device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
        self.num_classes = num_classes
        self.threads = sampling_block_size(num_classes)
        self.arch = device_arch(self.device)
        cc = int(self.arch[3:])
        if cc not in supported_archs():
            raise KernelUnavailable(f"NVRTC cannot target this GPU ({self.arch}); supported: {supported_archs()}")
        image = compile_sampling(num_classes, self.arch)
        driver = _driver()
        with torch.cuda.device(self.device):
            torch.zeros(1, device=self.device)  # torch creates and binds the device's primary context
            _check(driver.cuInit(0), "cuInit")
            ctx = _check(driver.cuCtxGetCurrent(), "cuCtxGetCurrent")
            if not int(ctx):
                dev = _check(driver.cuDeviceGet(self.device.index), "cuDeviceGet")
                _check(driver.cuCtxSetCurrent(_check(driver.cuDevicePrimaryCtxRetain(dev), "primary context")),
                       "cuCtxSetCurrent")
            self._image = np.frombuffer(image, dtype=np.uint8)  # CUBIN bytes, kept alive with the module
            self._module = _check(driver.cuModuleLoadData(self._image.ctypes.data), "cuModuleLoadData")
            self._fn = {n: _check(driver.cuModuleGetFunction(self._module, n.encode()), f"get {n}")
                        for n in KERNEL_NAMES}

    # ------------------------------------------------------------------------------------------ launching

    def _launch(self, name: str, grid: tuple[int, int], block: int, args: list) -> None:
        """args: torch tensors (passed as device pointers), ints (int32) and floats (float32), in kernel order."""
        holders = []
        for a in args:
            if isinstance(a, torch.Tensor):
                assert a.device == self.device and a.is_contiguous(), (name, a.device, a.shape)
                holders.append(np.array([a.data_ptr()], dtype=np.uint64))
            elif isinstance(a, bool) or isinstance(a, int):
                holders.append(np.array([int(a)], dtype=np.int32))
            elif isinstance(a, float):
                holders.append(np.array([a], dtype=np.float32))
            else:
                raise TypeError(f"unsupported kernel argument {type(a).__name__}")
        params = np.array([h.ctypes.data for h in holders], dtype=np.uint64)
        stream = _driver().CUstream(torch.cuda.current_stream(self.device).cuda_stream)
        _check(_driver().cuLaunchKernel(self._fn[name], grid[0], grid[1], 1, block, 1, 1, 0, stream,
                                        params.ctypes.data, 0), f"launch {name}")

    @staticmethod
    def _shape(tokens: torch.Tensor) -> tuple[int, int]:
        B, N = tokens.shape
        return B, N

    def sample_step(self, logits: torch.Tensor, x_t: torch.Tensor, x_out: torch.Tensor, table: torch.Tensor,
                    step: torch.Tensor, keys: torch.Tensor, *, guidance: float, truncation: float,
                    use_null: bool) -> None:
        """The fused step: logits [R, K, N] f32, x_t/x_out [B, N] i64 (may alias), table [S, 9] f32, step [1] i64,
        keys [B, 2] i64. Writes x_out; reads the step index from `step` (device memory)."""
        B, N = self._shape(x_t)
        assert logits.dtype == torch.float32 and logits.shape == ((2 if use_null else 1) * B, self.num_classes, N)
        self._launch("cvqd_sample_step", (N, B), self.threads,
                     [logits, x_t, x_out, table, step, keys, B, N, int(use_null), float(guidance), float(truncation)])

    def advance_step(self, step: torch.Tensor) -> None:
        self._launch("cvqd_advance_step", (1, 1), 32, [step])

    # --------------------------------------------------------------------- single stages (parity tests)

    def guide(self, logits: torch.Tensor, batch: int, guidance: float, use_null: bool) -> torch.Tensor:
        R, K, N = logits.shape
        out = torch.empty(batch, K, N, device=self.device)
        self._launch("cvqd_guide", (N, batch), self.threads, [logits, out, batch, N, int(use_null), float(guidance)])
        return out

    def truncate(self, log_x0: torch.Tensor, rate: float) -> torch.Tensor:
        B, K, N = log_x0.shape
        out = torch.empty_like(log_x0)
        self._launch("cvqd_truncate", (N, B), self.threads, [log_x0, out, N, float(rate)])
        return out

    def posterior(self, log_x0: torch.Tensor, x_t: torch.Tensor, table: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        B, K, N = log_x0.shape
        out = torch.empty(B, K + 1, N, device=self.device)
        self._launch("cvqd_posterior", (N, B), self.threads, [log_x0, x_t, table, step, out, N])
        return out

    def gumbel_argmax(self, log_post: torch.Tensor, step: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        B, C, N = log_post.shape
        out = torch.empty(B, N, dtype=torch.int64, device=self.device)
        self._launch("cvqd_gumbel_argmax", (N, B), self.threads, [log_post, step, keys, out, N])
        return out

    def philox_bits(self, keys: torch.Tensor, step: torch.Tensor, num_classes: int, seq_len: int) -> torch.Tensor:
        """Raw Gumbel-stream words [B, C, N] as int64 in [0, 2^32) (compare with cvqd.model.rng.gumbel_bits)."""
        B = keys.shape[0]
        out = torch.empty(B, num_classes, seq_len, dtype=torch.int32, device=self.device)
        self._launch("cvqd_philox_bits", (seq_len, B), 128, [keys, step, out, num_classes, seq_len])
        return out.to(torch.int64) & 0xFFFFFFFF
