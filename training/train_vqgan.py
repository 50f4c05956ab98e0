"""`cvqd-train vqgan`: train the Gumbel-VQGAN tokenizer on a folder of images.

Per step (taming-transformers' GumbelVQ recipe, docs/algorithm.md#tokenizer):
    recon, kl = VQGAN(x, tau)                   tau: Gumbel temperature, cosine-annealed temp_init -> temp_final
    L_rec = |x - recon|_1 + |x - recon|_2^2     (+ LPIPS-style perceptual distance when weights are given)
    L_G   = L_rec + kl + [step >= disc_start] * lambda * disc_weight * (-D(recon))
            lambda = |grad_last L_rec| / |grad_last (-D(recon))|  (the adaptive weight, on the decoder's last conv)
    L_D   = hinge(D(x), D(recon))               once step >= disc_start
Adam with betas (0.5, 0.9) for both networks; lr = base_lr x (global batch size). Codebook usage (codes alive
in the last logging window, perplexity) is logged. Only the VQGAN weights of the checkpoint change; the
discriminator and both optimizers travel in its resume state.

`decoder_only` fine-tunes the decoder of a trained VQGAN on the argmax codes that `encode` gives at inference,
with the encoder and codebook frozen: the tokens stay exactly the same, so a generator trained on the tokenizer
stays valid (like the decoder-only fine-tunes of latent-diffusion autoencoders). Gumbel training decodes codes
sampled from softmax(logits), and a short run leaves the logits unpeaked, so its decoder learns to hedge between
codes (wrong hues on small shapes); on the argmax codes it does not have to (docs/algorithm.md#tokenizer).
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cvqd.model.checkpoint import save_checkpoint
from cvqd.errors import CvqdError
from cvqd.threads import set_torch_threads
from cvqd.training import common
from cvqd.training.data import ImageSet, should_preload, skipped_warning, to_float
from cvqd.model.clipvqd import CLIPVQDiffusion
from cvqd.model.vqgan import PatchDiscriminator


@dataclass
class VQGANTrainConfig:
    steps: int = 50_000
    batch_size: int = 12  # per process
    base_lr: float = 4.5e-6  # lr = base_lr * batch_size * world size (the paper's scaling)
    temp_anneal_steps: int | None = None  # steps of the cosine Gumbel-temperature schedule (default: steps)
    disc_start: int | None = None  # default: the model config's vqgan.disc_start
    grad_clip: float | None = None
    seed: int = 0
    ckpt_every: int = 1000
    log_every: int = 50
    sample_every: int = 1000
    resize: str = "squeeze"
    perceptual_weights: str | None = None
    lpips_weights: str | None = None
    perceptual_weight: float = 1.0
    straight_through: bool = False  # hard one-hot codes forward, Gumbel-softmax gradients backward
    # Gumbel noise scale, cosine-annealed 1 -> noise_final with the temperature. 1 (the default) is the standard
    # recipe, whose training forward samples codes from softmax(logits); short runs can end with unpeaked logits,
    # so the decoder learns from codes that differ from the
    # argmax codes of inference. 0 makes the forward deterministic by the end of the schedule.
    noise_final: float = 1.0
    decoder_only: bool = False  # freeze encoder + codebook, train post_quant_conv + decoder on argmax codes
    # A new model's (--preset) VQGANConfig.encoder_scope: "image" or "cell"; None keeps the preset's. With --init
    # it must match the checkpoint's (a trained encoder cannot change what it looks at).
    encoder_scope: str | None = None
    stop_after: int | None = None  # leave after this many steps of this invocation (checkpointed)
    threads: int | None = None
    quiet: bool = False


def hinge_d_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())


def adaptive_weight(rec: torch.Tensor, g: torch.Tensor, last: torch.nn.Parameter) -> torch.Tensor:
    """|grad rec| / |grad g| at the decoder's last layer (taming), clamped; balances GAN against reconstruction."""
    gr = torch.autograd.grad(rec, last, retain_graph=True)[0]
    gg = torch.autograd.grad(g, last, retain_graph=True)[0]
    return (gr.norm() / (gg.norm() + 1e-4)).clamp(0.0, 1e4).detach()


