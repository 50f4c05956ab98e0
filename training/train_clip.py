"""`cvqd-train clip`: contrastive training of a small open_clip CLIP on captioned images.

The paper uses a pretrained CLIP. For a domain where none exists (the shapes benchmark) this trains one from
the model config's open_clip architecture (`ClipConfig.model_cfg`) on images with sidecar captions
(`<stem>.txt`, one caption variant per line; one line is drawn per image per step). The loss is the symmetric
InfoNCE of CLIP with a learned temperature; captions that are identical strings within a batch count as
positives of each other (many images share a caption). The result is written as a normal cvqd checkpoint
(stage "clip") whose `state["clip"]` holds the CLIP; the VQGAN and transformer are carried over unchanged.

Only the CLIP ever sees captions: the VQGAN and the diffusion generator train on images alone.
"""

from __future__ import annotations

import dataclasses
import math
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
from cvqd.training.data import ImageSet, read_captions, skipped_warning, to_float
from cvqd.model.clipvqd import CLIPVQDiffusion


@dataclass
class ClipTrainConfig:
    steps: int = 2000
    batch_size: int = 256  # per process
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: int = 100
    schedule: str = "cosine"
    grad_clip: float = 1.0
    seed: int = 0
    ckpt_every: int = 500
    log_every: int = 20
    resize: str = "squeeze"
    stop_after: int | None = None  # leave after this many steps of this invocation (checkpointed)
    threads: int | None = None
    quiet: bool = False


class _Towers(nn.Module):
    """Both towers in one forward, so DDP sees a single call per step."""

    def __init__(self, clip):
        super().__init__()
        self.clip = clip

    def forward(self, pixels: torch.Tensor, tokens: torch.Tensor):
        m = self.clip.model
        img = F.normalize(m.encode_image(pixels), dim=-1)  # [B, D]
        txt = F.normalize(m.encode_text(tokens), dim=-1)
        return img, txt, m.logit_scale.exp().clamp(max=100.0)


def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, caption_ids: torch.Tensor):
    """Symmetric InfoNCE; targets spread uniformly over the images sharing a caption. -> (loss, accuracy)."""
    logits = scale * img @ txt.t()  # [B images, B texts]
    same = (caption_ids[:, None] == caption_ids[None, :]).float()
    target = same / same.sum(1, keepdim=True)
    loss = 0.5 * (-(target * F.log_softmax(logits, 1)).sum(1).mean() - (target * F.log_softmax(logits.t(), 1)).sum(1).mean())
    acc = same.gather(1, logits.t().argmax(1, keepdim=True)).mean()  # text -> image top-1 hits a true pair
    return loss, acc


def load_caption_set(root: str | os.PathLike, size: int, resize: str,
                     progress: bool) -> tuple[ImageSet, list[list[str]], list[Path]]:
    """-> (the captioned images, decoded; their caption lines; the images left out for want of a caption)."""
    images = ImageSet.scan(root, size, resize)
    with_caps = [(f, read_captions(f)) for f in images.files]
    uncaptioned = [f for f, c in with_caps if not c]
    if len(uncaptioned) == len(with_caps):
        raise CvqdError(f"no captions under {root}: CLIP training needs a `<image stem>.txt` caption file next to "
                        f"each image (one caption per line); `cvqd-train shapes --captions` writes them")
    images.files = [f for f, c in with_caps if c]
    caps = {f: c for f, c in with_caps}
    images.preload(progress=progress, desc="decoding images")
    return images, [caps[f] for f in images.files], uncaptioned


def train_clip(data: str | os.PathLike, out: str | os.PathLike, *, init: str | os.PathLike | None = None,
               preset: str | None = None, cfg: ClipTrainConfig | None = None, resume: bool = False,
               device: str | None = None, run_info: dict[str, Any] | None = None) -> Path:
    """Train the CLIP of a model (from `init` checkpoint or a fresh `preset`) on captioned images; -> checkpoint path."""
    cfg = cfg or ClipTrainConfig()
    return common.run_distributed(device, _train, Path(data), Path(out), init, preset, cfg, resume, run_info or {})


