"""One reverse step from denoiser logits to sampled tokens: the PyTorch implementation of the fused kernels.

This is what the loop runs on CPU (and on a GPU without the CUDA kernels), and it is the reference each CUDA
kernel in kernels/sampling.cu is tested against, stage by stage:

    logits [R, K, N]  --guide-->  log p(x_0) [B, K, N]  --truncate-->  --posterior-->  [B, K+1, N]
                      --Gumbel-max (Philox noise, cvqd/model/rng.py)-->  x_s [B, N]

R = 2B rows with guidance (conditional rows first, then the null rows), R = B without (guidance == 1).
Every per-step constant (the timestep and the nine posterior log-terms of `MaskReplaceSchedule.posterior_terms`)
lives in a `StepTable` indexed by the step number, so nothing in a step depends on host values: the same code
runs inside a CUDA graph with the step index in device memory.

Truncation keeps, per position, every class whose probability is at least p*, the smallest probability value
whose strictly larger mass stays below r. Here p* is read off the sorted cumulative mass (fast on CPU); the CUDA
kernel finds it by bisection on the float's bit pattern (32 fixed rounds, no sort over K = 4096), mirrored by
`truncation_threshold(..., method="bisect")`. Both equal `sampling.truncate` (sort + cumulative sum) except at
exact ties, where the threshold keeps all tied classes and the sort keeps an order-dependent subset.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cvqd.model.sampling import guide, log_probs
from cvqd.model.schedule import LOG_ZERO, MaskReplaceSchedule, posterior_from_terms

TERM_NAMES = ("lq_same", "lq_other", "lq_mask", "ls_a", "ls_b", "ls_g", "tr_same", "tr_other", "tr_mask")
BISECT_ROUNDS = 32  # positive float32 bit patterns span < 2^31 values: 31 halvings pin the threshold exactly


@dataclass
class StepTable:
    """Per-step constants of one reverse loop, on the loop's device.

    t: [S] int64 timesteps fed to the denoiser; s: [S] int64 target timesteps (-1 = x_0);
    terms: [S, 9] float32 posterior log-terms in TERM_NAMES order (-inf where a transition is impossible).
    """

    t: torch.Tensor
    s: torch.Tensor
    terms: torch.Tensor

    @property
    def num_steps(self) -> int:
        return int(self.t.shape[0])

    def row(self, step: int | torch.Tensor) -> dict[str, torch.Tensor]:
        """The posterior terms of one step as 0-d tensors (a device index keeps this free of host syncs)."""
        r = self.terms[step] if isinstance(step, int) else self.terms.index_select(0, step.view(1))[0]
        return {name: r[i] for i, name in enumerate(TERM_NAMES)}


def build_step_table(schedule: MaskReplaceSchedule, steps: int, device: torch.device | str | None = None) -> StepTable:
    """The (t, s) pairs of `schedule.strided_steps(steps)` and their posterior terms, as device tensors."""
    pairs = schedule.strided_steps(steps)
    cpu = schedule.to("cpu")
    rows = []
    for t, s in pairs:
        terms = cpu.posterior_terms(t, s)
        rows.append([float(terms[name]) for name in TERM_NAMES])
    device = device if device is not None else schedule.device
    return StepTable(t=torch.tensor([t for t, _ in pairs], dtype=torch.int64, device=device),
                     s=torch.tensor([s for _, s in pairs], dtype=torch.int64, device=device),
                     terms=torch.tensor(rows, dtype=torch.float32, device=device))


# ----------------------------------------------------------------------------------------------- stages

def guide_logits(logits: torch.Tensor, batch: int, guidance: float, use_null: bool) -> torch.Tensor:
    """Stage 1: [R, K, N] logits -> guided, renormalised log p(x_0) [B, K, N] (R = 2B with the null rows)."""
    if not use_null:
        return log_probs(logits[:batch])
    return guide(log_probs(logits[:batch]), log_probs(logits[batch:2 * batch]), guidance)


def truncation_threshold(log_x0: torch.Tensor, rate: float, method: str = "sort",
                         probs: torch.Tensor | None = None) -> torch.Tensor:
    """Per position, the smallest probability p* whose strictly larger mass is < rate: [B, 1, N] float32.

    method "sort": read p* off the sorted exclusive cumulative mass (fast on CPU).
    method "bisect": the CUDA kernel's algorithm, mirrored: bisection on the int32 bit pattern of positive
    floats (ordered like the integers), invariant S(lo) >= rate > S(hi) with S(v) = sum of p_i > v; after
    BISECT_ROUNDS rounds hi is exactly p*. If the whole mass is below `rate` (rounding, rate near 1), p* = 0.
    The two differ only where a partial sum lies within float rounding of `rate`. `probs`: exp(log_x0) if known.
    """
    p = probs if probs is not None else log_x0.float().exp()  # [B, K, N]
    if method == "sort":
        if p.device.type == "cpu":  # numpy's sort of a [B*N, K] float32 array beats torch.sort on the CPU
            B, K, N = p.shape
            desc = np.sort(p.transpose(1, 2).reshape(B * N, K).numpy(), axis=-1)[:, ::-1]
            sp = torch.from_numpy(np.ascontiguousarray(desc))  # [B*N, K] descending; torch's cumsum is faster
            before = sp.cumsum(dim=-1) - sp
            count = (before < rate).sum(dim=-1, keepdim=True).clamp(min=1)
            return sp.gather(1, count - 1).view(B, 1, N)
        sp = torch.sort(p, dim=1, descending=True).values
        before = sp.cumsum(dim=1) - sp  # exclusive cumulative mass, non-decreasing
        count = (before < rate).sum(dim=1, keepdim=True).clamp(min=1)  # the top-1 is always kept
        return sp.gather(1, count - 1)
    assert method == "bisect", method
    top = p.amax(dim=1, keepdim=True)
    lo = torch.zeros_like(top, dtype=torch.int32)  # bits of 0.0
    hi = top.view(torch.int32).clone()
    for _ in range(BISECT_ROUNDS):
        mid = lo + (hi - lo) // 2
        mass = torch.where(p > mid.view(torch.float32), p, 0.0).sum(dim=1, keepdim=True)
        below = mass < rate
        hi = torch.where(below, mid, hi)
        lo = torch.where(below, lo, mid)
    everything_below = p.sum(dim=1, keepdim=True) < rate
    return torch.where(everything_below, 0.0, hi.view(torch.float32))


def truncate_threshold(log_x0: torch.Tensor, rate: float, method: str = "sort") -> torch.Tensor:
    """Stage 2: classes below the truncation threshold get LOG_ZERO: [B, K, N] -> [B, K, N]."""
    if rate >= 1.0:
        return log_x0
    p = log_x0.float().exp()
    return torch.where(p >= truncation_threshold(log_x0, rate, method, probs=p), log_x0, LOG_ZERO)


def posterior(log_x0: torch.Tensor, x_t: torch.Tensor, terms: dict[str, torch.Tensor]) -> torch.Tensor:
    """Stage 3: log p(x_s | x_t) [B, K+1, N] from the step's nine log-terms (schedule.posterior_from_terms)."""
    return posterior_from_terms(log_x0, x_t, terms)


def gumbel_argmax(log_post: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Stage 4: Gumbel-max over the K+1 classes: argmax(log p + g) -> [B, N] int64 (first index on ties)."""
    return (log_post + noise).argmax(dim=1)


def sample_step(logits: torch.Tensor, x_t: torch.Tensor, terms: dict[str, torch.Tensor], noise: torch.Tensor, *,
                guidance: float, truncation: float, use_null: bool, method: str = "sort") -> torch.Tensor:
    """The whole step (what `cvqd_sample_step` fuses): logits [R, K, N], x_t [B, N], noise [B, K+1, N] -> x_s [B, N]."""
    log_x0 = guide_logits(logits, x_t.shape[0], guidance, use_null)
    log_x0 = truncate_threshold(log_x0, truncation, method)
    return gumbel_argmax(posterior(log_x0, x_t, terms), noise)
