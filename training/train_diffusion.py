"""`cvqd-train diffusion` and `cvqd-train cfg`: language-free training of the discrete diffusion transformer.

Base stage ("diffusion"), per step (docs/algorithm.md#training-losses and #pseudo-text-embedding):
    x_0 = VQGAN.encode(image)                 frozen; tokens cached on disk once per (file, VQGAN weights)
    f   = CLIP.encode_image(image)            frozen; cached once per (file, CLIP weights)
    c   = normalise(f + alpha * eps/|eps|)    the pseudo text embedding, fresh noise every step
    t ~ importance sampler, x_t ~ q(x_t | x_0)
    loss = VQ-Diffusion loss (KL to the true posterior, NLL at t = 0, auxiliary loss) / p(t)
AdamW with warm-up and cosine decay, gradient clipping, EMA of the weights. The checkpoint's `state` holds the
EMA weights (what inference uses); the raw weights, optimizer, EMA, importance sampler and RNG states are the
resume state.

CFG stage ("cfg"): continues from a base checkpoint's (EMA) weights and replaces the condition by the learned
null embedding with probability p (ClipConfig.null_prob, 0.1 by default). The null embedding is L2-normalised
here exactly as at inference (`CLIPVQDiffusion.null_condition`); the reference implementation normalises it in
training but feeds it raw at inference, a mismatch this project does not copy.

The generator never sees a caption: conditions come from images only.

The CLIP must be a trained one: a random CLIP's image embeddings say nothing a prompt's text embedding could
match. Where it comes from: --clip-from (another cvqd checkpoint, e.g. a `cvqd-train clip` run), --clip-model +
--clip-weights (a pretrained weights file), else the CLIP inside --init. A CLIP whose checkpoint records no
origin (CLIP_PROVENANCE) came from `cvqd-train init` or a `--preset` start and is random: training on it is
refused unless `allow_random_clip` (--allow-random-clip) asks for it.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cvqd.paths import cache_root
from cvqd.model.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from cvqd.model.config import LR_SCHEDULES
from cvqd.errors import CvqdError
from cvqd.model.loop import ReverseLoop
from cvqd.threads import set_torch_threads, torch_threads
from cvqd.training import common
from cvqd.model.clip import embedding_noise_factor, pseudo_text_embedding
from cvqd.training.data import FeatureCache, ImageSet, compute_features, skipped_warning, state_digest, to_float
from cvqd.training.losses import ImportanceSampler, diffusion_loss
from cvqd.model.clipvqd import CLIPVQDiffusion, load_model
from cvqd.model.transformer import DiffusionTransformer

STAGES = ("diffusion", "cfg")

# What marks a checkpoint's CLIP as trained: its meta says where the CLIP came from. `cvqd-train clip` writes
# `clip_training`; a CLIP loaded from a weights file (--clip-weights) is recorded as `clip_source`; --clip-from
# copies the donor's record. A CLIP from `cvqd-train init` or from a `--preset` start has neither: it is random.
CLIP_PROVENANCE = ("clip_training", "clip_source")


@dataclass
class DiffusionTrainConfig:
    steps: int = 100_000
    batch_size: int = 32  # per process
    lr: float = 4.5e-4
    weight_decay: float = 0.045
    betas: tuple[float, float] = (0.9, 0.96)
    warmup: int = 1000
    schedule: str = "cosine"  # or "constant" after warm-up (cvqd.model.config.LR_SCHEDULES)
    final_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    noise_alpha: float | None = None  # default: the model config's clip.noise_alpha
    # Share of the pseudo text noise drawn along the image embeddings' own distribution (0: isotropic, the
    # paper's recipe); see clip.embedding_noise_factor.
    noise_shaped: float = 0.0
    null_prob: float | None = None  # cfg stage; default: the model config's clip.null_prob
    # Weight of the auxiliary x_0 loss (DiffusionConfig.aux_weight; None keeps the model config's, the paper's 5e-4).
    # The variational term weights a masked token's cross-entropy by ~1/t, so the high-t steps where the layout is
    # decided get little gradient; a larger weight on the auxiliary cross-entropy makes them count
    # (docs/algorithm.md#training-losses). Stored in the
    # checkpoint's config (the CFG stage keeps its base stage's value unless given).
    aux_weight: float | None = None
    # Transformer blocks of the fresh base-stage transformer (None: the model config's). Stored in the checkpoint's
    # config, so the CFG stage, export and the runtime build the same depth. Fewer blocks: proportionally cheaper
    # steps, at some cost in accuracy (docs/experiments.md).
    depth: int | None = None
    seed: int = 0
    ckpt_every: int = 2000
    log_every: int = 50
    sample_every: int = 2000
    sample_steps: int = 25
    sample_prompts: tuple[str, ...] = ()
    resize: str = "squeeze"
    cache_dir: str | None = None  # default: $CVQD_CACHE/features or ~/.cache/cvqd/features
    feature_batch: int = 64
    stop_after: int | None = None  # leave after this many steps of this invocation (checkpointed)
    threads: int | None = None
    quiet: bool = False

    def __post_init__(self) -> None:
        if self.schedule not in LR_SCHEDULES:
            raise CvqdError(f"diffusion training: schedule must be one of {list(LR_SCHEDULES)}, got {self.schedule!r}")
        if not 0.0 < self.final_lr_ratio <= 1.0:
            raise CvqdError(f"diffusion training: final_lr_ratio must be in (0, 1], got {self.final_lr_ratio}")
        if self.depth is not None and self.depth < 1:
            raise CvqdError(f"diffusion training: depth must be >= 1 transformer block, got {self.depth}")


def default_cache_dir() -> Path:
    return cache_root() / "features"


class TransformerWithNull(nn.Module):
    """What a diffusion stage trains, as one module for DDP and EMA: the transformer, plus the null embedding in the
    CFG stage. forward(x_t [B, N], t [B], cond [B, D], drop [B] bool | None) -> log p(x_0) [B, K+1, N] (the
    transformer's forward); rows with drop=True get the normalised null embedding as their condition."""

    def __init__(self, transformer: DiffusionTransformer, null: nn.Parameter | None):
        super().__init__()
        self.transformer = transformer
        self.null = null  # registered as a parameter when given

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, drop: torch.Tensor | None = None):
        if drop is not None:  # [B] bool: these rows get the (normalised) null condition
            null = F.normalize(self.null, dim=0).to(cond.dtype)
            cond = torch.where(drop[:, None], null.expand_as(cond), cond)
        return self.transformer(x_t, t, cond)