def _train(data, out, init, preset, cfg, resume, run_info, env) -> Path:
    set_torch_threads(cfg.threads)
    run = common.RunDir(out, env)
    run.check(resume)  # the folder is created below, once the model and the data checked out
    ckpt, model = common.initial_model(run, resume, init, preset, cfg.seed, "CLIP")
    clip = model.require_clip().train().to(env.device)
    images, captions, uncaptioned = load_caption_set(data, model.cfg.clip.image_size, cfg.resize,
                                                     env.is_main and not cfg.quiet)
    lines = sorted({c for caps in captions for c in caps})
    line_id = {c: i for i, c in enumerate(lines)}
    cap_ids = [torch.tensor([line_id[c] for c in caps]) for caps in captions]
    tokens = clip.tokenize(lines).cpu()  # [L, ctx], every distinct caption tokenised once

    towers = common.wrap_ddp(_Towers(clip), env)
    params = [p for p in clip.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    gen = common.make_generator(cfg.seed, env)
    common.seed_training_streams(cfg.seed, env)
    step = 0
    if resume:
        tr = ckpt.training or {}
        if ckpt.stage != "clip" or "optimizer" not in tr:
            raise CvqdError(f"{run.ckpt} is a {ckpt.stage!r} checkpoint without CLIP training state; cannot resume")
        opt.load_state_dict(tr["optimizer"])
        step = int(ckpt.step)
        common.restore_rng(tr.get("rng"), gen, env)
    plan = common.BatchPlan(len(images), cfg.batch_size, env, cfg.seed)
    batches = plan.batches_from(step)
    run.create(resume, "clip", {"config": dataclasses.asdict(cfg), "data": common.path_str(data),
                                "init": common.path_str(init), "preset": preset, **run_info})
    if resume:
        run.trim_log(step)
    common.warn(env, skipped_warning("cvqd-train clip", data, {"unreadable": images.skipped,
                                                               "without a caption": uncaptioned}))
    bar = common.Progress(cfg.steps, step, "clip", env, cfg.quiet)
    t0, seen = time.perf_counter(), 0
    stop_at = min(cfg.steps, step + cfg.stop_after) if cfg.stop_after else cfg.steps
    while step < stop_at:
        idx = next(batches)
        pixels = clip.preprocess(to_float(images.batch(idx)).to(env.device))
        pick = [int(cap_ids[i][torch.randint(len(cap_ids[i]), (1,), generator=gen)]) for i in idx]
        ids = torch.tensor(pick)
        for g in opt.param_groups:
            g["lr"] = common.lr_at(step, cfg.lr, cfg.warmup, cfg.steps, cfg.schedule)
        img, txt, scale = towers(pixels, tokens[ids].to(env.device))
        loss, acc = contrastive_loss(img, txt, scale, ids.to(env.device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        step += 1
        seen += len(idx) * env.world
        bar.update(loss=float(loss.detach()), acc=float(acc))
        if step % cfg.log_every == 0 or step == cfg.steps:
            run.log({"step": step, "loss": float(env.all_mean(loss.detach())), "acc_t2i": float(env.all_mean(acc)),
                     "logit_scale": float(scale.detach()), "grad_norm": float(gnorm), "lr": opt.param_groups[0]["lr"],
                     "img_per_s": seen / (time.perf_counter() - t0), "threads": torch.get_num_threads()})
        if step % cfg.ckpt_every == 0 or step == stop_at:
            _save(run, model, opt, gen, env, step, cfg, images, uncaptioned)
    bar.close()
    return run.ckpt


def _save(run, model, opt, gen, env, step, cfg, images, uncaptioned) -> None:
    rng = common.rng_state(gen, env)  # collective: every rank takes part
    if not env.is_main:
        return
    # `clip_training` also marks the checkpoint's CLIP as trained: the diffusion stages refuse a CLIP without it
    # (or a `clip_source`) unless --allow-random-clip asks for one
    meta = {k: v for k, v in getattr(model, "meta", {}).items() if k != "clip_random"}
    meta["clip_training"] = {"steps": step, "config": dataclasses.asdict(cfg), "images": len(images),
                             "skipped_files": len(images.skipped) + len(uncaptioned)}
    training = {"optimizer": opt.state_dict(), "rng": rng, "config": dataclasses.asdict(cfg)}
    save_checkpoint(run.ckpt, model.to_checkpoint(step=step, stage="clip", meta=meta, training=training))


@torch.no_grad()
def retrieval_report(model: CLIPVQDiffusion, batch: int = 128) -> dict[str, float]:
    """How well the CLIP matches shapes prompts to images, and its modality gap.

    For each benchmark prompt (size, colour, shape, position) the canonical images of all 180 attribute sets
    on both backgrounds are ranked by cosine to the prompt's text embedding; top-1 counts when the best image
    has every attribute the prompt names. Also: mean cosine of a prompt to its matching images (the image-text
    gap the pseudo text embedding must bridge) and of an image to other images.
    """
    from cvqd.training.shapes import BACKGROUNDS, benchmark_prompts, render_attributes

    clip = model.require_clip()
    prompts = benchmark_prompts()
    attrs = [dataclasses.replace(a, background=bg) for _, a in prompts for bg in BACKGROUNDS]
    ims = torch.stack([_pil_to_float(render_attributes(a)) for a in attrs])
    img = torch.cat([clip.encode_image(ims[i:i + batch]) for i in range(0, len(ims), batch)])  # [2P, D]
    txt = clip.encode_text(clip.tokenize([p for p, _ in prompts]))  # [P, D]
    sim = txt @ img.t()  # [P, 2P]
    key = lambda a: (a.colour, a.shape, a.size, a.position)  # noqa: E731
    match = torch.tensor([[key(a) == key(b) for b in attrs] for _, a in prompts])
    best = sim.argmax(1)
    top1 = match.gather(1, best[:, None]).float()[:, 0]  # [P]
    held = torch.tensor([a.held_out for _, a in prompts])
    per_attr = {f"t2i_{k}": sum(getattr(attrs[int(b)], k) == getattr(a, k) for b, (_, a) in zip(best, prompts))
                / len(prompts) for k in ("colour", "shape", "size", "position")}
    img_img = img @ img.t()
    off = ~torch.eye(len(img), dtype=torch.bool)
    return {"t2i_top1": float(top1.mean()), "t2i_top1_heldout": float(top1[held].mean()), **per_attr,
            "cos_text_image_match": float(sim[match].mean()), "cos_text_image_other": float(sim[~match].mean()),
            "cos_image_image": float(img_img[off].mean()),
            "cos_text_text": float((txt @ txt.t())[~torch.eye(len(txt), dtype=torch.bool)].mean())}


def _pil_to_float(im) -> torch.Tensor:
    import numpy as np

    return torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0


def noise_alpha_for_gap(cos_match: float) -> float:
    """The alpha whose pseudo text embedding sits as far from its image embedding as text does.

    For eps orthogonal to f (high dimension), cos(normalise(f + alpha eps/|eps|), f) = 1/sqrt(1 + alpha^2).
    """
    c = min(max(cos_match, 1e-3), 1.0)
    return math.sqrt(max(0.0, 1.0 / c ** 2 - 1.0))
