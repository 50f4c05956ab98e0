"""`cvqd-train ar`: the CLIP-GEN generator, trained language-free on the same data, VQGAN and CLIP.

Per step (docs/algorithm.md#autoregressive-generator-clip-gen):
    x   = VQGAN.encode(image)                frozen; the same on-disk token cache as the diffusion stages
    f   = CLIP.encode_image(image)           frozen; cached likewise
    c   = normalise(f + alpha * eps/|eps|)   the pseudo text embedding (the diffusion stages' alpha)
    c   = the learned null embedding (normalised) with probability null_prob: classifier-free guidance
    loss = cross-entropy of every token given the tokens before it in raster order and c (teacher forcing)
AdamW with warm-up and cosine decay, gradient clipping, EMA of the weights (the checkpoint's `state` holds the EMA
weights). Resume, torchrun, run folders, logs and sample grids are those of the other stages (training/common.py).

The starting checkpoint (--init) brings the trained VQGAN and CLIP (a `cvqd-train diffusion`/`cfg` run or a
finalized diffusion model: the generator is then trained on exactly its tokenizer and CLIP, so the two can be
compared); its CLIP must be a trained one, as for the diffusion stages. The new checkpoint is an autoregressive
model: `ModelConfig.ar` set, the generator's weights under state["ar"].
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cvqd.errors import ConfigError, CvqdError
from cvqd.model.ar import ARTransformer
from cvqd.model.ar_loop import ARLoop
from cvqd.model.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from cvqd.model.clip import embedding_noise_factor, pseudo_text_embedding
from cvqd.model.clipvqd import CLIPVQDiffusion, load_model
from cvqd.model.config import LR_SCHEDULES, ARConfig
from cvqd.threads import set_torch_threads
from cvqd.training import common
from cvqd.training.data import ImageSet, skipped_warning

STAGE = "ar"
ARCH = ("width", "depth", "heads", "mlp_hidden", "prefix")  # ARConfig sizes a start may set


@dataclass
class ARTrainConfig:
    steps: int = 100_000
    batch_size: int = 32  # per process
    lr: float = 4.5e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    warmup: int = 1000
    schedule: str = "cosine"
    final_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    noise_alpha: float | None = None  # default: the --init model config's clip.noise_alpha
    noise_shaped: float = 0.0  # as DiffusionTrainConfig.noise_shaped
    null_prob: float | None = None  # default: the --init model config's clip.null_prob
    # Sizes of the new transformer (None: the --init diffusion transformer's width, depth, heads and MLP width;
    # one condition position).
    width: int | None = None
    depth: int | None = None
    heads: int | None = None
    mlp_hidden: int | None = None
    prefix: int | None = None
    seed: int = 0
    ckpt_every: int = 2000
    log_every: int = 50
    sample_every: int = 2000
    sample_prompts: tuple[str, ...] = ()
    resize: str = "squeeze"
    cache_dir: str | None = None
    feature_batch: int = 64
    stop_after: int | None = None
    threads: int | None = None
    quiet: bool = False

    def __post_init__(self) -> None:
        if self.schedule not in LR_SCHEDULES:
            raise CvqdError(f"ar training: schedule must be one of {list(LR_SCHEDULES)}, got {self.schedule!r}")
        if not 0.0 < self.final_lr_ratio <= 1.0:
            raise CvqdError(f"ar training: final_lr_ratio must be in (0, 1], got {self.final_lr_ratio}")
        for name in ARCH:
            v = getattr(self, name)
            if v is not None and v < 1:
                raise CvqdError(f"ar training: {name} must be >= 1, got {v}")
        if self.null_prob is not None and not 0 <= self.null_prob < 1:
            raise CvqdError(f"ar training: null_prob must be in [0, 1), got {self.null_prob}")


class ARWithNull(nn.Module):
    """What the stage trains, as one module for DDP and EMA: the AR transformer and the null embedding.
    forward(tokens [B, N], cond [B, D], drop [B] bool) -> logits [B, N, K]; rows with drop get the normalised null."""

    def __init__(self, ar: ARTransformer, null: nn.Parameter):
        super().__init__()
        self.ar = ar
        self.null = null

    def forward(self, tokens: torch.Tensor, cond: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
        null = F.normalize(self.null, dim=0).to(cond.dtype)
        cond = torch.where(drop[:, None], null.expand_as(cond), cond)
        return self.ar.logits(tokens, cond)


def train_ar(data, out, *, init, cfg: ARTrainConfig | None = None, resume: bool = False, clip_from=None,
             clip_model: str | None = None, clip_weights=None, allow_random_clip: bool = False,
             device: str | None = None, run_info: dict[str, Any] | None = None) -> Path:
    """Train the autoregressive generator on `data` into the run folder `out`; -> the checkpoint path.

    `clip_model` + `clip_weights`: the CLIP from a weights file, for an `--init` that does not carry its CLIP (CLIPs
    over 50M parameters, such as ViT-B/32, stay outside checkpoints); needed again on resume."""
    cfg = cfg or ARTrainConfig()
    return common.run_distributed(device, _train, Path(data), Path(out), init, cfg, resume, clip_from,
                                  allow_random_clip, run_info or {}, clip_model, clip_weights)


def ar_config_for(base, cfg: ARTrainConfig) -> ARConfig:
    """The ARConfig of a new generator on `base`'s VQGAN and CLIP, sizes from `cfg` or the base transformer's."""
    t = base.transformer
    sizes = {"width": t.width, "depth": t.depth, "heads": t.heads, "mlp_hidden": t.mlp_hidden, "prefix": 1}
    sizes.update({k: getattr(cfg, k) for k in ARCH if getattr(cfg, k) is not None})
    return ARConfig(num_classes=base.vqgan.n_embed, grid=tuple(base.vqgan.token_grid), cond_dim=base.clip.embed_dim,
                    **sizes)


def _build_model(init, cfg: ARTrainConfig, clip_from, allow_random_clip, clip_model=None,
                 clip_weights=None) -> CLIPVQDiffusion:
    """The VQGAN and CLIP of `init` (or the CLIP of `clip_from`), a fresh seeded AR transformer and null embedding."""
    from cvqd.training.train_diffusion import DiffusionTrainConfig, _build_model as build_base

    ckpt = load_checkpoint(init)
    stage = ckpt.stage
    if ckpt.config.ar is not None:
        raise CvqdError(f"{init} is already an autoregressive model; continue its run with --out RUN --resume, or "
                        f"start from the diffusion checkpoint whose VQGAN and CLIP it should use")
    del ckpt
    base = build_base(init, "diffusion", DiffusionTrainConfig(noise_alpha=cfg.noise_alpha, null_prob=cfg.null_prob),
                      clip_model, clip_weights, clip_from, allow_random_clip)
    mcfg = base.cfg
    try:
        arcfg = ar_config_for(mcfg, cfg)
    except ConfigError as exc:  # sizes that do not fit (width not divisible by heads, ...)
        raise CvqdError(f"ar training: {exc}") from None
    # the base model's guidance range was measured for its diffusion generator: not carried over
    mcfg = mcfg.replace(preset=f"{mcfg.preset}-ar", ar=arcfg,
                        sampling=mcfg.sampling.replace(guidance_range=(), best_of=1))
    model = CLIPVQDiffusion(mcfg, clip=base.clip.model, materialize=False)  # generator and VQGAN: set below
    model.vqgan = base.vqgan
    torch.manual_seed(cfg.seed)
    model.ar = ARTransformer(arcfg)
    with torch.no_grad():
        model.null_embedding.copy_(F.normalize(torch.randn(mcfg.clip.embed_dim), dim=0))
    model.meta = {k: v for k, v in base.meta.items() if not k.endswith("_training") or k in (
        "clip_training", "vqgan_training")}
    model.meta["ar_base"] = {"init": str(init), "stage": stage, "preset": base.cfg.preset}
    return model


def _train(data, out, init, cfg, resume, clip_from, allow_random_clip, run_info, clip_model, clip_weights,
           env) -> Path:
    from cvqd.training.train_diffusion import _features

    set_torch_threads(cfg.threads)
    run = common.RunDir(out, env)
    run.check(resume)
    if resume:
        ckpt = load_checkpoint(run.ckpt)
        tr = ckpt.training or {}
        if ckpt.stage != STAGE or "model" not in tr:
            raise CvqdError(f"{run.ckpt} is a {ckpt.stage!r} checkpoint without ar training state; cannot resume")
        model = load_model(ckpt, clip_weights=clip_weights)
        if model.clip is None:
            raise CvqdError(f"{run.ckpt} carries no CLIP; pass --clip-weights FILE (the CLIP this run started with)")
        model.meta = dict(ckpt.meta)
    else:
        if init is None:
            raise CvqdError("give --init CHECKPOINT (a checkpoint with a trained VQGAN and CLIP)")
        model = _build_model(init, cfg, clip_from, allow_random_clip, clip_model, clip_weights)
    model = model.to(env.device)
    mcfg = model.cfg
    alpha = mcfg.clip.noise_alpha if cfg.noise_alpha is None else cfg.noise_alpha
    null_prob = mcfg.clip.null_prob if cfg.null_prob is None else cfg.null_prob
    images = ImageSet.scan(data, mcfg.vqgan.resolution, cfg.resize)
    common.check_batch(len(images), cfg.batch_size, env)
    tokens, embeds = _features(model, images, cfg, env)
    shaped = (cfg.noise_shaped, embedding_noise_factor(embeds)) if cfg.noise_shaped > 0 else None

    net = ARWithNull(model.ar, model.null_embedding).train()
    params, opt = common.adamw(net, cfg.lr, cfg.weight_decay, cfg.betas)
    ema = common.EMA(net, cfg.ema_decay)
    gen = common.make_generator(cfg.seed, env)
    common.seed_training_streams(cfg.seed, env)
    step = 0
    if resume:
        net.load_state_dict(tr["model"])
        ema.load_state_dict(tr["ema"])
        opt.load_state_dict(tr["optimizer"])
        step = int(ckpt.step)
        common.restore_rng(tr.get("rng"), gen, env)
    ddp = common.wrap_ddp(net, env)
    K = mcfg.ar.num_classes
    plan = common.BatchPlan(len(tokens), cfg.batch_size, env, cfg.seed)
    batches = plan.batches_from(step)
    run.create(resume, STAGE, {"config": dataclasses.asdict(cfg), "data": common.path_str(data),
                               "init": common.path_str(init), "clip_from": common.path_str(clip_from),
                               "clip_model": clip_model, "clip_weights": common.path_str(clip_weights),
                               "allow_random_clip": allow_random_clip, **run_info})
    if resume:
        run.trim_log(step)
    common.warn(env, skipped_warning(f"cvqd-train {STAGE}", data, {"unreadable": images.skipped}))
    bar = common.Progress(cfg.steps, step, STAGE, env, cfg.quiet)
    t0, seen = time.perf_counter(), 0
    stop_at = min(cfg.steps, step + cfg.stop_after) if cfg.stop_after else cfg.steps
    while step < stop_at:
        idx = torch.tensor(next(batches))
        x, f = tokens[idx].to(env.device), embeds[idx]
        B = len(idx)
        cond = pseudo_text_embedding(f, alpha, gen, shaped).to(env.device)
        drop = (torch.rand(B, generator=gen) < null_prob).to(env.device)
        for g in opt.param_groups:
            g["lr"] = common.lr_at(step, cfg.lr, cfg.warmup, cfg.steps, cfg.schedule, cfg.final_lr_ratio)
        logits = ddp(x, cond, drop)  # [B, N, K]
        loss = F.cross_entropy(logits.reshape(-1, K).float(), x.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        ema.update(net)
        step += 1
        seen += B * env.world
        bits = float(loss.detach()) / 0.6931471805599453
        bar.update(loss=float(loss.detach()), bits=bits)
        if step % cfg.log_every == 0 or step == cfg.steps:
            mean = float(env.all_mean(loss.detach()))
            run.log({"step": step, "loss": mean, "bits_per_token": mean / 0.6931471805599453,
                     "grad_norm": float(gnorm), "lr": opt.param_groups[0]["lr"],
                     "samples_per_s": seen / (time.perf_counter() - t0)})
        if env.is_main and cfg.sample_every and (step % cfg.sample_every == 0 or step == cfg.steps):
            _sample_grid(model, net, ema, embeds[:4], cfg, run.sample_path(step), env)
        if step % cfg.ckpt_every == 0 or step == stop_at:
            _save(run, model, net, ema, opt, gen, env, step, cfg, len(tokens), images, alpha, null_prob)
    bar.close()
    return run.ckpt


def _ema_state(model: CLIPVQDiffusion, net: ARWithNull, ema: common.EMA) -> dict[str, Any]:
    weights = ema.weights_for(net)
    state = model.model_state()
    state["ar"] = {k.removeprefix("ar."): v for k, v in weights.items() if k.startswith("ar.")}
    state["null_embedding"] = weights["null"].clone()
    return state


@torch.no_grad()
def _sample_grid(model, net, ema, image_embeds, cfg, path: Path, env) -> None:
    """One image per condition (the sample prompts, then the first training images' embeddings), EMA weights, seed 0,
    sampled through the runtime's token loop at the model's default settings (cvqd.model.ar_loop.ARLoop)."""
    from cvqd.images import grid, save_png, to_pil

    state = _ema_state(model, net, ema)
    ar = copy.deepcopy(model.ar)
    ar.load_state_dict(state["ar"])
    null = F.normalize(state["null_embedding"].to(env.device), dim=0)
    with common.eval_mode(ar, model.vqgan):
        conds = [image_embeds.to(env.device)]
        prompts = list(cfg.sample_prompts) if cfg.sample_prompts and model.clip is not None else []
        if prompts:
            conds.insert(0, model.encode_prompts(prompts).to(env.device))
        cond = torch.cat(conds)
        s = model.cfg.sampling
        settings = {"guidance": s.guidance, "temperature": s.temperature, "top_k": s.top_k, "top_p": s.top_p}
        loop = ARLoop(ar.prefill, lambda t, p, c: ar.decode(t, p, c, inplace=True), model.cfg.ar.num_classes,
                      model.seq_len, env.device)
        tok = loop.run(cond, null, [0] * len(cond), **settings)
        save_png(path, grid(to_pil(model.vqgan.decode(tok)), cols=len(cond)),
                 {**settings, "seed": 0, "prompts": prompts, "stage": STAGE})


def _save(run, model, net, ema, opt, gen, env, step, cfg, n_items, images, alpha, null_prob) -> None:
    rng = common.rng_state(gen, env)  # collective
    if not env.is_main:
        return
    meta = {**getattr(model, "meta", {}), "ar_training": {
        "steps": step, "config": dataclasses.asdict(cfg), "images": n_items, "skipped_files": len(images.skipped),
        "noise_alpha": alpha, "null_prob": null_prob}}
    training = {"model": net.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(), "rng": rng,
                "config": dataclasses.asdict(cfg)}
    save_checkpoint(run.ckpt, Checkpoint(model.cfg, _ema_state(model, net, ema), step, STAGE, meta, training))
