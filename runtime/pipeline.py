"""Prompt -> images: the Python API under `cvqd-run`.

    from cvqd.runtime.pipeline import Pipeline
    pipe = Pipeline.from_checkpoint("model.pt")
    images = pipe(["a small red circle on the left"], seed=0)       # list of PIL images

A `Pipeline` drives the reverse-diffusion loop against a `Backend`: four functions on torch tensors
(tokenize, encode_text, denoise, decode). The loop is written once; backends only differ in how they
run the networks.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image

from cvqd.config import ModelConfig
from cvqd.errors import CvqdError
from cvqd.runtime.sampling import Denoiser, reverse_diffusion
from cvqd.runtime.schedule import MaskReplaceSchedule
from cvqd.runtime.images import to_pil


@dataclass
class Backend:
    """What the loop needs from a backend, all on `device`."""

    name: str
    device: torch.device
    tokenize: Callable[[list[str]], torch.Tensor]  # prompts -> ids [B, ctx] int64
    encode_text: Callable[[torch.Tensor], torch.Tensor]  # ids -> normalised [B, D] float32
    denoise: Denoiser  # tokens [R, N], t [R], cond [R, D] -> log p(x_0) [R, K(+1), N]
    decode: Callable[[torch.Tensor], torch.Tensor]  # tokens [B, N] -> images [B, 3, H, W] in [-1, 1]
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Generated:
    image: Image.Image
    prompt: str
    seed: int
    index: int  # image index within its prompt
    params: dict[str, Any]


class Pipeline:
    def __init__(self, backend: Backend, config: ModelConfig, null: torch.Tensor, model_id: str = ""):
        self.backend = backend
        self.config = config
        self.null = null.to(backend.device, torch.float32)
        self.model_id = model_id
        self.schedule = MaskReplaceSchedule.from_config(config.diffusion, config.transformer.num_classes,
                                                        device=backend.device)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str | torch.device = "cpu",
                        clip_weights: str | os.PathLike | None = None) -> "Pipeline":
        """PyTorch backend straight from a `model.pt` (imports the training-side model code)."""
        from cvqd.training.model import load_model

        model = load_model(path, clip_weights=clip_weights, device=device)
        clip = model.require_clip()
        backend = Backend(name="torch", device=torch.device(device), tokenize=clip.tokenize,
                          encode_text=clip.encode_text, denoise=model.transformer, decode=model.vqgan.decode,
                          info={"checkpoint": str(path)})
        return cls(backend, model.cfg, model.null_condition().detach(), model_id=file_digest(path)[:12])

    # ------------------------------------------------------------------------------------------ API

    def resolve(self, steps: int | None, guidance: float | None, truncation: float | None) -> dict[str, Any]:
        """Sampling settings with the model's defaults filled in, validated."""
        s = self.config.sampling
        steps = s.steps if steps is None else steps
        guidance = s.guidance if guidance is None else guidance
        truncation = s.truncation if truncation is None else truncation
        T = self.schedule.num_steps
        if not isinstance(steps, int) or not 1 <= steps <= T:
            raise CvqdError(f"steps must be an integer in 1..{T} (this model's T), got {steps!r}")
        if not math.isfinite(guidance) or not 0 <= guidance <= 50:
            raise CvqdError(f"guidance must be a number in [0, 50] (1 = no guidance), got {guidance!r}")
        if not math.isfinite(truncation) or not 0 < truncation <= 1:
            raise CvqdError(f"truncation must be in (0, 1] (1 = keep every class), got {truncation!r}")
        return {"steps": steps, "guidance": float(guidance), "truncation": float(truncation)}

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        return self.backend.encode_text(self.backend.tokenize(prompts)).float()

    @torch.no_grad()
    def sample_tokens(self, cond: torch.Tensor, seeds: list[int], steps: int, guidance: float, truncation: float,
                      callback: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """x_0 tokens [B, N] for conditions [B, D]; row b draws its noise from its own generator seeded seeds[b]."""
        gens = [torch.Generator(device=self.backend.device).manual_seed(int(s)) for s in seeds]
        return reverse_diffusion(self.backend.denoise, self.schedule, cond, self.null,
                                 seq_len=self.config.transformer.seq_len, steps=steps, guidance=guidance,
                                 truncation=truncation, generator=gens, callback=callback)

    def generate(self, prompts: list[str], *, seed: int = 0, num_images: int = 1, steps: int | None = None,
                 guidance: float | None = None, truncation: float | None = None, batch_size: int = 8,
                 callback: Callable[[int, int], None] | None = None) -> list[Generated]:
        """Images for every prompt; image j of a prompt uses seed + j, whatever the batching."""
        prompts = validate_prompts(prompts)
        if num_images < 1 or batch_size < 1:
            raise CvqdError(f"num_images and batch_size must be >= 1, got {num_images} and {batch_size}")
        settings = self.resolve(steps, guidance, truncation)
        jobs = [(p, j) for p in prompts for j in range(num_images)]
        out: list[Generated] = []
        done_steps, total_steps = 0, settings["steps"] * math.ceil(len(jobs) / batch_size)
        for start in range(0, len(jobs), batch_size):
            batch = jobs[start:start + batch_size]
            cond = self.encode_prompts([p for p, _ in batch])
            step_cb = None
            if callback is not None:
                base = done_steps
                step_cb = lambda i, n, base=base: callback(base + i, total_steps)  # noqa: E731
            tokens = self.sample_tokens(cond, [seed + j for _, j in batch], callback=step_cb, **settings)
            done_steps += settings["steps"]
            images = to_pil(self.backend.decode(tokens))
            for (p, j), im in zip(batch, images):
                params = {"prompt": p, "seed": seed + j, **settings, "model": self.model_id,
                          "backend": self.backend.name, "preset": self.config.preset}
                out.append(Generated(im, p, seed + j, j, params))
        return out

    def __call__(self, prompts: str | list[str], **kwargs) -> list[Image.Image]:
        return [g.image for g in self.generate([prompts] if isinstance(prompts, str) else prompts, **kwargs)]


def validate_prompts(prompts: list[str]) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts:
        raise CvqdError("no prompt given; pass at least one non-empty prompt")
    for p in prompts:
        if not isinstance(p, str) or not p.strip():
            raise CvqdError(f"empty prompt {p!r}; every prompt must contain some text")
    return [p.strip() for p in prompts]


def file_digest(path: str | os.PathLike, algo: str = "sha256") -> str:
    h = hashlib.new(algo)
    with open(Path(path), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
