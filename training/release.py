"""Turn a training checkpoint into the file users run: no resume state, chosen sampling defaults, fp16 weights."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from cvqd.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from cvqd.errors import CvqdError


def finalize(ckpt: str | os.PathLike, out: str | os.PathLike, *, fp16: bool = False, steps: int | None = None,
             guidance: float | None = None, truncation: float | None = None,
             notes: dict[str, str] | None = None) -> int:
    """Write `out` from `ckpt` without its `training` state; -> size in bytes.

    Training-run metadata (configs, step counts, data sizes) is kept in `meta`; the optimizer, EMA shadow,
    discriminator and RNG states are dropped. The recorded sampling defaults are what `cvqd-run` uses when no
    flags are given.
    """
    src = load_checkpoint(ckpt)
    if src.stage in ("init",):
        raise CvqdError(f"{ckpt} is an untrained ({src.stage}) checkpoint; nothing to finalize")
    s = src.config.sampling
    sampling = s.replace(steps=s.steps if steps is None else steps,
                         guidance=s.guidance if guidance is None else guidance,
                         truncation=s.truncation if truncation is None else truncation)
    config = src.config.replace(sampling=sampling)
    config.__post_init__()  # validate the new defaults against the model (steps <= T ...)
    meta = {**src.meta, **(notes or {}), "finalized_from": {"stage": src.stage, "step": src.step}}
    save_checkpoint(out, Checkpoint(config, src.state, src.step, src.stage, meta, None),
                    weights_dtype=torch.float16 if fp16 else torch.float32)
    return Path(out).stat().st_size
