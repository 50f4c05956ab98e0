"""The autoregressive sampling loop (CLIP-GEN), written once against a prefill/decode interface.

    rows = [cond; null] (guidance != 1) or cond
    logits, cache = prefill(rows)                        # the condition positions
    for n in 0 .. N-1:
        log p = guided log-probs of token n              # l_null + s (l_cond - l_null), renormalised
        x_n   = Gumbel-max over the classes kept by temperature / top-k / top-p (Philox noise keyed by the seed)
        logits, cache = decode([x_n; x_n], n, cache)     # one token's work; the cache holds the prefix

A caller supplies (cvqd/model/contracts.py, the ar_prefill / ar_decode graphs):
    prefill(cond [R, D] float32)                          -> (logits [R, K] float32, cache [R, 2L, h, S, d])
    decode(token [R] int64, position [1] int64, cache)    -> (logits [R, K] float32, cache)
on numpy arrays (ONNX Runtime on the CPU: nothing imports torch) or torch tensors (the torch backend, ONNX
Runtime's CUDA provider). The noise of token n of image b is element [b, :, n] of `ar_gumbel_noise` keyed by its
seed, so a seed gives the same tokens on every backend and in every batch, up to the networks' numerics.

Token sampling, per row: z = log p / temperature, renormalised; classes outside the top_k get -inf (and z is
renormalised over the rest), then classes outside the smallest set holding top_p of that mass; x = argmax(z + g).
temperature 0 is greedy (argmax of log p).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from cvqd.model import step as stepmath
from cvqd.model.arrays import is_torch, to_numpy, xp
from cvqd.model.rng import ar_gumbel_noise, seed_key_array, seed_keys

Callback = Callable[[int, int], None]
Prefill = Callable[[Any], tuple[Any, Any]]
Decode = Callable[[Any, Any, Any], tuple[Any, Any]]
DROPPED = -1e30  # log-probability of a class cut by top-k / top-p (never wins against Gumbel noise < 18)


def filter_log_probs(logp, temperature: float, top_k: int, top_p: float):
    """[B, K] log-probs -> tempered, renormalised log-probs with the cut classes at DROPPED."""
    ops = xp(logp)
    K = logp.shape[1]
    z = logp if temperature == 1.0 else logp * ops.scalar(1.0 / temperature, logp)
    z = z - ops.logsumexp(z, 1)
    if 0 < top_k < K:
        kth = ops.sort_desc(z, 1)[:, top_k - 1:top_k]  # [B, 1]; ties with the k-th are kept
        z = ops.where(z >= kth, z, ops.scalar(DROPPED, z))
        z = z - ops.logsumexp(z, 1)  # top-p below measures mass within the top-k
    if top_p < 1.0:
        p = ops.exp(z)
        threshold = stepmath.truncation_threshold(z[:, :, None], top_p, probs=p[:, :, None])[:, :, 0]  # [B, 1]
        z = ops.where(p >= threshold, z, ops.scalar(DROPPED, z))
    return z


def sample_tokens(logp, noise, temperature: float, top_k: int, top_p: float):
    """One draw per row: log-probs [B, K], Gumbel noise [B, K] -> [B] int64."""
    ops = xp(logp)
    if temperature == 0:
        return ops.argmax(logp, 1)
    return ops.argmax(filter_log_probs(logp, temperature, top_k, top_p) + noise, 1)


class ARLoop:
    """Samples N tokens per condition with a prefill/decode pair; `device`: where their tensors live."""

    def __init__(self, prefill: Prefill, decode: Decode, num_classes: int, seq_len: int, device="cpu"):
        self.prefill, self.decode = prefill, decode
        self.num_classes, self.seq_len = num_classes, seq_len
        self.device_name = str(device)

    @property
    def step_impl(self) -> str:
        return "autoregressive, KV cache"

    def rows(self, cond, null, use_null: bool):
        """[cond; null] (or cond) as the kind of array `cond` is."""
        if not use_null:
            return cond
        ops = xp(cond)
        if is_torch(cond):  # the null may be a plan's numpy array (ONNX Runtime on CUDA works on torch tensors)
            import torch

            null = torch.as_tensor(null if is_torch(null) else np.asarray(to_numpy(null), dtype=np.float32))
            null = null.to(cond.device, cond.dtype).reshape(1, -1)
        else:
            null = np.asarray(to_numpy(null), dtype=np.float32).reshape(1, -1)
        return ops.concat([cond, ops.expand(null, tuple(cond.shape))], 0)

    def noise(self, cond, seeds: list[int]):
        if is_torch(cond):
            return ar_gumbel_noise(seed_keys(seeds, cond.device), self.num_classes, self.seq_len)
        return ar_gumbel_noise(seed_key_array(seeds), self.num_classes, self.seq_len)

    def run(self, cond, null, seeds: list[int], *, guidance: float, temperature: float, top_k: int, top_p: float,
            callback: Callback | None = None):
        """Tokens [B, N] int64 for conditions cond [B, D] and the null condition null [D], as the kind of array
        `cond` is; row b's draws come from Philox keyed by seeds[b]."""
        if is_torch(cond):
            import torch

            with torch.no_grad():
                return self._loop(cond, null, seeds, guidance, temperature, top_k, top_p, callback)
        return self._loop(np.asarray(cond, dtype=np.float32), null, seeds, guidance, temperature, top_k, top_p,
                          callback)

    def _loop(self, cond, null, seeds, guidance, temperature, top_k, top_p, callback):
        B, N = cond.shape[0], self.seq_len
        assert len(seeds) == B, (len(seeds), B)
        use_null = guidance != 1.0
        ops = xp(cond)
        noise = self.noise(cond, seeds)  # [B, K, N]
        logits, cache = self.prefill(self.rows(cond, null, use_null))
        out = []
        for n in range(N):
            logp = stepmath.guide_logits(logits, B, guidance, use_null)  # [B, K]
            tok = sample_tokens(logp, noise[:, :, n], temperature, top_k, top_p)
            out.append(tok)
            if n < N - 1:
                feed = ops.concat([tok, tok], 0) if use_null else tok
                logits, cache = self.decode(feed, self._position(n, cond), cache)
            if callback is not None:
                callback(n + 1, N)
        if is_torch(cond):
            import torch

            return torch.stack(out, 1)
        return np.stack(out, 1).astype(np.int64)

    @staticmethod
    def _position(n: int, like):
        if is_torch(like):
            import torch

            return torch.tensor([n], dtype=torch.int64, device=like.device)
        return np.array([n], dtype=np.int64)
