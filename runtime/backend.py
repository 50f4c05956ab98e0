"""The backend seam: what the loop and the pipeline need from a way of running the networks.

A `Backend` is five functions on torch tensors, all on `device`:

    tokenize(prompts)                   -> ids [B, ctx] int64
    encode_text(ids)                    -> text embeddings [B, D] float32, L2-normalised
    denoise(tokens [R, N], t [R], cond [R, D]) -> x_0 logits [R, K, N] float32 (transformer contract)
    decode(tokens [B, N])               -> images [B, 3, H, W] float32 in [-1, 1]
    encode_image(images in [-1, 1])     -> image embeddings [B, D] float32, L2-normalised (best-of-N reranking)

Backends: runtime/backend_torch.py (a checkpoint, CPU or GPU), runtime/backend_ort.py (a plan on ONNX Runtime,
CPU or CUDA execution provider), runtime/backend_trt.py (a plan's TensorRT engines; unverified, never chosen by
`auto`). `auto_candidates` is the policy behind `--backend auto`.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

BACKENDS = ("auto", "onnxruntime", "tensorrt", "torch")


@dataclass
class Backend:
    name: str  # "torch" | "onnxruntime" | "tensorrt"
    device: torch.device
    tokenize: Callable[[list[str]], torch.Tensor]
    encode_text: Callable[[torch.Tensor], torch.Tensor]
    denoise: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    decode: Callable[[torch.Tensor], torch.Tensor]
    encode_image: Callable[[torch.Tensor], torch.Tensor] | None = None
    overflow: Callable[[str], int] | None = None  # tokens of a prompt beyond the context (0 if it fits)
    max_batch: int | None = None  # images per batch the backend accepts (a plan's contracts), None = any
    capturable: bool = False  # denoise may be captured in a CUDA graph
    precision: str = "fp32"
    info: dict[str, Any] = field(default_factory=dict)  # what runs where (execution provider, kernels, ...)


def have_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def ort_cuda_usable() -> bool:
    """onnxruntime-gpu with its CUDA execution provider AND a visible GPU (onnxruntime-gpu alone falls back to CPU)."""
    if not have_module("onnxruntime") or not torch.cuda.is_available():
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
    cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
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
