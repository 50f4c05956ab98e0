"""CLIP's image preprocessing in numpy, for the torch-free runtime (best-of-N reranking on a plan).

`cvqd.model.clip.clip_preprocess` (torch: training, `cvqd-eval`, the torch backend) resizes with
`F.interpolate(mode="bicubic", antialias=True)`, whose weights are those of PIL's resampling: a separable filter,
the cubic kernel with a = -0.5 stretched by the downscale factor, normalised per output pixel. Here the same
weights are built as two small matrices and applied with two matrix products: [B, 3, H, W] -> [B, 3, S, S].
tests/test_pixels.py compares it with the torch version.
"""

from __future__ import annotations


import numpy as np


def _cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def resize_weights(in_size: int, out_size: int) -> np.ndarray:
    """[out_size, in_size] float64 antialiased bicubic weights (rows sum to 1; align_corners=False)."""
    scale = in_size / out_size
    stretch = max(scale, 1.0)  # downscaling widens the kernel: the antialiasing
    support = 2.0 * stretch
    w = np.zeros((out_size, in_size))
    for i in range(out_size):
        center = (i + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        j = np.arange(lo, hi)
        k = _cubic((j - center + 0.5) / stretch)
        total = k.sum()
        w[i, lo:hi] = k / total if total != 0 else k
    return w


def clip_preprocess(images: np.ndarray, size: int, mean, std) -> np.ndarray:
    """images [B, 3, H, W] in [-1, 1] -> CLIP input [B, 3, S, S] float32: resize to S = size, CLIP mean/std."""
    x = (images.astype(np.float32) + 1) / 2
    H, W = x.shape[-2:]
    if (H, W) != (size, size):
        wy = resize_weights(H, size).astype(np.float32)  # [S, H]
        wx = resize_weights(W, size).astype(np.float32)  # [S, W]
        x = np.clip(wy @ x @ wx.T, 0, 1)  # [B, 3, S, S]
    m = np.asarray(mean, dtype=np.float32).reshape(1, 3, 1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(1, 3, 1, 1)
    return ((x - m) / s).astype(np.float32)


__all__ = ["clip_preprocess", "resize_weights"]