def train_diffusion(data: str | os.PathLike, out: str | os.PathLike, *, init: str | os.PathLike, stage: str = "diffusion",
                    cfg: DiffusionTrainConfig | None = None, resume: bool = False, clip_model: str | None = None,
                    clip_weights: str | os.PathLike | None = None, clip_from: str | os.PathLike | None = None,
                    allow_random_clip: bool = False, device: str | None = None,
                    run_info: dict[str, Any] | None = None) -> Path:
    """Train the diffusion transformer (stage "diffusion") or fine-tune it for guidance (stage "cfg").

    allow_random_clip: condition on a CLIP that was never trained (see the module docstring) instead of refusing.
    """
    if stage not in STAGES:
        raise CvqdError(f"unknown stage {stage!r}; expected one of {list(STAGES)}")
    cfg = cfg or DiffusionTrainConfig()
    return common.run_distributed(device, _train, Path(data), Path(out), init, stage, cfg, resume, clip_model,
                                  clip_weights, clip_from, allow_random_clip, run_info or {})


def clip_is_trained(meta: dict[str, Any]) -> bool:
    """Whether a checkpoint's meta says where its CLIP came from (see CLIP_PROVENANCE)."""
    return any(k in meta for k in CLIP_PROVENANCE)


def _build_model(init, stage: str, cfg: DiffusionTrainConfig, clip_model, clip_weights,
                 clip_from=None, allow_random_clip: bool = False) -> CLIPVQDiffusion:
    """The starting model: the VQGAN from `init`; the CLIP from `init`, from another cvqd checkpoint
    (`clip_from`) or from a user weights file (`clip_model` + `clip_weights`); a fresh transformer for the
    base stage, the base model's EMA weights for the CFG stage.

    A CLIP whose origin no checkpoint records (CLIP_PROVENANCE) is a random one; it is refused unless
    `allow_random_clip`, and then recorded as `meta["clip_random"]`."""
    ckpt = load_checkpoint(init)
    meta = dict(ckpt.meta)
    if "vqgan_training" not in meta:
        raise CvqdError(f"{init}: its VQGAN was never trained (stage {ckpt.stage!r}); run `cvqd-train vqgan` first "
                        f"and pass that checkpoint as --init")
    if stage == "cfg" and ckpt.stage not in ("diffusion", "cfg"):
        raise CvqdError(f"{init} is a {ckpt.stage!r} checkpoint; the CFG fine-tune continues from a base "
                        f"`cvqd-train diffusion` checkpoint")
    if stage == "cfg" and (clip_model is not None or clip_from is not None):
        raise CvqdError("a CLIP source belongs to the base stage; the CFG stage keeps the base model's CLIP")
    if stage == "cfg" and clip_weights is not None and ckpt.state.get("clip") is not None:
        raise CvqdError(f"{init} carries its CLIP, which the CFG stage keeps; --clip-weights is only for "
                        "checkpoints that do not carry theirs")
    if clip_weights is not None and clip_from is not None:
        raise CvqdError("give --clip-from or --clip-weights, not both")
    if clip_model is not None and clip_weights is None:
        raise CvqdError("--clip-model needs --clip-weights (the weights file of that CLIP); nothing is downloaded")
    from cvqd.model.clip import (build_clip, clip_image_size, clip_state_from_file, load_clip_weights,
                                 open_clip_embed_dim)

    config = ckpt.config
    if stage == "diffusion" and (clip_weights is not None or clip_from is not None):
        meta = {k: v for k, v in meta.items() if k not in (*CLIP_PROVENANCE, "clip_random")}  # the CLIP is replaced
        if clip_weights is not None:
            name = clip_model or config.clip.model_name
            ccfg = config.clip.replace(model_name=name, model_cfg=None, tokenizer=name,
                                       embed_dim=open_clip_embed_dim(name))
            clip = build_clip(ccfg)
            load_clip_weights(clip, clip_state_from_file(clip_weights), str(clip_weights))
            ccfg = ccfg.replace(image_size=clip_image_size(clip, ccfg.image_size),
                                context_length=int(getattr(clip, "context_length", ccfg.context_length)))
            meta["clip_source"] = {"model": name, "weights": str(clip_weights)}
        else:
            src = load_checkpoint(clip_from)
            if src.state.get("clip") is None:
                raise CvqdError(f"--clip-from {clip_from} carries no CLIP weights")
            if not clip_is_trained(src.meta) and not allow_random_clip:
                raise CvqdError(f"--clip-from {clip_from}: its CLIP was never trained (no `cvqd-train clip` run or "
                                "CLIP weights file recorded in its meta); pass a `cvqd-train clip` checkpoint, or "
                                "--allow-random-clip to condition on it anyway")
            ccfg = src.config.clip
            clip = build_clip(ccfg)
            load_clip_weights(clip, src.state["clip"], str(clip_from))
            meta.update({k: v for k, v in src.meta.items() if k in CLIP_PROVENANCE})
        config = config.replace(clip=ccfg, transformer=config.transformer.replace(cond_dim=ccfg.embed_dim))
        model = CLIPVQDiffusion(config, clip=clip)
        model.vqgan.load_state_dict(ckpt.state["vqgan"])
    else:
        model = load_model(ckpt, clip_weights=clip_weights)  # clip_weights: the CFG stage, for a CLIP kept outside
        if model.clip is None:
            raise CvqdError(f"{init} carries no CLIP; pass --clip-weights FILE (the CLIP it was trained with)"
                            if stage == "cfg" else
                            f"{init} carries no CLIP; pass --clip-from CHECKPOINT or --clip-model NAME "
                            f"--clip-weights FILE")
    if not clip_is_trained(meta):
        if not allow_random_clip:
            raise CvqdError(
                f"{init}: its CLIP was never trained (randomly initialised: the checkpoint records no `cvqd-train "
                "clip` run or CLIP weights file), so its embeddings carry no meaning for prompts; "
                + ("pass --allow-random-clip to fine-tune on it anyway" if stage == "cfg" else
                   "pass --clip-from CHECKPOINT (a `cvqd-train clip` run) or --clip-model NAME --clip-weights FILE, "
                   "or --allow-random-clip to train on it anyway"))
        meta["clip_random"] = True  # asked for: recorded, so later stages and readers of the checkpoint see it
    if cfg.noise_alpha is not None or cfg.null_prob is not None:
        ccfg = model.cfg.clip.replace(
            noise_alpha=model.cfg.clip.noise_alpha if cfg.noise_alpha is None else cfg.noise_alpha,
            null_prob=model.cfg.clip.null_prob if cfg.null_prob is None else cfg.null_prob)
        model.cfg = model.cfg.replace(clip=ccfg)
        model.clip.cfg = ccfg
    if stage == "cfg" and cfg.depth is not None and cfg.depth != model.cfg.transformer.depth:
        raise CvqdError(f"--depth belongs to the base stage: {init} has a {model.cfg.transformer.depth}-block "
                        f"transformer, and the CFG stage continues it")
    if stage == "diffusion":  # a fresh transformer and null embedding, seeded
        if cfg.depth is not None:
            model.cfg = model.cfg.replace(transformer=model.cfg.transformer.replace(depth=cfg.depth))
        torch.manual_seed(cfg.seed)
        model.transformer = DiffusionTransformer(model.cfg.transformer)
        with torch.no_grad():
            model.null_embedding.copy_(F.normalize(torch.randn(model.cfg.clip.embed_dim), dim=0))
    model.meta = meta  # carried forward into this stage's checkpoints
    return model


