"""The handful of array operations the step math needs, for numpy arrays and torch tensors alike.

The reverse step (cvqd/model/step.py) and the posterior (cvqd/model/schedule.py) are written once against this
namespace, so the same code runs on numpy arrays (the torch-free CPU runtime), on torch CPU or CUDA tensors (the
GPU path without the fused kernels, training's losses with autograd) and is the reference the CUDA kernels are
tested against. `xp(x)` picks the implementation from the type of `x`; torch is imported only when a torch tensor
is passed, so the numpy side never loads it.

Axes are explicit everywhere (`axis=1` is the class axis of [B, K, N] log-probabilities).
"""

from __future__ import annotations

from typing import Any

import numpy as np


class _Numpy:
    name = "numpy"

    @staticmethod
    def logsumexp(x, axis: int, keepdims: bool = True):
        m = x.max(axis=axis, keepdims=True)
        m = np.where(np.isfinite(m), m, 0).astype(x.dtype)  # an all -inf slice stays -inf, never nan
        with np.errstate(divide="ignore"):
            out = np.log(np.exp(x - m).sum(axis=axis, keepdims=True)) + m
        return out if keepdims else out.squeeze(axis)

    @classmethod
    def log_softmax(cls, x, axis: int):
        x = x.astype(np.float32, copy=False)
        return x - cls.logsumexp(x, axis)

    @staticmethod
    def logaddexp(a, b):
        return np.logaddexp(a, b)

    @staticmethod
    def where(cond, a, b):
        return np.where(cond, a, b)

    @staticmethod
    def clip(x, lo, hi):
        return np.clip(x, lo, hi)

    @staticmethod
    def exp(x):
        return np.exp(x)

    @staticmethod
    def float32(x):
        return np.asarray(x, dtype=np.float32)

    @staticmethod
    def argmax(x, axis: int):
        return np.argmax(x, axis=axis).astype(np.int64)  # first index on ties, like torch

    @staticmethod
    def concat(parts, axis: int):
        return np.concatenate(parts, axis=axis)

    @staticmethod
    def expand(x, shape):
        return np.broadcast_to(x, shape)

    @staticmethod
    def arange_like(n: int, like):
        return np.arange(n, dtype=np.int64)

    @staticmethod
    def sort_desc(x, axis: int):
        return -np.sort(-x, axis=axis)  # negation is exact in float32: the same order as a descending sort

    @staticmethod
    def cumsum(x, axis: int):
        return np.cumsum(x, axis=axis, dtype=x.dtype)

    @staticmethod
    def take_along(x, idx, axis: int):
        return np.take_along_axis(x, idx, axis=axis)

    @staticmethod
    def count_true(cond, axis: int):
        return cond.sum(axis=axis, keepdims=True, dtype=np.int64)

    @staticmethod
    def maximum(x, v):
        return np.maximum(x, v)

    @staticmethod
    def as_bits(x):
        return x.view(np.int32)

    @staticmethod
    def from_bits(x):
        return x.view(np.float32)

    @staticmethod
    def amax(x, axis: int):
        return x.max(axis=axis, keepdims=True)

    @staticmethod
    def sum(x, axis: int):
        return x.sum(axis=axis, keepdims=True)

    @staticmethod
    def zeros_like(x, dtype: str):
        return np.zeros_like(x, dtype=dtype)

    @staticmethod
    def scalar(v, like):
        return np.asarray(v, dtype=like.dtype)


class _Torch:
    name = "torch"

    def __init__(self):
        import torch
        import torch.nn.functional as F

        self.torch, self.F = torch, F
        self._dtypes = {"int32": torch.int32, "int64": torch.int64, "float32": torch.float32}

    def logsumexp(self, x, axis: int, keepdims: bool = True):
        return self.torch.logsumexp(x, dim=axis, keepdim=keepdims)

    def log_softmax(self, x, axis: int):
        return self.F.log_softmax(x.float(), dim=axis)

    def logaddexp(self, a, b):
        return self.torch.logaddexp(a, b)

    def where(self, cond, a, b):
        return self.torch.where(cond, a, b)

    def clip(self, x, lo, hi):
        return x.clamp(lo, hi)

    def exp(self, x):
        return x.exp()

    def float32(self, x):
        return x.float()

    def argmax(self, x, axis: int):
        return x.argmax(dim=axis)

    def concat(self, parts, axis: int):
        return self.torch.cat(parts, dim=axis)

    def expand(self, x, shape):
        return x.expand(*shape)

    def arange_like(self, n: int, like):
        return self.torch.arange(n, device=like.device)

    def sort_desc(self, x, axis: int):
        return self.torch.sort(x, dim=axis, descending=True).values

    def cumsum(self, x, axis: int):
        return x.cumsum(dim=axis)

    def take_along(self, x, idx, axis: int):
        return x.gather(axis, idx)

    def count_true(self, cond, axis: int):
        return cond.sum(dim=axis, keepdim=True)

    def maximum(self, x, v):
        return x.clamp(min=v)

    def as_bits(self, x):
        return x.view(self.torch.int32)

    def from_bits(self, x):
        return x.view(self.torch.float32)

    def amax(self, x, axis: int):
        return x.amax(dim=axis, keepdim=True)

    def sum(self, x, axis: int):
        return x.sum(dim=axis, keepdim=True)

    def zeros_like(self, x, dtype: str):
        return self.torch.zeros_like(x, dtype=self._dtypes[dtype])

    def scalar(self, v, like):
        return float(v)  # a Python scalar: no host-to-device copy, so a CUDA graph can capture the step


NUMPY = _Numpy()
_TORCH: _Torch | None = None


def is_torch(x: Any) -> bool:
    """True for torch tensors, decided without importing torch (numpy arrays and Python numbers: False)."""
    return type(x).__module__.startswith("torch")


def xp(x: Any):
    """The namespace for `x`: torch's for torch tensors, numpy's otherwise."""
    global _TORCH
    if is_torch(x):
        if _TORCH is None:
            _TORCH = _Torch()
        return _TORCH
    return NUMPY


def to_numpy(x: Any) -> np.ndarray:
    """A numpy view (CPU tensors share memory) or copy of a torch tensor; numpy arrays pass through."""
    if is_torch(x):
        return x.detach().cpu().numpy()
    return np.asarray(x)
