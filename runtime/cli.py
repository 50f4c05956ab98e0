"""`cvqd-run`: generate images from text prompts."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from cvqd.cli_util import run_command
from cvqd.errors import CvqdError

EPILOG = """\b
Examples:
  cvqd-run --ckpt model.pt --prompt "a small red circle on the left" --seed 0 --out out.png
  cvqd-run --ckpt model.pt --prompt "a blue square" --num-images 4 --steps 25 --out samples/
Each image's generation parameters are stored in its PNG text chunks.
"""


@click.command(epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--prompt", "prompts", multiple=True, help="Text prompt (repeat for several).")
@click.option("--ckpt", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="A cvqd checkpoint (model.pt) to run with the PyTorch backend.")
@click.option("--clip-weights", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="CLIP weights file, for checkpoints that do not carry their CLIP (e.g. the paper preset).")
@click.option("--out", type=click.Path(path_type=Path), default=Path("out.png"), show_default=True,
              help="Output PNG file, or a directory for several images.")
@click.option("--seed", type=int, default=0, show_default=True, help="Image j of each prompt uses seed + j.")
@click.option("--num-images", type=click.IntRange(min=1), default=1, show_default=True, help="Images per prompt.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Images sampled together (each costs two rows per step with guidance).")
@click.option("--steps", type=int, default=None, help="Reverse steps, 1..T (default: the model's). Fewer than T "
              "uses the exact strided posterior.")
@click.option("--guidance", type=float, default=None, help="Classifier-free guidance scale s (1 = none).")
@click.option("--truncation", type=float, default=None, help="Truncation r in (0, 1]: keep the top classes "
              "holding mass r at each position (1 = keep all).")
@click.option("--device", default="cpu", show_default=True, help="torch device for the PyTorch backend.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary on stdout.")
def cli(prompts, ckpt, clip_weights, out, seed, num_images, batch_size, steps, guidance, truncation, device, quiet,
        as_json):
    """Generate images from text prompts with a CLIP-VQDiffusion model.

    The reverse diffusion starts from an all-[MASK] token grid and runs the conditional and null
    (unconditional) rows in one batched forward per step, with classifier-free guidance, truncation and
    the exact mask-and-replace posterior; the VQGAN decoder turns the tokens into pixels.
    """
    from cvqd.runtime.images import save_png
    from cvqd.runtime.pipeline import Pipeline, validate_prompts

    prompts = validate_prompts(list(prompts))
    pipe = Pipeline.from_checkpoint(ckpt, device=device, clip_weights=clip_weights)
    settings = pipe.resolve(steps, guidance, truncation)
    paths = output_paths(out, prompts, num_images, seed)
    bar = None
    if not quiet:
        from tqdm import tqdm

        bar = tqdm(total=1, unit="step", file=sys.stderr, desc="sampling", leave=False)

    def progress(i: int, n: int) -> None:
        if bar is not None:
            bar.total = n
            bar.n = i
            bar.refresh()

    results = pipe.generate(prompts, seed=seed, num_images=num_images, batch_size=batch_size, callback=progress,
                            **settings)
    if bar is not None:
        bar.close()
    for g, path in zip(results, paths):
        save_png(path, g.image, g.params)
    if as_json:
        click.echo(json.dumps({"images": [{"path": str(p), **g.params} for g, p in zip(results, paths)]}, indent=2))
    elif not quiet:
        for p in paths:
            click.echo(str(p), err=True)


def output_paths(out: Path, prompts: list[str], num_images: int, seed: int) -> list[Path]:
    """Deterministic file names: `out` itself for one image, else numbered files (or names in a directory)."""
    from cvqd.runtime.images import slug

    total = len(prompts) * num_images
    is_dir = out.is_dir() or out.suffix.lower() != ".png"
    if is_dir:
        if out.exists() and not out.is_dir():
            raise CvqdError(f"--out {out} exists and is not a directory; expected a .png path or a directory")
        out.mkdir(parents=True, exist_ok=True)
        return [out / f"{i:03d}-{slug(p)}-s{seed + j}.png"
                for i, p in enumerate(prompts) for j in range(num_images)]
    if not out.parent.exists():
        raise CvqdError(f"cannot write {out}: directory {out.parent} does not exist")
    if total == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{k:03d}.png") for k in range(total)]


def main() -> None:
    run_command(cli, "cvqd-run")


if __name__ == "__main__":
    main()
