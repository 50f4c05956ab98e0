"""One reverse step from denoiser logits to sampled tokens: the reference of the fused kernels, written once.

The CPU runtime runs this on numpy arrays (no torch), a GPU without the CUDA kernels runs it on torch tensors, and
each CUDA kernel in kernels/sampling.cu is tested against it stage by stage. The code is written against the small
array namespace of cvqd/model/arrays.py, which dispatches on the type of its inputs:

    logits [R, K, N]  --guide-->  log p(x_0) [B, K, N]  --truncate-->  --posterior-->  [B, K+1, N]
                      --Gumbel-max (Philox noise, cvqd/model/rng.py)-->  x_s [B, N]

R = 2B rows with guidance (conditional rows first, then the null rows), R = B without (guidance == 1).
Every per-step constant (the timestep and the nine posterior log-terms of `MaskReplaceSchedule.posterior_terms`)
lives in a `StepTable` indexed by the step number, so nothing in a step depends on host values: on a GPU the same
code runs inside a CUDA graph with the step index in device memory.

Truncation keeps, per position, every class whose probability is at least p*, the smallest probability value
whose strictly larger mass stays below r. Here p* is read off the sorted cumulative mass; the CUDA kernel finds it
by bisection on the float's bit pattern (32 fixed rounds, no sort over K = 4096), mirrored by
`truncation_threshold(..., method="bisect")`. Both equal `sampling.truncate` (sort + cumulative sum) except at
exact ties, where the threshold keeps all tied classes and the sort keeps an order-dependent subset.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from cvqd.model.arrays import is_torch, xp
from cvqd.model.schedule import LOG_ZERO, MaskReplaceSchedule, posterior_from_terms

TERM_NAMES = ("lq_same", "lq_other", "lq_mask", "ls_a", "ls_b", "ls_g", "tr_same", "tr_other", "tr_mask")
BISECT_ROUNDS = 32  # positive float32 bit patterns span < 2^31 values: 31 halvings pin the threshold exactly


@dataclass
class StepTable:
    """Per-step constants of one reverse loop: numpy arrays (CPU loop) or tensors on the loop's device.

    t: [S] int64 timesteps fed to the denoiser; s: [S] int64 target timesteps (-1 = x_0);
    terms: [S, 9] float32 posterior log-terms in TERM_NAMES order (-inf where a transition is impossible).
    """

    t: Any
    s: Any
    terms: Any

    @property
    def num_steps(self) -> int:
        return int(self.t.shape[0])

    def to(self, device) -> "StepTable":
        """The same table as torch tensors on `device`."""
        import torch

        conv = lambda a: torch.as_tensor(np.asarray(a) if not is_torch(a) else a).to(device)  # noqa: E731
        return StepTable(t=conv(self.t), s=conv(self.s), terms=conv(self.terms))

    def row(self, step) -> dict[str, Any]:
        """The posterior terms of one step as 0-d arrays; `step` an int, or a [1] device tensor (keeps a CUDA
        graph free of host syncs)."""
        if isinstance(step, (int, np.integer)):
            r = self.terms[int(step)]
        else:
            r = self.terms.index_select(0, step.view(1))[0]
        return {name: r[i] for i, name in enumerate(TERM_NAMES)}


def build_step_table(schedule: MaskReplaceSchedule, steps: int, device=None, start_t: int | None = None) -> StepTable:
    """The (t, s) pairs of `schedule.strided_steps(steps)` and their posterior terms: numpy arrays, or tensors on
    `device` when one is given. The values come from the schedule's float32 tables, so every backend sees the
    same bits. `start_t` (a global edit): only the pairs with t <= start_t, the loop starting from x_t there."""
    pairs = schedule.strided_steps(steps)
    if start_t is not None:  # (a single step straight to x_0 when the stride skips everything below start_t)
        pairs = [(t, s) for t, s in pairs if t <= start_t] or [(int(start_t), -1)]
    terms = np.array([[schedule.host_terms(t, s)[name] for name in TERM_NAMES] for t, s in pairs], dtype=np.float32)
    table = StepTable(t=np.array([t for t, _ in pairs], dtype=np.int64),
                      s=np.array([s for _, s in pairs], dtype=np.int64), terms=terms)
    return table if device is None else table.to(device)


# ----------------------------------------------------------------------------------------------- stages

def log_probs(logits):
    """Denoiser logits [R, K, N] -> log p(x_0) over the K real classes, clamped to [LOG_ZERO, 0] (as the model's
    head)."""
    ops = xp(logits)
    return ops.clip(ops.log_softmax(logits, 1), LOG_ZERO, 0.0)


def guide(log_cond, log_null, scale: float):
    """Classifier-free guidance on x_0 log-probs [B, K, N]: l_null + s (l_cond - l_null), renormalised, clamped."""
    ops = xp(log_cond)
    logits = log_null + ops.scalar(scale, log_cond) * (log_cond - log_null)
    return ops.clip(logits - ops.logsumexp(logits, 1), LOG_ZERO, 0.0)


def guide_logits(logits, batch: int, guidance: float, use_null: bool):
    """Stage 1: [R, K, N] logits -> guided, renormalised log p(x_0) [B, K, N] (R = 2B with the null rows)."""
    if not use_null:
        return log_probs(logits[:batch])
    return guide(log_probs(logits[:batch]), log_probs(logits[batch:2 * batch]), guidance)


def truncation_threshold(log_x0, rate: float, method: str = "sort", probs=None):
    """Per position, the smallest probability p* whose strictly larger mass is < rate: [B, 1, N] float32.

    method "sort": read p* off the sorted exclusive cumulative mass.
    method "bisect": the CUDA kernel's algorithm, mirrored: bisection on the int32 bit pattern of positive
    floats (ordered like the integers), invariant S(lo) >= rate > S(hi) with S(v) = sum of p_i > v; after
    BISECT_ROUNDS rounds hi is exactly p*. If the whole mass is below `rate` (rounding, rate near 1), p* = 0.
    The two differ only where a partial sum lies within float rounding of `rate`. `probs`: exp(log_x0) if known.
    """
    ops = xp(log_x0)
    p = probs if probs is not None else ops.exp(ops.float32(log_x0))  # [B, K, N]
    if method == "sort":
        sp = ops.sort_desc(p, 1)
        before = ops.cumsum(sp, 1) - sp  # exclusive cumulative mass, non-decreasing
        count = ops.maximum(ops.count_true(before < rate, 1), 1)  # the top-1 is always kept
        return ops.take_along(sp, count - 1, 1)
    assert method == "bisect", method
    top = ops.amax(p, 1)
    lo = ops.zeros_like(top, "int32")  # bits of 0.0
    hi = ops.as_bits(top) + 0  # a copy
    zero = ops.scalar(0.0, p)
    for _ in range(BISECT_ROUNDS):
        mid = lo + (hi - lo) // 2
        mass = ops.sum(ops.where(p > ops.from_bits(mid), p, zero), 1)
        below = mass < rate
        hi = ops.where(below, mid, hi)
        lo = ops.where(below, lo, mid)
    everything_below = ops.sum(p, 1) < rate
    return ops.where(everything_below, zero, ops.from_bits(hi))


def truncate_threshold(log_x0, rate: float, method: str = "sort"):
    """Stage 2: classes below the truncation threshold get LOG_ZERO: [B, K, N] -> [B, K, N]."""
    if rate >= 1.0:
        return log_x0
    ops = xp(log_x0)
    p = ops.exp(ops.float32(log_x0))
    return ops.where(p >= truncation_threshold(log_x0, rate, method, probs=p), log_x0, ops.scalar(LOG_ZERO, log_x0))


def posterior(log_x0, x_t, terms: dict[str, Any]):
    """Stage 3: log p(x_s | x_t) [B, K+1, N] from the step's nine log-terms (schedule.posterior_from_terms)."""
    return posterior_from_terms(log_x0, x_t, terms)


def gumbel_argmax(log_post, noise):
    """Stage 4: Gumbel-max over the K+1 classes: argmax(log p + g) -> [B, N] int64 (first index on ties)."""
    return xp(log_post).argmax(log_post + noise, 1)


def sample_step(logits, x_t, terms: dict[str, Any], noise, *, guidance: float, truncation: float, use_null: bool,
                method: str = "sort"):
    """The whole step (what `cvqd_sample_step` fuses): logits [R, K, N], x_t [B, N], noise [B, K+1, N] -> x_s [B, N]."""
    log_x0 = guide_logits(logits, x_t.shape[0], guidance, use_null)
    log_x0 = truncate_threshold(log_x0, truncation, method)
    return gumbel_argmax(posterior(log_x0, x_t, terms), noise)
