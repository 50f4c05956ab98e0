"""The backend seam: what the loop and the pipeline need from a way of running the networks.

A `Backend` is five functions on arrays of one kind, all on `device`: numpy arrays for ONNX Runtime on the CPU
(nothing imports torch), torch tensors for the torch backend and for ONNX Runtime's CUDA provider:

    tokenize(prompts)                   -> ids [B, ctx] int64
    encode_text(ids)                    -> text embeddings [B, D] float32, L2-normalised
    denoise(tokens [R, N], t [R], cond [R, D]) -> x_0 logits [R, K, N] float32 (transformer contract; diffusion)
    decode(tokens [B, N])               -> images [B, 3, H, W] float32 in [-1, 1]
    encode_image(images in [-1, 1])     -> image embeddings [B, D] float32, L2-normalised (best-of-N reranking)

Autoregressive (CLIP-GEN) models have no `denoise`; instead (the ar_prefill / ar_decode contracts)
    ar_prefill(cond [R, D])             -> (next-token logits [R, K], KV cache)
    ar_decode(token [R], position [1], cache) -> (next-token logits [R, K], KV cache)

Backends: runtime/backend_torch.py (a checkpoint, CPU or GPU), runtime/backend_ort.py (a plan on ONNX Runtime,
CPU or CUDA execution provider), runtime/backend_trt.py (a plan's TensorRT engines; unverified, never chosen by
`auto`). `auto_candidates` is the policy behind `--backend auto`.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

BACKENDS = ("auto", "onnxruntime", "tensorrt", "torch")


@dataclass
class Backend:
    name: str  # "torch" | "onnxruntime" | "tensorrt"
    device: str  # "cpu" | "cuda:N"
    tokenize: Callable[[list[str]], Any]
    encode_text: Callable[[Any], Any]
    denoise: Callable[[Any, Any, Any], Any] | None  # None for autoregressive models
    decode: Callable[[Any], Any]
    encode_image: Callable[[Any], Any] | None = None
    overflow: Callable[[str], int] | None = None  # tokens of a prompt beyond the context (0 if it fits)
    encode_tokens: Callable[[Any], Any] | None = None  # images [B, 3, H, W] in [-1, 1] -> VQ tokens [B, N] (editing)
    max_batch: int | None = None  # images per batch the backend accepts (a plan's contracts), None = any
    capturable: bool = False  # denoise may be captured in a CUDA graph
    precision: str = "fp32"
    info: dict[str, Any] = field(default_factory=dict)  # what runs where (execution provider, kernels, ...)
    ar_prefill: Callable[[Any], tuple[Any, Any]] | None = None  # autoregressive models only
    ar_decode: Callable[[Any, Any, Any], tuple[Any, Any]] | None = None


def have_module(name: str) -> bool:
    """Whether `name` is importable, without importing it (a broken or blocked install counts as absent)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def is_cuda(device) -> bool:
    return str(device).startswith("cuda")


def nvidia_driver_present() -> bool:
    """Cheap check, no torch import: can this machine have an NVIDIA GPU? (Linux: the driver's /proc or /dev
    entries; elsewhere we cannot tell cheaply, so True and torch decides.) CUDA_VISIBLE_DEVICES="" hides them."""
    if os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1"):
        return False
    if sys.platform.startswith("linux"):
        return os.path.exists("/proc/driver/nvidia/gpus") or os.path.exists("/dev/nvidiactl")
    return True


def cuda_available() -> bool:
    """A usable CUDA GPU through torch. torch is imported only when it is installed and a driver is present, so a
    CPU machine (and the torch-free install) never pays for importing it."""
    if "torch" in sys.modules:
        return sys.modules["torch"].cuda.is_available()
    if not have_module("torch") or not nvidia_driver_present():
        return False
    import torch

    return torch.cuda.is_available()


def ort_cuda_usable() -> bool:
    """onnxruntime-gpu with its CUDA execution provider AND a visible GPU (onnxruntime-gpu alone falls back to CPU)."""
    if not have_module("onnxruntime") or not cuda_available():
        return False
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def auto_candidates(*, have_plan: bool, have_ckpt: bool, device: str | None) -> list[tuple[str, str]]:
    """The `--backend auto` policy: (backend, device) pairs to try, fastest first, among those available here.

    GPU: the torch backend with CUDA graphs and the fused sampling kernels > ONNX Runtime's CUDA execution
    provider. CPU: ONNX Runtime (faster than eager torch on small models: benchmarks/runtime_cpu.py measures
    both) > torch. A candidate that fails to load is skipped with its reason.

    TensorRT is never picked here: no test in this repository has built engines and run them (TensorRT's builder
    is not installable where the tests run), so it runs only when asked for with `--backend tensorrt`.
    """
    out: list[tuple[str, str]] = []
    cuda = (device is None or is_cuda(device)) and cuda_available()
    if cuda:
        if have_ckpt:
            out.append(("torch", "cuda"))
        if have_plan and ort_cuda_usable():
            out.append(("onnxruntime", "cuda"))
    if have_plan:
        out.append(("onnxruntime", "cpu"))
    if have_ckpt:
        out.append(("torch", "cpu"))
    return out
