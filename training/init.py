"""Randomly initialised checkpoints of a preset."""

from __future__ import annotations

import os

import torch

from cvqd.model.checkpoint import save_checkpoint
from cvqd.model.config import preset as get_preset
from cvqd.model.clipvqd import CLIPVQDiffusion


def init_checkpoint(preset: str, out: str | os.PathLike, seed: int = 0) -> CLIPVQDiffusion:
    """Build `preset` with seeded random weights and save it to `out` (stage "init").

    Its CLIP is random too, and marked so (`meta["clip_random"]`): the diffusion stages refuse to condition on
    it unless asked to (--allow-random-clip); `cvqd-train clip` trains it.
    """
    cfg = get_preset(preset)
    torch.manual_seed(seed)
    model = CLIPVQDiffusion(cfg)
    save_checkpoint(out, model.to_checkpoint(step=0, stage="init", meta={"init_seed": seed, "clip_random": True}))
    return model