def _features(model: CLIPVQDiffusion, images: ImageSet, cfg: DiffusionTrainConfig, env) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [M, N] int64, image embeddings [M, D] float32) of the readable images, via the on-disk cache."""
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    tag = f"{images.size}|{images.resize}"
    vq = model.vqgan.eval()
    clip = model.require_clip().eval()
    caches = {"tokens": FeatureCache(cache_dir, "vqgan-tokens", state_digest(vq, tag)),
              "clip": FeatureCache(cache_dir, "clip-image", state_digest(clip.model, tag + _clip_tag(model.cfg.clip)))}

    @torch.no_grad()
    def enc_tokens(u8):
        return vq.encode(to_float(u8).to(env.device)).to(torch.int16)  # K <= 32767

    @torch.no_grad()
    def enc_clip(u8):
        return clip.encode_image(to_float(u8).to(env.device)).float()

    encoders = {"tokens": enc_tokens, "clip": enc_clip}
    if env.is_main:  # the other ranks of this machine wait at the barrier: their cores work here (CPU)
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if env.device.type == "cpu" else 1
        with torch_threads(min(torch.get_num_threads() * local, os.cpu_count() or 1)):
            kept, feats = compute_features(images, caches, encoders, cfg.feature_batch, write=True,
                                           progress=not cfg.quiet)
    env.barrier()
    if not env.is_main:  # the cache is complete now: read it, no recomputation
        kept, feats = compute_features(images, caches, encoders, cfg.feature_batch, write=False)
    return feats["tokens"].long(), feats["clip"].float()


def _clip_tag(c) -> str:
    """What decides a CLIP image embedding besides the weights (not the language-free terms alpha, p)."""
    return f"{c.model_name}|{c.model_cfg}|{c.image_size}|{tuple(c.image_mean)}|{tuple(c.image_std)}"


def _train(data, out, init, stage, cfg, resume, clip_model, clip_weights, clip_from, allow_random_clip, run_info,
           env) -> Path:
    set_torch_threads(cfg.threads)
    run = common.RunDir(out, env)
    run.check(resume)  # the folder is created below, once the model and the data checked out
    if resume:
        ckpt = load_checkpoint(run.ckpt)
        tr = ckpt.training or {}
        if ckpt.stage != stage or "model" not in tr:
            raise CvqdError(f"{run.ckpt} is a {ckpt.stage!r} checkpoint without {stage} training state; cannot resume")
        model = load_model(ckpt, clip_weights=clip_weights)
        model.meta = dict(ckpt.meta)
    else:
        model = _build_model(init, stage, cfg, clip_model, clip_weights, clip_from, allow_random_clip)
    if cfg.aux_weight is not None:  # into the config the checkpoints carry (a resume keeps the recorded value)
        model.cfg = model.cfg.replace(diffusion=model.cfg.diffusion.replace(aux_weight=cfg.aux_weight))
    model = model.to(env.device)
    mcfg = model.cfg
    alpha, null_prob = mcfg.clip.noise_alpha, mcfg.clip.null_prob
    images = ImageSet.scan(data, mcfg.vqgan.resolution, cfg.resize)
    common.check_batch(len(images), cfg.batch_size, env)  # before the features are computed (all files readable)
    tokens, embeds = _features(model, images, cfg, env)
    shaped = (cfg.noise_shaped, embedding_noise_factor(embeds)) if cfg.noise_shaped > 0 else None

    net = TransformerWithNull(model.transformer, model.null_embedding if stage == "cfg" else None).train()
    params, opt = common.adamw(net, cfg.lr, cfg.weight_decay, cfg.betas)
    ema = common.EMA(net, cfg.ema_decay)
    sampler = ImportanceSampler(mcfg.diffusion.num_steps, mcfg.diffusion.importance_sampling)
    gen = common.make_generator(cfg.seed, env)
    common.seed_training_streams(cfg.seed, env)
    step = 0
    if resume:
        net.load_state_dict(tr["model"])
        ema.load_state_dict(tr["ema"])
        opt.load_state_dict(tr["optimizer"])
        sampler.load_state_dict(tr["importance_sampler"])
        step = int(ckpt.step)
        common.restore_rng(tr.get("rng"), gen, env)
    ddp = common.wrap_ddp(net, env)
    schedule = model.schedule
    K = mcfg.transformer.num_classes
    plan = common.BatchPlan(len(tokens), cfg.batch_size, env, cfg.seed)
    batches = plan.batches_from(step)
    run.create(resume, stage, {"config": dataclasses.asdict(cfg), "data": common.path_str(data),
                               "init": common.path_str(init), "clip_model": clip_model,
                               "clip_weights": common.path_str(clip_weights), "clip_from": common.path_str(clip_from),
                               "allow_random_clip": allow_random_clip, **run_info})
    if resume:
        run.trim_log(step)
    common.warn(env, skipped_warning(f"cvqd-train {stage}", data, {"unreadable": images.skipped}))
    bar = common.Progress(cfg.steps, step, stage, env, cfg.quiet)
    t0, seen = time.perf_counter(), 0
    stop_at = min(cfg.steps, step + cfg.stop_after) if cfg.stop_after else cfg.steps
    while step < stop_at:
        idx = torch.tensor(next(batches))
        x0, f = tokens[idx].to(env.device), embeds[idx].to(env.device)
        B = len(idx)
        cond = pseudo_text_embedding(f.cpu(), alpha, gen, shaped).to(env.device)
        drop = (torch.rand(B, generator=gen) < null_prob).to(env.device) if stage == "cfg" else None
        t, pt = sampler.sample(B, gen)
        x_t = schedule.q_sample(x0.cpu(), t, gen).to(env.device)
        t, pt = t.to(env.device), pt.to(env.device)
        for g in opt.param_groups:
            g["lr"] = common.lr_at(step, cfg.lr, cfg.warmup, cfg.steps, cfg.schedule, cfg.final_lr_ratio)
        log_x0 = ddp(x_t, t, cond, drop)[:, :K]  # [B, K, N]: drop the [MASK] row
        loss, parts = diffusion_loss(log_x0, x0, x_t, t, pt, schedule, mcfg.diffusion)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        ema.update(net)
        sampler.update(env.all_gather(t).cpu(), env.all_gather(parts["vb"]).cpu())  # identical on every rank
        step += 1
        seen += B * env.world
        bar.update(loss=float(loss.detach()), vb=float(parts["vb_bits"]))
        if step % cfg.log_every == 0 or step == cfg.steps:
            run.log({"step": step, "loss": float(env.all_mean(loss.detach())),
                     "vb_bits": float(env.all_mean(parts["vb_bits"])), "aux_bits": float(env.all_mean(parts["aux_bits"])),
                     "grad_norm": float(gnorm), "lr": opt.param_groups[0]["lr"], "importance_ready": sampler.ready(),
                     "samples_per_s": seen / (time.perf_counter() - t0)})
        if env.is_main and cfg.sample_every and (step % cfg.sample_every == 0 or step == cfg.steps):
            _sample_grid(model, net, ema, embeds[:4], cfg, stage, run.sample_path(step), env)
        if step % cfg.ckpt_every == 0 or step == stop_at:
            _save(run, model, net, ema, opt, sampler, gen, env, step, stage, cfg, len(tokens), images)
    bar.close()
    return run.ckpt


def _ema_state(model: CLIPVQDiffusion, net: TransformerWithNull, ema: common.EMA) -> dict[str, Any]:
    """The checkpoint's model state with the EMA transformer (and, in the CFG stage, the EMA null embedding)."""
    weights = ema.weights_for(net)
    state = model.model_state()
    state["transformer"] = {k.removeprefix("transformer."): v for k, v in weights.items() if k.startswith("transformer.")}
    if "null" in weights:
        state["null_embedding"] = weights["null"].clone()
    return state


