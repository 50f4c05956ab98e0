"""The PyTorch backend: runs a `model.pt` checkpoint with the model package's modules (cvqd.model), on CPU or a GPU.

On a GPU the denoiser runs under autocast (bf16 by default where supported, or fp16) with fused attention
(scaled_dot_product_attention picks flash / memory-efficient kernels), and it is capturable in a CUDA graph
(autocast's weight-cast cache is off, as graph capture requires). The VQ decoder and the CLIP encoders stay
in float32 (fp16 VQ decoders are prone to NaN or black images; docs/algorithm.md#precision). Every function of
the backend runs without autograd.
"""

from __future__ import annotations

import contextlib
import os

import torch

from cvqd.errors import CvqdError
from cvqd.runtime.backend import Backend

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision: str | None, device: torch.device) -> str:
    precision = precision or "auto"
    if precision not in PRECISIONS:
        raise CvqdError(f"unknown precision {precision!r} for the torch backend; expected one of {list(PRECISIONS)}")
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"
    if precision == "fp16" and device.type == "cpu":
        raise CvqdError("fp16 on the CPU is not supported by the torch backend; use fp32 or bf16")
    return precision


def torch_device(device: str | torch.device | None) -> torch.device:
    try:
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise CvqdError(f"unknown device {device!r}; expected cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CvqdError(f"device {dev} requested but no CUDA GPU is available; use device='cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise CvqdError(f"device {dev} does not exist; this machine has {torch.cuda.device_count()} GPU(s)")
    elif dev.type != "cpu":
        raise CvqdError(f"unsupported device {dev}; expected cpu or cuda")
    return dev


def torch_backend(ckpt: str | os.PathLike, device: str | torch.device | None = "cpu",
                  clip_weights: str | os.PathLike | None = None, precision: str | None = None):
    """-> (Backend, ModelConfig, null condition [D], the model) for a checkpoint."""
    from cvqd.model.clipvqd import load_model

    dev = torch_device(device)
    model = load_model(ckpt, clip_weights=clip_weights, device=dev)
    backend = backend_from_model(model, dev, precision, source=str(ckpt))
    return backend, model.cfg, model.null_condition().detach().float(), model


def backend_from_model(model, device: str | torch.device, precision: str | None = None, source: str = "") -> Backend:
    """A Backend over an in-memory `CLIPVQDiffusion` (eval mode, on `device`): checkpoints and benchmarks."""
    dev = torch_device(device)
    precision = resolve_precision(precision, dev)
    clip = model.require_clip()
    net = model.transformer
    ar = model.ar
    dtype = _DTYPES.get(precision)

    def autocast():
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(dev.type, dtype=dtype, cache_enabled=False)

    def denoise(tokens: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), autocast():
            return net.logits(tokens, t, cond).float()  # [R, K, N]

    def ar_prefill(cond: torch.Tensor):
        with torch.no_grad(), autocast():
            logits, cache = ar.prefill(cond)
        return logits.float(), cache.contiguous()

    def ar_decode(token: torch.Tensor, position: torch.Tensor, cache: torch.Tensor):
        # a static cache: the step writes its slot into `cache` itself (fixed addresses: CUDA-graph capturable)
        with torch.no_grad(), autocast():
            logits, cache = ar.decode(token, position, cache, inplace=True)
        return logits.float(), cache

    def overflow(prompt: str) -> int:
        inner = getattr(clip, "_tokenizer", None)
        if inner is None:
            clip.tokenize(["x"])
            inner = clip._tokenizer
        enc = getattr(inner, "encode", None)
        return max(0, len(enc(prompt)) + 2 - clip.cfg.context_length) if enc else 0

    return Backend(name="torch", device=str(dev), tokenize=clip.tokenize, encode_text=_no_grad(clip.encode_text),
                   denoise=denoise if ar is None else None, decode=_no_grad(model.vqgan.decode),
                   ar_prefill=ar_prefill if ar is not None else None, ar_decode=ar_decode if ar is not None else None,
                   encode_image=_no_grad(clip.encode_image), overflow=overflow,
                   encode_tokens=_no_grad(lambda images: model.vqgan.encode(images).reshape(images.shape[0], -1)),
                   capturable=dev.type == "cuda", precision=precision,
                   info={"checkpoint": source, "device": str(dev), "precision": precision})


def _no_grad(fn):
    """`fn` under torch.no_grad: the backend's outputs are plain values, never nodes of an autograd graph."""

    def wrapped(*args):
        with torch.no_grad():
            return fn(*args)

    return wrapped
