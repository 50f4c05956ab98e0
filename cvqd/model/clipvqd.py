"""The model bundle: VQGAN + generator + learned null embedding + CLIP.

The generator is the diffusion transformer (`model.transformer`, CLIP-VQDiffusion) or, for configs with `ar` set,
the autoregressive transformer (`model.ar`, CLIP-GEN; `model.transformer` is then None). A checkpoint's `state`
holds the generator's weights under "transformer" or "ar".

Build from a config (`CLIPVQDiffusion(cfg)`), save to / load from a checkpoint (`to_checkpoint`,
`load_model`). The null embedding is a parameter in CLIP space; it is L2-normalised wherever it is used,
in training and at inference alike (the reference implementation normalises it only in training).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cvqd.model.checkpoint import Checkpoint, load_checkpoint
from cvqd.model.config import ModelConfig
from cvqd.errors import CheckpointError
from cvqd.model.schedule import MaskReplaceSchedule
from cvqd.model.clip import ClipEncoder, build_clip, clip_state_from_file, load_clip_weights
from cvqd.model.ar import ARTransformer
from cvqd.model.transformer import DiffusionTransformer
from cvqd.model.vqgan import VQGAN

# CLIPs up to this many parameters travel inside the checkpoint; larger ones (ViT-B/32 and up) come from a
# file the user passes, so a 2 GB checkpoint does not carry a second copy of a public model.
CLIP_INLINE_MAX_PARAMS = 50_000_000


class CLIPVQDiffusion(nn.Module):
    def __init__(self, cfg: ModelConfig, clip: nn.Module | None = None, build_clip_model: bool = True,
                 materialize: bool = True):
        super().__init__()
        self.cfg = cfg
        # materialize=False builds the two big networks on the meta device (no memory, no random init); the
        # caller must then load every weight with load_model_state(..., assign=True). Loading a 2 GB checkpoint
        # this way peaks near 1x the weights instead of 3x.
        with contextlib.nullcontext() if materialize else torch.device("meta"):
            self.vqgan = VQGAN(cfg.vqgan)
            self.transformer = DiffusionTransformer(cfg.transformer) if cfg.ar is None else None
            self.ar = ARTransformer(cfg.ar) if cfg.ar is not None else None
        self.null_embedding = nn.Parameter(F.normalize(torch.randn(cfg.clip.embed_dim), dim=0))
        if clip is None and build_clip_model:
            clip = build_clip(cfg.clip)
        self.clip = ClipEncoder(cfg.clip, clip) if clip is not None else None
        self.schedule = MaskReplaceSchedule.from_config(cfg.diffusion, cfg.transformer.num_classes)

    def _apply(self, fn, recurse=True):  # keep the (non-module) schedule on the module's device
        out = super()._apply(fn, recurse)
        self.schedule = self.schedule.to(self.null_embedding.device)
        return out

    @property
    def generator(self) -> str:
        return self.cfg.generator

    @property
    def generator_part(self) -> str:
        """The checkpoint state key of the generator's weights: "transformer" or "ar"."""
        return "ar" if self.cfg.ar is not None else "transformer"

    @property
    def seq_len(self) -> int:
        return self.cfg.transformer.seq_len

    def null_condition(self) -> torch.Tensor:
        """The null condition sampling uses: [D]. The learned null embedding L2-normalised (as training feeds it),
        or raw when the config says so (`sampling.normalize_null = False`: converted official models, whose
        inference uses it raw)."""
        if not self.cfg.sampling.normalize_null:
            return self.null_embedding
        return F.normalize(self.null_embedding, dim=0)

    def require_clip(self) -> ClipEncoder:
        if self.clip is None:
            raise CheckpointError("this model has no CLIP loaded; pass the CLIP weights file "
                                  f"(--clip-weights) for {self.cfg.clip.model_name!r}")
        return self.clip

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        clip = self.require_clip()
        return clip.encode_text(clip.tokenize(prompts))

    def model_state(self, include_clip: bool | None = None) -> dict:
        """State dicts per part, the layout stored under a checkpoint's `state`."""
        if include_clip is None:
            include_clip = self.clip is not None and _num_params(self.clip) <= CLIP_INLINE_MAX_PARAMS
        return {
            "vqgan": self.vqgan.state_dict(),
            self.generator_part: getattr(self, self.generator_part).state_dict(),
            "null_embedding": self.null_embedding.detach().clone(),
            "clip": self.clip.model.state_dict() if include_clip and self.clip is not None else None,
        }

    def to_checkpoint(self, step: int = 0, stage: str = "init", meta: dict | None = None,
                      training: dict | None = None, include_clip: bool | None = None) -> Checkpoint:
        return Checkpoint(self.cfg, self.model_state(include_clip), step, stage, dict(meta or {}), training)

    def load_model_state(self, state: dict, source: str = "checkpoint", assign: bool = False) -> None:
        """Load per-part state dicts; assign=True adopts the given tensors (needed after materialize=False)."""
        gen = self.generator_part
        for part in ("vqgan", gen, "null_embedding"):
            if part not in state or state[part] is None:
                kind = "an autoregressive (CLIP-GEN)" if gen == "ar" else "a diffusion"
                raise CheckpointError(f"{source}: checkpoint has no {part!r} weights (its config describes {kind} "
                                      f"model)")
        try:
            self.vqgan.load_state_dict(state["vqgan"], assign=assign)
            getattr(self, gen).load_state_dict(state[gen], assign=assign)
        except RuntimeError as exc:
            raise CheckpointError(f"{source}: weights do not fit the checkpoint's config "
                                  f"({str(exc).splitlines()[0]})") from None
        with torch.no_grad():
            self.null_embedding.copy_(state["null_embedding"])
        if state.get("clip") is not None and self.clip is not None:
            load_clip_weights(self.clip.model, state["clip"], source)


def _num_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def load_model(path: str | os.PathLike | Checkpoint, clip_weights: str | os.PathLike | None = None,
               device: str | torch.device = "cpu") -> CLIPVQDiffusion:
    """A model in eval mode from a checkpoint path (or a loaded `Checkpoint`).

    CLIP weights come from the checkpoint when it carries them, else from `clip_weights` (a file the user
    passes). Without either, the model loads without a CLIP (enough for tokens -> images).
    """
    ckpt = path if isinstance(path, Checkpoint) else load_checkpoint(path)
    source = str(path) if not isinstance(path, Checkpoint) else "checkpoint"
    has_clip = ckpt.state.get("clip") is not None or clip_weights is not None
    model = CLIPVQDiffusion(ckpt.config, build_clip_model=has_clip, materialize=False)
    model.load_model_state(ckpt.state, source, assign=True)
    assert not any(t.is_meta for t in (*model.parameters(), *model.buffers())), "weights left unloaded"
    if clip_weights is not None:
        load_clip_weights(model.require_clip().model, clip_state_from_file(clip_weights), str(Path(clip_weights)))
    return model.eval().to(device)
