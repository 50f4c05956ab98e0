"""Counter-based random numbers: Philox4x32-10, the same bits on the CPU (numpy) and the GPU (torch, CUDA C).

A counter-based generator maps (counter, key) -> random bits with no hidden state, so any element of the
noise can be computed independently, in any order, on any device. The runtime's Gumbel noise is defined
entirely by this module:

    key     = the image's seed (64 bits -> two 32-bit words); image j of a prompt uses seed + j
    counter = (class // 4, position, step, stream)        -> 4 words; class % 4 picks the output word
    uniform = (2 * (word >> 9) + 1) * 2^-24                -> exactly representable in float32, in (0, 1)

so the noise of image j at step i does not depend on the batch it was sampled in, nor on the backend
(the CPU runtime, torch on a GPU, the fused CUDA kernel in kernels/sampling.cu). Two implementations of the same
rounds: numpy on uint32 words with exact 64-bit products (the CPU path, torch-free: keys given as numpy arrays
stay numpy), and torch on int64 tensors with the 32x32 -> 64 bit multiply split into 16-bit halves so nothing
overflows a signed 64-bit integer (any torch device, capturable in a CUDA graph). The tests check them and the
CUDA kernel bit for bit. torch is imported only by the torch functions.

Philox4x32-10 is from Salmon et al., "Parallel random numbers: as easy as 1, 2, 3" (SC 2011); the
known-answer vectors of their Random123 distribution are checked in tests/test_runtime_rng.py.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

MASK32 = 0xFFFFFFFF
PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57  # round multipliers
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85  # Weyl key increments (golden ratio, sqrt(3) - 1)
ROUNDS = 10

STREAM_GUMBEL = 0  # counter word 3: which use of the randomness
STREAM_RENOISE = 1  # the forward noising of a global edit (x_0 -> x_t)
STREAM_AR = 2  # the autoregressive generator's token draws: counter (class // 4, position, 0, STREAM_AR)


def _mulhilo(a: int, b: "torch.Tensor") -> tuple["torch.Tensor", "torch.Tensor"]:
    """(hi, lo) 32-bit words of the 64-bit product a * b, for a constant a < 2^32 and int64 b in [0, 2^32)."""
    p_lo = b * (a & 0xFFFF)  # < 2^48
    p_hi = b * (a >> 16)  # < 2^48; a * b = p_hi * 2^16 + p_lo
    mid = p_lo + ((p_hi & 0xFFFF) << 16)  # < 2^49: the low 32 bits plus the carry into the high word
    return (p_hi >> 16) + (mid >> 32), mid & MASK32


def philox4x32(counter: Sequence[torch.Tensor], key: Sequence[torch.Tensor | int]) -> list[torch.Tensor]:
    """Philox4x32-10 on broadcastable int64 tensors holding 32-bit words: 4 counter + 2 key words -> 4 words."""
    x0, x1, x2, x3 = counter
    k0, k1 = key
    for r in range(ROUNDS):
        if r:  # the key schedule: bumped before every round but the first
            k0 = (k0 + PHILOX_W0) & MASK32
            k1 = (k1 + PHILOX_W1) & MASK32
        hi0, lo0 = _mulhilo(PHILOX_M0, x0)
        hi1, lo1 = _mulhilo(PHILOX_M1, x2)
        x0, x1, x2, x3 = hi1 ^ x1 ^ k0, lo1, hi0 ^ x3 ^ k1, lo0
    return [x0, x1, x2, x3]


def _philox4x32_numpy(counter, key):
    """The same rounds on numpy uint32 arrays; each 32 x 32 bit product is formed exactly in uint64 (no
    splitting needed), and additions wrap modulo 2^32 as in C. Fewer operations than the int64 torch version, so
    cheaper on the CPU; bit-identical (tested)."""
    x0, x1, x2, x3 = (np.asarray(c, dtype=np.uint32) for c in counter)  # broadcastable: grow as rounds mix
    k0, k1 = (np.asarray(k, dtype=np.uint32) for k in key)
    m0, m1, s32 = np.uint64(PHILOX_M0), np.uint64(PHILOX_M1), np.uint64(32)
    with np.errstate(over="ignore"):
        for r in range(ROUNDS):
            if r:
                k0 = k0 + np.uint32(PHILOX_W0)
                k1 = k1 + np.uint32(PHILOX_W1)
            p0 = x0.astype(np.uint64) * m0
            p1 = x2.astype(np.uint64) * m1
            x0, x1, x2, x3 = ((p1 >> s32).astype(np.uint32) ^ x1 ^ k0, p1.astype(np.uint32),
                              (p0 >> s32).astype(np.uint32) ^ x3 ^ k1, p0.astype(np.uint32))
    return [x0, x1, x2, x3]


def _words_numpy(keys, steps, num_classes: int, seq_len: int, stream: int) -> np.ndarray:
    """Gumbel-stream words on CPU: [S, B, C, N] uint32 (layout of `gumbel_bits`); keys [B, 2] and steps [S] as
    numpy arrays or CPU tensors."""
    keys, steps = np.asarray(keys), np.asarray(steps).reshape(-1)
    S, B, groups = steps.size, keys.shape[0], (num_classes + 3) // 4
    u32 = np.uint32
    # counter words as small broadcastable arrays: the first rounds work on partial shapes, nothing is tiled
    x0 = np.arange(groups, dtype=u32).reshape(1, 1, groups, 1)
    x1 = np.arange(seq_len, dtype=u32).reshape(1, 1, 1, seq_len)
    x2 = (steps.astype(np.int64) & MASK32).astype(u32).reshape(S, 1, 1, 1)
    x3 = np.full((1, 1, 1, 1), stream & MASK32, dtype=u32)
    k = (keys.astype(np.int64) & MASK32).astype(u32)
    out = _philox4x32_numpy((x0, x1, x2, x3), (k[:, 0].reshape(1, B, 1, 1), k[:, 1].reshape(1, B, 1, 1)))
    words = np.stack([np.broadcast_to(w, (S, B, groups, seq_len)) for w in out], axis=3)  # [S, B, G, 4, N]
    return words.reshape(S, B, groups * 4, seq_len)[:, :, :num_classes]


def seed_key(seed: int) -> tuple[int, int]:
    """A Python int seed (any sign) -> its two 32-bit key words (the seed modulo 2^64, little end first)."""
    s = int(seed) % (1 << 64)
    return s & MASK32, s >> 32


def seed_key_array(seeds: Sequence[int]) -> np.ndarray:
    """Per-row keys [B, 2] int64 as a numpy array (the CPU runtime's form of `seed_keys`)."""
    return np.array([seed_key(s) for s in seeds], dtype=np.int64).reshape(-1, 2)


def seed_keys(seeds: Sequence[int], device="cpu") -> "torch.Tensor":
    """Per-row keys [B, 2] int64 tensor (what the CUDA kernel reads from device memory as uint32 pairs)."""
    import torch

    return torch.from_numpy(seed_key_array(seeds)).to(device)


def uniform_from_bits(bits: "torch.Tensor") -> "torch.Tensor":
    """32-bit words -> float32 uniforms (2m + 1) / 2^24 with m = word >> 9: exact, never 0 or 1."""
    import torch

    return ((bits >> 9) * 2 + 1).to(torch.float32) * (2.0 ** -24)


def _uniforms_numpy(words: np.ndarray) -> np.ndarray:
    odd = (words >> np.uint32(9)) * np.uint32(2) + np.uint32(1)  # < 2^24: exact in float32
    return odd.astype(np.float32) * np.float32(2.0 ** -24)


def gumbel_bits(keys: "torch.Tensor", step: "int | torch.Tensor", num_classes: int, seq_len: int,
                stream: int = STREAM_GUMBEL, impl: str = "auto") -> "torch.Tensor":
    """Raw words for the Gumbel noise of reverse step(s): [B, C, N] int64 (C = num_classes, N = seq_len).

    Element (b, c, n) is word c % 4 of Philox(counter = (c // 4, n, step, stream), key = keys[b]).
    `step` is an int, a 0-d int64 tensor (may live on the device: no host sync, as in a CUDA graph), or a
    1-d tensor of S steps, which gives [S, B, C, N] in one vectorised pass (cheaper per step on CPU).
    impl: "auto" (numpy for CPU tensors, torch elsewhere), "numpy" or "torch" (both give the same words).
    """
    import torch

    B, dev = keys.shape[0], keys.device
    steps = torch.as_tensor(step, dtype=torch.int64, device=dev)
    S = steps.numel()
    groups = (num_classes + 3) // 4
    shape = (S, B, groups, seq_len)
    if impl == "numpy" or (impl == "auto" and dev.type == "cpu"):
        assert dev.type == "cpu", "the numpy implementation needs CPU tensors"
        words = torch.from_numpy(_words_numpy(keys.numpy(), steps.numpy(), num_classes, seq_len, stream)
                                 .astype(np.int64))
        return words if steps.dim() == 1 else words[0]
    x0 = torch.arange(groups, dtype=torch.int64, device=dev).view(1, 1, groups, 1).expand(shape)
    x1 = torch.arange(seq_len, dtype=torch.int64, device=dev).view(1, 1, 1, seq_len).expand(shape)
    x2 = (steps.reshape(S, 1, 1, 1) & MASK32).expand(shape)
    x3 = torch.full(shape, stream & MASK32, dtype=torch.int64, device=dev)
    k0, k1 = keys[:, 0].view(1, B, 1, 1), keys[:, 1].view(1, B, 1, 1)
    words = torch.stack(philox4x32((x0, x1, x2, x3), (k0, k1)), dim=3)  # [S, B, G, 4, N]
    words = words.reshape(S, B, groups * 4, seq_len)[:, :, :num_classes]
    return words if steps.dim() == 1 else words[0]


def renoise_uniforms(keys: np.ndarray, seq_len: int) -> np.ndarray:
    """Two uniforms per position for drawing x_t ~ q(x_t | x_0) (mask or replace, then which token): [B, 2, N]
    float32 from the STREAM_RENOISE stream of each image's key (step word 0)."""
    return _uniforms_numpy(_words_numpy(np.asarray(keys), np.zeros(1, dtype=np.int64), 2, seq_len,
                                        STREAM_RENOISE))[0]


def ar_gumbel_noise(keys, num_classes: int, seq_len: int):
    """Gumbel noise of every token draw of an autoregressive sample: [B, K, N] float32 (token n uses [:, :, n]).
    numpy keys -> numpy; tensor keys -> a tensor on their device (CPU tensors: the numpy values, so a CPU torch
    backend and the numpy runtime draw identical noise). Element (b, c, n) is word c % 4 of
    Philox(counter = (c // 4, n, 0, STREAM_AR), key = keys[b])."""
    if isinstance(keys, np.ndarray) or keys.device.type == "cpu":
        u = _uniforms_numpy(_words_numpy(np.asarray(keys), np.zeros(1, dtype=np.int64), num_classes, seq_len,
                                         STREAM_AR))[0]
        g = -np.log(-np.log(u))
        if isinstance(keys, np.ndarray):
            return g
        import torch

        return torch.from_numpy(np.ascontiguousarray(g))
    import torch

    return -torch.log(-torch.log(uniform_from_bits(gumbel_bits(keys, 0, num_classes, seq_len, stream=STREAM_AR))))


def gumbel_uniforms(keys, step, num_classes: int, seq_len: int):
    """Uniforms in (0, 1) for reverse step(s): [B, C, N] (or [S, B, C, N]) float32 (see `gumbel_bits`).

    keys as a numpy array -> numpy (no torch); as a tensor -> a tensor on its device."""
    if isinstance(keys, np.ndarray):
        u = _uniforms_numpy(_words_numpy(keys, np.asarray(step), num_classes, seq_len, STREAM_GUMBEL))
        return u if np.ndim(step) == 1 else u[0]
    import torch

    if keys.device.type == "cpu":  # the same exact arithmetic on the uint32 words, in numpy
        steps = torch.as_tensor(step, dtype=torch.int64)
        u = torch.from_numpy(_uniforms_numpy(_words_numpy(keys.numpy(), steps.numpy(), num_classes, seq_len,
                                                          STREAM_GUMBEL)))
        return u if steps.dim() == 1 else u[0]
    return uniform_from_bits(gumbel_bits(keys, step, num_classes, seq_len))


def gumbel_noise(keys, step, num_classes: int, seq_len: int):
    """Standard Gumbel noise -log(-log(u)) for reverse step(s): [B, C, N] (or [S, B, C, N]) float32; numpy for
    numpy keys, torch for tensor keys."""
    u = gumbel_uniforms(keys, step, num_classes, seq_len)
    if isinstance(u, np.ndarray):
        return -np.log(-np.log(u))
    import torch

    return -torch.log(-torch.log(u))


class GumbelSource:
    """Gumbel noise for the steps of one reverse loop on the CPU (numpy), generated in chunks of steps (amortises
    the many small array ops of Philox over several steps; a chunk stays near `max_elems` words)."""

    def __init__(self, keys: np.ndarray, num_classes: int, seq_len: int, num_steps: int, max_elems: int = 1 << 20):
        self.keys, self.C, self.N, self.S = np.asarray(keys), num_classes, seq_len, num_steps
        self.chunk = max(1, min(num_steps, max_elems // max(1, self.keys.shape[0] * num_classes * seq_len)))
        self._start, self._noise = -1, None

    def __call__(self, step: int) -> np.ndarray:
        """Noise of step `step` (0-based within this loop): [B, C, N] float32."""
        if self._noise is None or not self._start <= step < self._start + self._noise.shape[0]:
            stop = min(self.S, step + self.chunk)
            self._start = step
            self._noise = gumbel_noise(self.keys, np.arange(step, stop, dtype=np.int64), self.C, self.N)
        return self._noise[step - self._start]
