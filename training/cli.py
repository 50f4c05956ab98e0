"""`cvqd-train`: make and train CLIP-VQDiffusion checkpoints.

Every command is a thin layer over an importable function (cvqd.training.train_clip.train_clip,
train_vqgan.train_vqgan, train_diffusion.train_diffusion, shapes.render_folder, release.finalize).
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from cvqd.cli_util import run_command
from cvqd.model.config import ENCODER_SCOPES, LR_SCHEDULES, PRESETS

CTX = {"help_option_names": ["-h", "--help"], "max_content_width": 100}

EPILOG = """\b
A model from a folder of images, stage by stage (see docs/training.md):
  cvqd-train vqgan --preset demo --data images/ --out runs/vqgan --steps 5000 --straight-through
  cvqd-train diffusion --init runs/vqgan/model.pt --clip-model ViT-B-32 --clip-weights ViT-B-32.pt \\
      --data images/ --out runs/diffusion
  cvqd-train cfg --init runs/diffusion/model.pt --data images/ --out runs/cfg
  cvqd-train finalize --ckpt runs/cfg/model.pt --out model.pt --fp16
The CLIP-GEN (autoregressive) generator on the same VQGAN and CLIP:
  cvqd-train ar --init model.pt --data images/ --out runs/ar
The bundled demo model: cvqd-train demo (the commands of its run are recorded in cvqd/assets/demo.json).
Multi-process: torchrun --nproc_per_node 2 -m cvqd.training.cli diffusion ... (gloo on CPU, NCCL on GPUs).
"""


def _wrote(path) -> None:
    """Say where the checkpoint went, once: under torchrun only rank 0 writes, so only rank 0 says so."""
    from cvqd.training.common import env_rank

    if env_rank() == 0:
        click.echo(f"wrote {path}", err=True)


@click.group(context_settings=CTX, epilog=EPILOG)
def cli():
    """Train CLIP-VQDiffusion models: VQGAN tokenizer, language-free diffusion transformer, CFG fine-tune.

    Each training command writes a run folder (--out) holding model.pt (a normal cvqd checkpoint that also
    carries the resume state), log.jsonl, samples/ and run.json (the settings and inputs of its start). The folder
    is made only once the inputs checked out, so a start that fails leaves none. Interrupted runs continue exactly
    with `--out DIR --resume`.
    """


@cli.command("init")
@click.option("--preset", type=click.Choice(sorted(PRESETS)), default="tiny", show_default=True,
              help="Model configuration preset.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Checkpoint to write.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random initialisation.")
def init_cmd(preset: str, out: Path, seed: int):
    """Write a randomly initialised checkpoint of a preset (for tests, smoke runs and export trials)."""
    from cvqd.training.init import init_checkpoint

    init_checkpoint(preset, out, seed=seed)
    click.echo(f"wrote {out}", err=True)


@cli.command("shapes")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="New folder to write (must not exist).")
@click.option("--count", type=click.IntRange(min=1), default=20_000, show_default=True, help="Number of images.")
@click.option("--seed", type=int, default=0, show_default=True, help="Dataset seed (image i depends on seed and i).")
@click.option("--split", type=click.Choice(["train", "heldout", "all"]), default="train", show_default=True,
              help="train: without the held-out colour/shape pairs (purple triangle, orange square, green circle); "
                   "heldout: only those; all: everything (for the CLIP).")
@click.option("--captions", is_flag=True, help="Also write <stem>.txt captions (for `cvqd-train clip` only).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def shapes_cmd(out, count, seed, split, captions, quiet):
    """Render the procedural shapes dataset (64x64, one flat shape on a flat background) to a folder."""
    from cvqd.training.shapes import render_folder

    render_folder(out, count, seed=seed, split=split, captions=captions, progress=not quiet)
    click.echo(f"wrote {count} images to {out}", err=True)


def _common(f):
    """Options every training stage shares."""
    opts = [
        click.option("--data", type=click.Path(path_type=Path), default=None,
                     help="Folder of images (searched recursively; png/jpg/webp/...; unreadable files are skipped "
                          "and named in a warning). Required, except with --resume (the run's own folder)."),
        click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
                     help="Run folder: model.pt, log.jsonl, samples/."),
        click.option("--steps", type=click.IntRange(min=1), default=None, help="Total optimizer steps."),
        click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Batch size per process."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed of data order and noise."),
        click.option("--ckpt-every", type=click.IntRange(min=1), default=None, help="Checkpoint every N steps."),
        click.option("--log-every", type=click.IntRange(min=1), default=None, help="Log metrics every N steps."),
        click.option("--resume", is_flag=True, help="Continue the run in --out from its model.pt (exactly), with the "
                     "settings and inputs (data folder, CLIP weights file) recorded in its run.json, so "
                     "`--out DIR --resume` is enough; options given alongside override them."),
        click.option("--stop-after", type=click.IntRange(min=1), default=None,
                     help="Leave (with a checkpoint) after this many steps of this invocation; --resume continues."),
        click.option("--resize", type=click.Choice(["squeeze", "center-crop"]), default="squeeze", show_default=True,
                     help="How images become square: squeeze (the paper's) or center-crop."),
        click.option("--threads", type=click.IntRange(min=1), default=None, help="torch CPU threads per process."),
        click.option("--device", default=None, help="torch device (default: cuda if available, else cpu)."),
        click.option("--quiet", "-q", is_flag=True, help="No progress bar."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


# options that concern one invocation only: never carried over from the run being resumed
_PER_INVOCATION = {"stop_after", "quiet", "threads"}


def _recorded(out: Path, resume: bool, stage: str) -> dict | None:
    """With --resume, the run.json of the run in `out` (which must be a `stage` run); else None."""
    from cvqd.training.common import read_run_json

    return read_run_json(out, stage) if resume else None


def _input(name: str, given, recorded: dict | None, required: bool = False):
    """An input path (--data, --clip-weights...): as given; on --resume, else the one the run recorded."""
    value = given if given is not None or recorded is None else recorded.get(name)
    if value is None and required:
        option = "--" + name.replace("_", "-")
        raise click.UsageError(f"give {option}" if recorded is None else
                               f"--resume: the run records no {option}; give it")
    return None if value is None else Path(value)


def _cfg(cls, recorded: dict | None = None, **kw):
    """A training config from the options that were given (None means: keep the default).

    With --resume (`recorded`: the run's run.json) the run's recorded settings are the base, and only options
    given on this command line override them, so `--resume` alone continues exactly the run that was started.
    """
    import dataclasses

    names = {f.name for f in dataclasses.fields(cls)}
    if recorded is None:
        return cls(**{k: v for k, v in kw.items() if v is not None and k in names})
    ctx = click.get_current_context()
    given = {k: v for k, v in kw.items() if k in names and v is not None
             and ctx.get_parameter_source(k) not in (click.core.ParameterSource.DEFAULT,
                                                     click.core.ParameterSource.DEFAULT_MAP)}
    base = {k: (tuple(v) if isinstance(v, list) else v) for k, v in recorded["config"].items()
            if k in names and k not in _PER_INVOCATION}
    return cls(**{**base, **given})


def _start(init, preset):
    if init is None and preset is None:
        raise click.UsageError("give --init CHECKPOINT (continue a model) or --preset NAME (start a new one)")
    if init is not None and preset is not None:
        raise click.UsageError("--init and --preset are alternatives; give one")


@cli.command("clip", epilog="Example: cvqd-train clip --preset demo --data data/shapes-captioned --out runs/clip")
@click.option("--init", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Checkpoint to start from.")
@click.option("--preset", type=click.Choice(sorted(PRESETS)), default=None, help="Start a new model of this preset.")
@_common
@click.option("--lr", type=float, default=None, help="Peak AdamW learning rate.")
@click.option("--warmup", type=click.IntRange(min=0), default=None, help="Warm-up steps.")
def clip_cmd(init, preset, data, out, resume, device, **kw):
    """Train the model's small CLIP contrastively on captioned images (<stem>.txt next to each image).

    This stands in for a pretrained CLIP in domains that have none (the shapes benchmark). Only the CLIP sees
    captions; the VQGAN and the generator never do.
    """
    from cvqd.training.train_clip import ClipTrainConfig, train_clip

    if not resume:
        _start(init, preset)
    recorded = _recorded(out, resume, "clip")
    data = _input("data", data, recorded, required=True)
    path = train_clip(data, out, init=init, preset=preset, cfg=_cfg(ClipTrainConfig, recorded, **kw), resume=resume,
                      device=device, run_info={"argv": sys.argv[1:]})
    _wrote(path)


@cli.command("vqgan", epilog="Example: cvqd-train vqgan --init runs/clip/model.pt --data data/shapes-train "
                             "--out runs/vqgan --steps 3000")
@click.option("--init", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Checkpoint to start from.")
@click.option("--preset", type=click.Choice(sorted(PRESETS)), default=None, help="Start a new model of this preset.")
@_common
@click.option("--base-lr", type=float, default=None, help="Adam lr per image: lr = base-lr x batch x processes "
              "(paper: 4.5e-6).")
@click.option("--disc-start", type=click.IntRange(min=0), default=None,
              help="Step at which the PatchGAN loss switches on (default: the model config's, 25000 in the paper).")
@click.option("--temp-anneal-steps", type=click.IntRange(min=1), default=None,
              help="Length of the cosine Gumbel-temperature anneal 0.9 -> 0.01 (default: --steps).")
@click.option("--sample-every", type=click.IntRange(min=0), default=None, help="Reconstruction grid every N steps.")
@click.option("--perceptual-weights", type=click.Path(dir_okay=False), default=None,
              help="torchvision VGG16 weights file: adds an LPIPS-style perceptual loss (off without it).")
@click.option("--straight-through", is_flag=True, default=None,
              help="Hard (one-hot) codes in the forward pass with Gumbel-softmax gradients, so the decoder trains "
                   "on single codes, as it decodes them at inference.")
@click.option("--noise-final", type=click.FloatRange(min=0.0), default=None,
              help="Scale of the Gumbel noise at the end of the anneal (cosine from 1 with the temperature; default "
                   "1, the standard recipe). 0 ends training on the argmax codes that inference uses: short runs "
                   "otherwise leave unpeaked logits and a decoder trained on sampled codes.")
@click.option("--lpips-weights", type=click.Path(dir_okay=False), default=None,
              help="LPIPS per-channel weights (vgg.pth of the LPIPS release), used with --perceptual-weights.")
@click.option("--decoder-only", is_flag=True, default=None,
              help="Fine-tune only the decoder of the --init VQGAN, on the argmax codes inference uses; the encoder "
                   "and codebook stay frozen, so its tokens (and any generator trained on them) are unchanged.")
@click.option("--encoder-scope", type=click.Choice(ENCODER_SCOPES), default=None,
              help="For a new model (--preset): what a token's code is computed from. image (the preset's, taming's): "
                   "the whole image, through convolutions, mid-block attention and GroupNorm statistics; cell: only "
                   "the token's own f x f pixel cell, so codes are local and carry no colour of distant pixels.")
def vqgan_cmd(init, preset, data, out, resume, device, **kw):
    """Train the Gumbel-VQGAN tokenizer (L1 + L2, Gumbel temperature anneal, PatchGAN after --disc-start)."""
    from cvqd.training.train_vqgan import VQGANTrainConfig, train_vqgan

    if not resume:
        _start(init, preset)
    recorded = _recorded(out, resume, "vqgan")
    data = _input("data", data, recorded, required=True)
    path = train_vqgan(data, out, init=init, preset=preset, cfg=_cfg(VQGANTrainConfig, recorded, **kw),
                       resume=resume, device=device, run_info={"argv": sys.argv[1:]})
    _wrote(path)


def _diffusion_options(f):
    opts = [
        click.option("--init", type=click.Path(dir_okay=False, path_type=Path), default=None,
                     help="Checkpoint with a trained VQGAN (and CLIP) to start from."),
        click.option("--lr", type=float, default=None, help="Peak AdamW learning rate."),
        click.option("--warmup", type=click.IntRange(min=0), default=None, help="Warm-up steps."),
        click.option("--lr-schedule", "schedule", type=click.Choice(LR_SCHEDULES), default=None,
                     help="After warm-up: cosine decay to --final-lr-ratio x --lr at --steps (default), or constant."),
        click.option("--final-lr-ratio", type=click.FloatRange(0.0, 1.0, min_open=True), default=None,
                     help="Where the cosine decay ends, as a share of --lr (default 0.1). Short runs learn more with "
                          "a higher end, e.g. 0.7 for 1500 steps (docs/experiments.md)."),
        click.option("--ema-decay", type=float, default=None, help="EMA decay of the weights."),
        click.option("--grad-clip", type=float, default=None, help="Gradient norm clip."),
        click.option("--sample-every", type=click.IntRange(min=0), default=None, help="Sample grid every N steps."),
        click.option("--noise-shaped", type=click.FloatRange(0.0, 1.0), default=None,
                     help="Share (0-1) of the pseudo text noise drawn along the image embeddings' own covariance "
                          "instead of isotropically (default 0, the paper's recipe). Text embeddings differ from "
                          "image embeddings mostly along those directions."),
        click.option("--aux-weight", type=click.FloatRange(min=0.0), default=None,
                     help="Weight of the auxiliary x_0 cross-entropy (default: the model config's: 5e-4 in the paper "
                          "preset, 0.05 in the demo preset; the CFG stage keeps its base model's). Larger values learn "
                          "the layout in fewer steps (docs/algorithm.md#training-losses)."),
        click.option("--sample-prompt", "sample_prompts", multiple=True,
                     help="Prompt for the sample grids (repeatable); image-conditioned rows are always added."),
        click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
                     help="Where cached tokens and CLIP embeddings live (default: $CVQD_CACHE/features or "
                          "~/.cache/cvqd/features)."),
        click.option("--allow-random-clip", is_flag=True,
                     help="Condition on a CLIP that was never trained instead of refusing (smoke tests: a random "
                          "CLIP's embeddings do not match prompts). A checkpoint's CLIP counts as trained when its "
                          "meta records its origin: a `cvqd-train clip` run (clip_training) or a CLIP weights file "
                          "(clip_source); the CLIP of `cvqd-train init` or of a --preset start has neither."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


@cli.command("diffusion", epilog="Example: cvqd-train diffusion --init runs/vqgan/model.pt --data data/shapes-train "
                                 "--out runs/diffusion --noise-alpha 0.25")
@_diffusion_options
@_common
@click.option("--noise-alpha", type=float, default=None,
              help="Pseudo text embedding noise alpha (default: the model config's; paper 0.25 COCO, 0.5 FFHQ).")
@click.option("--clip-model", default=None, help="open_clip architecture of --clip-weights, e.g. ViT-B-32.")
@click.option("--clip-weights", type=click.Path(dir_okay=False), default=None,
              help="CLIP weights file (open_clip or OpenAI format) to condition on, instead of the checkpoint's CLIP.")
@click.option("--clip-from", type=click.Path(dir_okay=False), default=None,
              help="Take the CLIP (config and weights) from this cvqd checkpoint, e.g. a `cvqd-train clip` run.")
@click.option("--depth", type=click.IntRange(min=1), default=None,
              help="Transformer blocks of the new transformer (default: the checkpoint config's; demo 4). The CFG "
                   "stage, export and the runtime follow the checkpoint.")
def diffusion_cmd(init, data, out, resume, device, clip_model, clip_weights, clip_from, allow_random_clip,
                  sample_prompts, **kw):
    """Train the diffusion transformer language-free: CLIP image embeddings + noise stand in for text.

    The CLIP: --clip-from, --clip-model + --clip-weights, else the one inside --init; it must be a trained one
    (see --allow-random-clip). Tokens (frozen VQGAN) and CLIP image embeddings are computed once per image and
    cached on disk.
    """
    from cvqd.training.train_diffusion import DiffusionTrainConfig, train_diffusion

    if not resume and init is None:
        raise click.UsageError("give --init CHECKPOINT (a checkpoint with a trained VQGAN)")
    recorded = _recorded(out, resume, "diffusion")
    data = _input("data", data, recorded, required=True)
    clip_weights = _input("clip_weights", clip_weights, recorded)  # a CLIP kept outside the checkpoint
    cfg = _cfg(DiffusionTrainConfig, recorded, sample_prompts=tuple(sample_prompts) or None, **kw)
    path = train_diffusion(data, out, init=init, stage="diffusion", cfg=cfg, resume=resume, clip_model=clip_model,
                           clip_weights=clip_weights, clip_from=clip_from, allow_random_clip=allow_random_clip,
                           device=device, run_info={"argv": sys.argv[1:]})
    _wrote(path)


@cli.command("cfg", epilog="Example: cvqd-train cfg --init runs/diffusion/model.pt --data data/shapes-train "
                           "--out runs/cfg --null-prob 0.1")
@_diffusion_options
@_common
@click.option("--null-prob", type=float, default=None,
              help="Probability of replacing the condition by the learned null embedding (default: config, 0.1).")
@click.option("--clip-weights", type=click.Path(dir_okay=False), default=None,
              help="CLIP weights file, for checkpoints that do not carry their CLIP (the one the base stage used).")
def cfg_cmd(init, data, out, resume, device, clip_weights, allow_random_clip, sample_prompts, **kw):
    """Fine-tune a base diffusion model for classifier-free guidance (learned, normalised null embedding).

    The CLIP is the base model's; a base model trained with --allow-random-clip needs it here too.
    """
    from cvqd.training.train_diffusion import DiffusionTrainConfig, train_diffusion

    if not resume and init is None:
        raise click.UsageError("give --init CHECKPOINT (a `cvqd-train diffusion` checkpoint)")
    recorded = _recorded(out, resume, "cfg")
    data = _input("data", data, recorded, required=True)
    clip_weights = _input("clip_weights", clip_weights, recorded)
    cfg = _cfg(DiffusionTrainConfig, recorded, sample_prompts=tuple(sample_prompts) or None, **kw)
    path = train_diffusion(data, out, init=init, stage="cfg", cfg=cfg, resume=resume, clip_weights=clip_weights,
                           allow_random_clip=allow_random_clip, device=device, run_info={"argv": sys.argv[1:]})
    _wrote(path)


@cli.command("ar", epilog="Example: cvqd-train ar --init cvqd/assets/demo.pt --data data/shapes-train --out runs/ar "
                          "--steps 2000 --width 128 --depth 4 --heads 4 --mlp-hidden 512 --prefix 4")
@click.option("--init", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Checkpoint whose trained VQGAN and CLIP the generator uses (a diffusion run or model).")
@_common
@click.option("--lr", type=float, default=None, help="Peak AdamW learning rate.")
@click.option("--warmup", type=click.IntRange(min=0), default=None, help="Warm-up steps.")
@click.option("--lr-schedule", "schedule", type=click.Choice(LR_SCHEDULES), default=None,
              help="After warm-up: cosine decay to --final-lr-ratio x --lr (default), or constant.")
@click.option("--final-lr-ratio", type=click.FloatRange(0.0, 1.0, min_open=True), default=None,
              help="Where the cosine decay ends, as a share of --lr (default 0.1).")
@click.option("--ema-decay", type=float, default=None, help="EMA decay of the weights.")
@click.option("--grad-clip", type=float, default=None, help="Gradient norm clip.")
@click.option("--sample-every", type=click.IntRange(min=0), default=None, help="Sample grid every N steps.")
@click.option("--sample-prompt", "sample_prompts", multiple=True, help="Prompt for the sample grids (repeatable).")
@click.option("--noise-alpha", type=float, default=None,
              help="Pseudo text embedding noise alpha (default: the --init model's, as its diffusion stages used).")
@click.option("--noise-shaped", type=click.FloatRange(0.0, 1.0), default=None,
              help="Share of the pseudo text noise drawn along the image embeddings' covariance (as for diffusion).")
@click.option("--null-prob", type=float, default=None,
              help="Probability of the learned null condition, for classifier-free guidance (default: config, 0.1).")
@click.option("--width", type=click.IntRange(min=1), default=None, help="Transformer width (default: --init's).")
@click.option("--depth", type=click.IntRange(min=1), default=None, help="Transformer blocks (default: --init's).")
@click.option("--heads", type=click.IntRange(min=1), default=None, help="Attention heads (default: --init's).")
@click.option("--mlp-hidden", type=click.IntRange(min=1), default=None, help="MLP width (default: --init's).")
@click.option("--prefix", type=click.IntRange(min=1), default=None,
              help="Positions the CLIP embedding is projected to in front of the tokens (default 1).")
@click.option("--clip-from", type=click.Path(dir_okay=False), default=None,
              help="Take the CLIP (config and weights) from this cvqd checkpoint instead of --init's.")
@click.option("--clip-model", default=None, help="open_clip architecture of --clip-weights, e.g. ViT-B-32.")
@click.option("--clip-weights", type=click.Path(dir_okay=False), default=None,
              help="CLIP weights file, for an --init that does not carry its CLIP (e.g. ViT-B/32 models); "
                   "recorded for --resume.")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Where cached tokens and CLIP embeddings live (shared with the diffusion stages).")
@click.option("--allow-random-clip", is_flag=True, help="Condition on a CLIP that was never trained (smoke tests).")
def ar_cmd(init, data, out, resume, device, clip_from, clip_model, clip_weights, allow_random_clip, sample_prompts,
           **kw):
    """Train the CLIP-GEN generator: a GPT over the VQ tokens in raster order, language-free.

    The same data, frozen VQGAN and CLIP and pseudo text embeddings as the diffusion stages; the condition is a
    prefix of the token sequence, replaced by a learned null embedding with --null-prob (classifier-free
    guidance). Writes an autoregressive checkpoint: export it with cvqd-export and run it with cvqd-run like a
    diffusion model (settings: --guidance, --temperature, --top-k, --top-p).
    """
    from cvqd.training.train_ar import ARTrainConfig, train_ar

    if not resume and init is None:
        raise click.UsageError("give --init CHECKPOINT (a checkpoint with a trained VQGAN and CLIP)")
    recorded = _recorded(out, resume, "ar")
    data = _input("data", data, recorded, required=True)
    clip_weights = _input("clip_weights", clip_weights, recorded)
    cfg = _cfg(ARTrainConfig, recorded, sample_prompts=tuple(sample_prompts) or None, **kw)
    path = train_ar(data, out, init=init, cfg=cfg, resume=resume, clip_from=clip_from, clip_model=clip_model,
                    clip_weights=clip_weights, allow_random_clip=allow_random_clip, device=device,
                    run_info={"argv": sys.argv[1:]})
    _wrote(path)


@cli.command("finalize")
@click.option("--ckpt", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Trained checkpoint.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Inference checkpoint.")
@click.option("--fp16", is_flag=True, help="Store the weights in float16 (half the size).")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Default sampling steps to record.")
@click.option("--guidance", type=float, default=None, help="Default guidance scale to record.")
@click.option("--truncation", type=float, default=None, help="Default truncation rate to record.")
@click.option("--guidance-range", type=(float, float), default=None, metavar="LOW HIGH",
              help="Guidance scales the model was validated at; cvqd-run warns when asked for one outside.")
@click.option("--temperature", type=float, default=None, help="Autoregressive models: default temperature to record.")
@click.option("--top-k", type=int, default=None, help="Autoregressive models: default top-k to record (0 = all).")
@click.option("--top-p", type=float, default=None, help="Autoregressive models: default top-p to record (1 = all).")
@click.option("--note", "notes", multiple=True, help="key=value pairs added to the checkpoint's meta.")
@click.option("--vqgan-from", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Take the VQGAN decoder from this checkpoint (`cvqd-train vqgan --decoder-only` from the model's "
                   "own tokenizer); refused if its encoder or codebook differ.")
def finalize_cmd(ckpt, out, fp16, steps, guidance, truncation, guidance_range, temperature, top_k, top_p, notes,
                 vqgan_from):
    """Strip the resume state and record default sampling settings: the file users run.

    With --vqgan-from, a decoder fine-tuned after the generator was trained replaces the model's decoder (the
    tokens do not change, so the generator needs no retraining).
    """
    from cvqd.training.release import finalize

    extra = {}
    for n in notes:
        if "=" not in n:
            raise click.UsageError(f"--note expects key=value, got {n!r}")
        k, v = n.split("=", 1)
        extra[k] = v
    if guidance_range is not None and not 0 <= guidance_range[0] <= guidance_range[1]:
        raise click.UsageError(f"--guidance-range expects 0 <= LOW <= HIGH, got {guidance_range[0]:g} "
                               f"{guidance_range[1]:g}")
    size = finalize(ckpt, out, fp16=fp16, steps=steps, guidance=guidance, truncation=truncation,
                    guidance_range=guidance_range, notes=extra, vqgan_from=vqgan_from, temperature=temperature,
                    top_k=top_k, top_p=top_p)
    click.echo(f"wrote {out} ({size / 1e6:.1f} MB)", err=True)


@cli.command("demo")
@click.option("--work", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/demo"),
              show_default=True, help="Working folder: data, runs, caches, logs.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("cvqd/assets/demo.pt"),
              show_default=True, help="The finalized demo checkpoint to write.")
@click.option("--record", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="JSON record of the run (default: <out> with .json).")
@click.option("--set", "overrides", multiple=True,
              help="Recipe override key=value (fields and their meaning: training/demo.py, DemoRecipe); "
                   "key=none unsets a field that may be None.")
def demo_cmd(work, out, record, overrides):
    """Train the bundled demo model from nothing and evaluate it.

    \b
    Stages (each an ordinary command, printed and logged to <work>/logs/):
      1. render the shapes data: a captioned folder of every colour/shape pair (for the CLIP) and a training
         folder without the held-out pairs (for the VQGAN and the generator)
      2. the CLIP on one core; beside it the VQGAN, its restart and its decoder fine-tune, one after another
      3. the pseudo text noise alpha, from the trained CLIP's image-text gap
      4. the diffusion transformer, then the CFG fine-tune (torchrun, 2 processes, gloo on the CPU)
      5. the guidance sweep on the shapes benchmark's validation split: the default guidance and the range
         cvqd-run accepts without a warning
      6. finalize (fp16, those sampling defaults) and cvqd-eval on the test split (the reported figures)
    \b
    The model is preset "demo"; the recipe (steps, learning rates, sampling defaults) is DemoRecipe in
    training/demo.py, changed with --set key=value. <out>.json records each stage's command and wall time, and
    the training time when every stage ran in this invocation (docs/training.md lists measured times). A rerun
    with the same --work keeps finished stages and resumes an interrupted one.
    `--set device=cuda` runs every stage on a GPU.
    """
    from cvqd.training.demo import make_demo, recipe_with

    recipe = recipe_with(overrides)
    rec = make_demo(work, out, recipe, record or out.with_suffix(".json"))
    if rec["training_seconds"] is not None:
        click.echo(f"trained from nothing in {rec['training_seconds'] / 60:.1f} min", err=True)
    else:
        click.echo(f"kept finished stages from an earlier run ({', '.join(rec['kept'])}): no training time recorded",
                   err=True)
    click.echo(f"wrote {out}", err=True)


@cli.command("demo-ar")
@click.option("--work", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/demo-ar"),
              show_default=True, help="Working folder: data, runs, caches, logs.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("cvqd/assets/demo-ar.pt"),
              show_default=True, help="The finalized autoregressive demo checkpoint to write.")
@click.option("--record", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="JSON record of the run (default: <out> with .json).")
@click.option("--set", "overrides", multiple=True,
              help="Recipe override key=value (fields: training/demo_ar.py, ArRecipe), e.g. base=PATH steps=3000.")
def demo_ar_cmd(work, out, record, overrides):
    """Train the bundled CLIP-GEN (autoregressive) demo on the diffusion demo's VQGAN and CLIP, and evaluate it.

    \b
    Stages (ordinary commands, printed and logged to <work>/logs/):
      1. the shapes training folder (the diffusion demo's)
      2. cvqd-train ar --init BASE (torchrun, 2 processes on the CPU); BASE: the bundled demo.pt
      3. the validation split, swept over guidance x top-p; 4. the best pair and the guidance range
      5. finalize (fp16, those defaults); 6. cvqd-eval on the test split (the reported figures)
    """
    from cvqd.training.demo_ar import make_demo_ar, recipe_with as ar_recipe_with

    rec = make_demo_ar(work, out, ar_recipe_with(overrides), record or out.with_suffix(".json"))
    if rec["training_seconds"] is not None:
        click.echo(f"trained the generator in {rec['training_seconds'] / 60:.1f} min", err=True)
    click.echo(f"wrote {out}", err=True)


def main() -> None:
    run_command(cli, "cvqd-train")


if __name__ == "__main__":
    main()