class _Autoencode(nn.Module):
    """encoder -> Gumbel quantizer -> decoder as one forward (for DDP), optionally straight-through (hard)."""

    def __init__(self, vqgan, hard: bool, decoder_only: bool = False):
        super().__init__()
        self.vqgan, self.hard, self.decoder_only = vqgan, hard, decoder_only

    def forward(self, images: torch.Tensor, temperature: float, noise_scale: float = 1.0):
        v = self.vqgan
        if self.decoder_only:  # the frozen encoder's argmax codes, exactly as at inference
            with torch.no_grad():
                logits = v.quantize.proj(v.encoder(images))
                z_q = v.quantize.lookup(logits.argmax(dim=1).flatten(1), v.cfg.token_grid)
            return v.decoder(v.post_quant_conv(z_q)), torch.zeros((), device=images.device), logits
        z_q, kl, logits = v.quantize(v.encoder(images), temperature, hard=self.hard, noise_scale=noise_scale)
        return v.decoder(v.post_quant_conv(z_q)), kl, logits


def train_vqgan(data: str | os.PathLike, out: str | os.PathLike, *, init: str | os.PathLike | None = None,
                preset: str | None = None, cfg: VQGANTrainConfig | None = None, resume: bool = False,
                device: str | None = None, run_info: dict[str, Any] | None = None) -> Path:
    """Train the VQGAN of a model (from `init` or a fresh `preset`) on the images under `data`; -> checkpoint."""
    cfg = cfg or VQGANTrainConfig()
    return common.run_distributed(device, _train, Path(data), Path(out), init, preset, cfg, resume, run_info or {})


