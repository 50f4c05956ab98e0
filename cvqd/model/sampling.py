"""Reference sampling math in PyTorch: guidance, truncation, Gumbel-max, and the reverse loop.

These functions are the ground truth that every faster path (fused CUDA kernels, exported graphs) is
compared against. They are pure: tensors in, tensors out, no host syncs, no data-dependent Python
branches, so a step can be captured in a CUDA graph.

Shapes: B images, K real classes, N = H*W token positions, D condition width.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from cvqd.model.contracts import Denoise
from cvqd.model.schedule import LOG_ZERO, MaskReplaceSchedule
from cvqd.model.step import guide, log_probs  # the step's stages, shared (numpy or torch)

__all__ = ["Denoise", "guide", "log_probs", "truncate", "gumbel_max", "reverse_diffusion"]


def truncate(log_x0: torch.Tensor, rate: float) -> torch.Tensor:
    """Per position keep the most likely classes whose preceding cumulative probability is below `rate`.

    Sorted by probability, class i is kept iff the mass of the classes ranked above it is < rate: the
    smallest top set whose mass reaches `rate`, and always the top-1. The rest get LOG_ZERO. rate = 1 keeps all.
    """
    sorted_lp, order = torch.sort(log_x0, dim=1, descending=True)
    before = torch.cumsum(sorted_lp.exp(), dim=1) - sorted_lp.exp()  # exclusive cumulative mass
    keep_sorted = before < rate
    keep_sorted[:, 0] = True
    keep = torch.empty_like(keep_sorted).scatter_(1, order, keep_sorted)
    return torch.where(keep, log_x0, torch.full_like(log_x0, LOG_ZERO))


def gumbel_from_uniform(u: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise from uniforms in [0, 1): -log(-log(u)), guarded like the reference."""
    return -torch.log(-torch.log(u + 1e-30) + 1e-30)


Generators = torch.Generator | Sequence[torch.Generator] | None


def uniform_noise(shape: torch.Size, generator: Generators, device, dtype=torch.float32) -> torch.Tensor:
    """Uniforms of `shape`; a sequence of generators gives row b its own stream (batch-size invariant)."""
    if isinstance(generator, Sequence):
        assert len(generator) == shape[0], "one generator per row"
        return torch.stack([torch.rand(shape[1:], generator=g, device=device, dtype=dtype) for g in generator])
    return torch.rand(shape, generator=generator, device=device, dtype=dtype)


def gumbel_max(log_probs: torch.Tensor, generator: Generators = None) -> torch.Tensor:
    """Sample categorical indices over dim 1 of [B, C, N] log-probs by Gumbel-max: -> [B, N] int64."""
    u = uniform_noise(log_probs.shape, generator, log_probs.device, log_probs.dtype)
    return (log_probs + gumbel_from_uniform(u)).argmax(dim=1)


def reverse_diffusion(
    denoise: Denoise,
    schedule: MaskReplaceSchedule,
    cond: torch.Tensor,
    null: torch.Tensor,
    *,
    seq_len: int,
    steps: int | None = None,
    guidance: float = 1.0,
    truncation: float = 1.0,
    generator: Generators = None,
    callback: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Reference sampler: all-[MASK] start, `steps` reverse evaluations, returns x_0 tokens [B, N].

    cond [B, D] are the (normalised) conditions and null [D] or [B, D] the null condition. Each step runs the
    conditional and null rows in ONE batched forward (2B rows) unless guidance == 1, where the null rows
    cannot change the result and are skipped. Then guidance -> truncation -> the exact posterior for the
    (t, s) transition -> Gumbel-max. With fewer steps than T the strided posterior is exact.
    `generator` is one torch.Generator, or one per image row (then row b's result does not depend on B).
    """
    K, B = schedule.num_classes, cond.shape[0]
    device = cond.device
    pairs = schedule.strided_steps(steps or schedule.num_steps)
    use_null = guidance != 1.0
    rows = torch.cat([cond, null.expand(B, -1).to(cond)], dim=0) if use_null else cond  # [R, D]
    x = torch.full((B, seq_len), K, dtype=torch.long, device=device)
    for i, (t, s) in enumerate(pairs):
        tt = torch.full((rows.shape[0],), t, dtype=torch.long, device=device)
        log_x0 = log_probs(denoise(x.repeat(2, 1) if use_null else x, tt, rows))  # [R, K, N]
        if use_null:
            log_x0 = guide(log_x0[:B], log_x0[B:], guidance)
        if truncation < 1.0:
            log_x0 = truncate(log_x0, truncation)
        x = gumbel_max(schedule.q_posterior(log_x0, x, t, s), generator)
        if callback is not None:
            callback(i + 1, len(pairs))
    return x
