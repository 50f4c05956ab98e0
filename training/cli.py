"""`cvqd-train`: make and train CLIP-VQDiffusion checkpoints."""

from __future__ import annotations

from pathlib import Path

import click

from cvqd.cli_util import run_command
from cvqd.config import PRESETS


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def cli():
    """Train CLIP-VQDiffusion models (VQGAN tokenizer, diffusion transformer, CFG fine-tune)."""


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


def main() -> None:
    run_command(cli, "cvqd-train")


if __name__ == "__main__":
    main()