def _train(data, out, init, preset, cfg, resume, run_info, env) -> Path:
    set_torch_threads(cfg.threads)
    run = common.RunDir(out, env)
    run.check(resume)  # the folder is created below, once the model and the data checked out
    changes = {"encoder_scope": cfg.encoder_scope} if cfg.encoder_scope else {}
    ckpt, model = common.initial_model(run, resume, init, preset, cfg.seed, "VQGAN", vqgan_changes=changes)
    vcfg = model.cfg.vqgan
    disc_start = vcfg.disc_start if cfg.disc_start is None else cfg.disc_start
    images = ImageSet.scan(data, vcfg.resolution, cfg.resize)
    if should_preload(len(images), vcfg.resolution):
        images.preload(progress=env.is_main and not cfg.quiet, desc="decoding images")

    if cfg.decoder_only and not resume and "vqgan_training" not in getattr(model, "meta", {}):
        raise CvqdError("--decoder-only fine-tunes the decoder of a trained VQGAN; give --init with a checkpoint "
                        "whose VQGAN was trained (its tokens are kept as they are)")
    vqgan = model.vqgan.train().to(env.device)
    if cfg.decoder_only:  # encoder, code logits and codebook frozen (no mode-dependent layers in them)
        vqgan.encoder.requires_grad_(False)
        vqgan.quantize.requires_grad_(False)
    trained = [p for p in vqgan.parameters() if p.requires_grad]
    torch.manual_seed(cfg.seed + 1)
    disc = PatchDiscriminator(vcfg).train().to(env.device)
    perceptual = None
    if cfg.perceptual_weights:
        from cvqd.training.perceptual import PerceptualLoss

        perceptual = PerceptualLoss(cfg.perceptual_weights, cfg.lpips_weights).to(env.device)
    lr = cfg.base_lr * cfg.batch_size * env.world
    opt_g = torch.optim.Adam(trained, lr=lr, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(disc.parameters(), lr=lr, betas=(0.5, 0.9))
    gen = common.make_generator(cfg.seed, env)
    common.seed_training_streams(cfg.seed, env)
    step = 0
    if resume:
        tr = ckpt.training or {}
        if ckpt.stage != "vqgan" or "opt_g" not in tr:
            raise CvqdError(f"{run.ckpt} is a {ckpt.stage!r} checkpoint without VQGAN training state; cannot resume")
        disc.load_state_dict(tr["discriminator"])
        opt_g.load_state_dict(tr["opt_g"])
        opt_d.load_state_dict(tr["opt_d"])
        step = int(ckpt.step)
        common.restore_rng(tr.get("rng"), gen, env)
    vq_ddp = common.wrap_ddp(_Autoencode(vqgan, cfg.straight_through, cfg.decoder_only), env)
    disc_ddp = common.wrap_ddp(disc, env)
    last = vqgan.decoder.conv_out.weight
    plan = common.BatchPlan(len(images), cfg.batch_size, env, cfg.seed)
    batches = plan.batches_from(step)
    fixed = images.batch(list(range(min(8, len(images)))))  # the sample grid's originals
    run.create(resume, "vqgan", {"config": dataclasses.asdict(cfg), "data": common.path_str(data),
                                 "init": common.path_str(init), "preset": preset, **run_info})
    if resume:
        run.trim_log(step)
    warned = len(images.skipped)  # the files a preload found unreadable; lazy decoding may find more
    common.warn(env, skipped_warning("cvqd-train vqgan", data, {"unreadable": images.skipped}))
    anneal = cfg.temp_anneal_steps or cfg.steps
    usage = torch.zeros(vcfg.n_embed, device=env.device)
    bar = common.Progress(cfg.steps, step, "vqgan", env, cfg.quiet)
    t0, seen = time.perf_counter(), 0
    stop_at = min(cfg.steps, step + cfg.stop_after) if cfg.stop_after else cfg.steps
    while step < stop_at:
        x = to_float(images.batch(next(batches))).to(env.device)
        tau = common.cosine_anneal(step, anneal, vcfg.temp_init, vcfg.temp_final)
        noise = common.cosine_anneal(step, anneal, 1.0, cfg.noise_final)
        gan_on = step >= disc_start
        # ---- generator (VQGAN) step: torch's global RNG drives the Gumbel noise (checkpointed)
        recon, kl, logits = vq_ddp(x, tau, noise)
        l1 = (x - recon).abs().mean()
        l2 = ((x - recon) ** 2).mean()
        rec = l1 + l2
        if perceptual is not None:
            rec = rec + cfg.perceptual_weight * perceptual(x, recon).mean()
        loss = rec + kl
        g_loss = d_weight = torch.zeros((), device=env.device)
        if gan_on:
            disc.requires_grad_(False)
            g_loss = -disc(recon).mean()
            d_weight = adaptive_weight(rec, g_loss, last) * vcfg.disc_weight
            loss = loss + d_weight * g_loss
        opt_g.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(trained, cfg.grad_clip)
        opt_g.step()
        d_loss = torch.zeros((), device=env.device)
        if gan_on:  # ---- discriminator step: real and fake in one forward
            disc.requires_grad_(True)
            scores = disc_ddp(torch.cat([x, recon.detach()]))
            d_loss = hinge_d_loss(*scores.chunk(2))
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
        usage += torch.bincount(logits.argmax(1).flatten(), minlength=vcfg.n_embed)
        step += 1
        seen += x.shape[0] * env.world
        bar.update(rec=float(rec.detach()), tau=tau)
        if step % cfg.log_every == 0 or step == cfg.steps:
            u = env.all_mean(usage) * env.world
            p = u / u.sum().clamp(min=1)
            run.log({"step": step, "rec": float(env.all_mean(rec.detach())), "l1": float(env.all_mean(l1.detach())),
                     "l2": float(env.all_mean(l2.detach())), "kl": float(env.all_mean(kl.detach())),
                     "g_loss": float(g_loss.detach()), "d_loss": float(env.all_mean(d_loss.detach())),
                     "d_weight": float(d_weight), "temperature": tau, "noise": noise, "lr": lr,
                     "codes_alive": int((u > 0).sum()), "codebook_size": vcfg.n_embed,
                     "perplexity": float(torch.exp(-(p * torch.log(p + 1e-10)).sum())),
                     "img_per_s": seen / (time.perf_counter() - t0), "threads": torch.get_num_threads()})
            usage.zero_()
        if env.is_main and cfg.sample_every and (step % cfg.sample_every == 0 or step == cfg.steps):
            _sample_grid(vqgan, fixed, run.sample_path(step), env)
        if step % cfg.ckpt_every == 0 or step == stop_at:
            _save(run, model, disc, opt_g, opt_d, gen, env, step, cfg, images)
    bar.close()
    if len(images.skipped) > warned:
        common.warn(env, skipped_warning("cvqd-train vqgan", data, {"unreadable": images.skipped}))
    return run.ckpt


@torch.no_grad()
def _sample_grid(vqgan, fixed: torch.Tensor, path: Path, env) -> None:
    """Originals (top row) over their deterministic token reconstructions (bottom row)."""
    from cvqd.images import grid, save_png, to_pil

    with common.eval_mode(vqgan):
        x = to_float(fixed).to(env.device)
        recon = vqgan.decode(vqgan.encode(x))
    save_png(path, grid(to_pil(x) + to_pil(recon), cols=len(x)))


def _save(run, model, disc, opt_g, opt_d, gen, env, step, cfg, images) -> None:
    rng = common.rng_state(gen, env)  # collective
    if not env.is_main:
        return
    key = "vqgan_decoder_training" if cfg.decoder_only else "vqgan_training"  # keep the tokenizer's own record
    meta = {**getattr(model, "meta", {}), key: {"steps": step, "config": dataclasses.asdict(cfg), "images": len(images),
                                               "skipped_files": len(images.skipped)}}
    training = {"discriminator": disc.state_dict(), "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(),
                "rng": rng, "config": dataclasses.asdict(cfg)}
    save_checkpoint(run.ckpt, model.to_checkpoint(step=step, stage="vqgan", meta=meta, training=training))


@torch.no_grad()
def reconstruction_report(model: CLIPVQDiffusion, images: torch.Tensor, batch: int = 64) -> dict[str, float]:
    """Mean L1 / PSNR of encode -> decode on uint8 images [N, 3, S, S], and the codes they use."""
    vq = model.vqgan.eval()
    l1, mse, codes = [], [], []
    for i in range(0, len(images), batch):
        x = to_float(images[i:i + batch])
        tok = vq.encode(x)
        r = vq.decode(tok).clamp(-1, 1)
        l1.append((x - r).abs().mean((1, 2, 3)))
        mse.append(((x - r) / 2).pow(2).mean((1, 2, 3)))
        codes.append(tok.flatten())
    mse_t = torch.cat(mse)
    return {"l1": float(torch.cat(l1).mean()), "psnr": float((-10 * torch.log10(mse_t.clamp(min=1e-10))).mean()),
            "codes_used": int(torch.cat(codes).unique().numel())}


@torch.no_grad()
def reconstruction_attributes(model: CLIPVQDiffusion, count: int = 600, seed: int = 99,
                              batch: int = 64) -> dict[str, float]:
    """The tokenizer's ceiling on the shapes benchmark: the analyzer's colour / shape / both accuracy on encode ->
    decode of `count` rendered images of every combination (64x64 VQGANs only, the benchmark's size)."""
    import numpy as np

    from cvqd.images import to_pil
    from cvqd.training.shapes import analyze, iter_samples, render

    if model.cfg.vqgan.resolution != 64:
        raise CvqdError(f"reconstruction_attributes needs a 64x64 VQGAN (the shapes benchmark's size), got "
                        f"{model.cfg.vqgan.resolution}x{model.cfg.vqgan.resolution}")
    vq = model.vqgan.eval()
    specs = [s for _, s in iter_samples(count, seed=seed, split="all")]
    hits = []
    for i in range(0, count, batch):
        part = specs[i:i + batch]
        x = torch.stack([torch.from_numpy(np.array(render(s))).permute(2, 0, 1) for s in part])
        for s, im in zip(part, to_pil(vq.decode(vq.encode(to_float(x))))):
            v = analyze(im)
            hits.append((v.colour == s.attrs.colour, v.shape == s.attrs.shape))
    h = torch.tensor(hits, dtype=torch.float64)
    return {"colour": float(h[:, 0].mean()), "shape": float(h[:, 1].mean()), "colour+shape": float(h.prod(1).mean()),
            "images": count}
