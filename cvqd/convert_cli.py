"""`cvqd-convert`: the authors' released CLIP-VQDiffusion files -> a cvqd checkpoint (cvqd/model/official.py)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from cvqd.cli_util import run_command
from cvqd.errors import CvqdError

PROG = "cvqd-convert"

EPILOG = """\b
Examples:
  cvqd-convert --config configs/coco_finetune.yaml --diffusion clipvq_coco.pt \\
      --vqgan coco_vqgan_99epoch.ckpt --vqgan-config taming_f16_4096_coco.yaml --clip ViT-B-32.pt --out coco.pt
  cvqd-convert ... --diffusion OUTPUT/ffhq/checkpoint/last.pth --out ffhq.pt     # a training checkpoint: its EMA
  cvqd-run --ckpt coco.pt --prompt "a bowl of fruit on a table"                  # then like any cvqd model
\b
What comes from where: sizes, K, the grid and the sampling defaults (guidance_scale, truncation_r, times as the
best-of count, 100 steps) from --config; the VQGAN's sizes from --vqgan-config; the CLIP architecture from the
weights' shapes (OpenAI's ViT-B/32 becomes open_clip's ViT-B-32-quickgelu). Nothing is inferred from file names.
The official inference feeds the learned null embedding raw (training normalised it); the converted model does
the same unless --normalize-null. Every tensor is accounted for: an unknown, missing or mis-shaped key stops the
conversion with its name, and no output is written.
"""


@click.command(epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--config", "config", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The official diffusion YAML (like configs/ffhq_finetune.yaml).")
@click.option("--diffusion", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The released diffusion file (clipvq_*.pt, a DiffusionTransformer state dict) or a training "
              "checkpoint (last.pth: its 'ema' weights are used, else 'model').")
@click.option("--vqgan", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The taming-transformers Gumbel VQGAN Lightning checkpoint (*_vqgan_99epoch.ckpt).")
@click.option("--vqgan-config", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Its taming YAML (taming_f16_4096_*.yaml).")
@click.option("--clip", "clip", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="OpenAI's CLIP weights (ViT-B/32: a state dict or OpenAI's TorchScript archive).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The cvqd checkpoint to write (atomically).")
@click.option("--normalize-null/--raw-null", default=False, show_default=True,
              help="Use the null embedding L2-normalised, as training fed it (default: raw, as the official "
              "inference does, so samples match the official code).")
@click.option("--no-embed-clip", is_flag=True, help="Leave CLIP out of the checkpoint (then pass --clip-weights to "
              "cvqd-run / cvqd-export); by default it is stored inside, so the checkpoint runs on its own.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No messages (errors still go to stderr).")
def cli(config, diffusion, vqgan, vqgan_config, clip, out, normalize_null, no_embed_clip, force, as_json, quiet):
    """Convert the authors' released CLIP-VQDiffusion model into a cvqd checkpoint.

    The output is a normal cvqd checkpoint: cvqd-export turns it into a plan, cvqd-run runs it, cvqd-eval
    evaluates it. Query/key/value weights are fused, the taming decoder's levels reordered and the VQGAN's
    quant_conv folded into the quantizer's projection, exactly; the official schedule buffers are checked against
    cvqd's tables.
    """
    from cvqd.model.official import convert

    t0 = time.perf_counter()
    if out.exists() and not force:
        raise CvqdError(f"{out} exists; pass --force to replace it")
    if out.exists() and out.is_dir():
        raise CvqdError(f"{out} is a directory; expected a checkpoint file path")
    if not out.parent.is_dir():
        raise CvqdError(f"cannot write {out}: directory {out.parent} does not exist")
    model, report = convert(config, diffusion, vqgan, vqgan_config, clip, normalize_null=normalize_null,
                            embed_clip=not no_embed_clip)
    from cvqd.model.checkpoint import save_checkpoint

    meta = {"converted_from": {"config": config.name, "diffusion": diffusion.name, "diffusion_part": report[
        "diffusion_part"], "vqgan": vqgan.name, "vqgan_config": vqgan_config.name, "clip": clip.name},
            "converter": "cvqd-convert"}
    save_checkpoint(out, model.to_checkpoint(stage="converted", meta=meta, include_clip=not no_embed_clip))
    report.update(out=str(out), seconds=round(time.perf_counter() - t0, 2))
    if as_json:
        click.echo(json.dumps(report, indent=2))
    elif not quiet:
        s = report["sampling"]
        click.echo(f"{PROG}: wrote {out}: transformer {report['transformer_params']:,} + VQGAN "
                   f"{report['vqgan_params']:,} + CLIP {report['clip_params']:,} parameters "
                   f"({'inside' if not no_embed_clip else 'not stored: pass --clip-weights'}); diffusion weights "
                   f"from its {report['diffusion_part']}; null embedding "
                   f"{'normalised' if normalize_null else 'raw'} (norm {report['null_norm']:.3g}); defaults: "
                   f"{s['steps']} steps, guidance {s['guidance']:g}, truncation {s['truncation']:g}, best of "
                   f"{s['best_of']} ({report['seconds']:.1f} s)", err=True)


def main() -> None:
    run_command(cli, PROG)


if __name__ == "__main__":
    main()