@torch.no_grad()
def _sample_grid(model, net, ema, image_embeds, cfg, stage, path: Path, env) -> None:
    """One image per condition, side by side: the sample prompts (text), then the first training images' embeddings.

    Sampled with the EMA weights through the runtime's reverse loop (cvqd.model.loop.ReverseLoop: the same step
    math and Philox noise as `cvqd-run`), every cell with seed 0, so a prompt's cell equals
    `cvqd-run --ckpt model.pt --backend torch --prompt P --seed 0` at the settings recorded in the PNG.
    """
    from cvqd.images import grid, save_png, to_pil

    state = _ema_state(model, net, ema)
    transformer = copy.deepcopy(model.transformer)
    transformer.load_state_dict(state["transformer"])
    null = F.normalize(state["null_embedding"].to(env.device), dim=0)
    with common.eval_mode(transformer, model.vqgan):
        conds = [image_embeds.to(env.device)]
        prompts = list(cfg.sample_prompts) if cfg.sample_prompts and model.clip is not None else []
        if prompts:
            conds.insert(0, model.encode_prompts(prompts).to(env.device))
        cond = torch.cat(conds)
        settings = {"steps": min(cfg.sample_steps, model.schedule.num_steps),
                    "guidance": model.cfg.sampling.guidance if stage == "cfg" else 1.0,
                    "truncation": model.cfg.sampling.truncation}
        reverse = ReverseLoop(transformer.logits, model.schedule, model.seq_len, env.device)
        tok = reverse.run(cond, null, [0] * len(cond), **settings)
        save_png(path, grid(to_pil(model.vqgan.decode(tok)), cols=len(cond)),
                 {**settings, "seed": 0, "prompts": prompts, "stage": stage})


def _save(run, model, net, ema, opt, sampler, gen, env, step, stage, cfg, n_items, images) -> None:
    rng = common.rng_state(gen, env)  # collective
    if not env.is_main:
        return
    meta = {**getattr(model, "meta", {}), f"{stage}_training": {
        "steps": step, "config": dataclasses.asdict(cfg), "images": n_items, "skipped_files": len(images.skipped),
        "noise_alpha": model.cfg.clip.noise_alpha, "null_prob": model.cfg.clip.null_prob if stage == "cfg" else None}}
    training = {"model": net.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
                "importance_sampler": sampler.state_dict(), "rng": rng, "config": dataclasses.asdict(cfg)}
    save_checkpoint(run.ckpt, Checkpoint(model.cfg, _ema_state(model, net, ema), step, stage, meta, training))
