"""`cvqd-eval`: measure how well a checkpoint follows prompts (a thin CLI over cvqd.evaluation)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from cvqd import evaluation as ev
from cvqd.cli_util import run_command
from cvqd.errors import CvqdError
from cvqd.io import write_json
from cvqd.machine import provenance
from cvqd.model.checkpoint import load_checkpoint
from cvqd.paths import default_checkpoint

CTX = {"help_option_names": ["-h", "--help"], "max_content_width": 100}

EVAL_EPILOG = """\b
Examples:
  cvqd-eval --ckpt model.pt                                  # shapes benchmark, 16 candidates per prompt
  cvqd-eval --ckpt model.pt -n 1 --guidance 2 --truncation 0.9 --json report.json
  cvqd-eval --ckpt model.pt --sweep-guidance 1,2,3,5 --sweep-truncation 0.8,0.9,1
  cvqd-eval --ckpt model.pt --prompts my_prompts.txt --score-clip-model ViT-B-32 --score-clip-weights vit.pt

A generated folder (cvqd-run --prompt-file P --out DIR/ writes DIR/manifest.jsonl): CLIP score, FID
  cvqd-eval --generated out/ --score-clip-model ViT-B-32 --score-clip-weights vit.pt \
            --reference coco-val2014/ --inception-weights pt_inception-2015-12-05-6726825d.pth --json r.json
  cvqd-eval --generated out/ --reference rendered/ --fd-clip        # the model's own CLIP: score + FD in its space
"""


def _floats(text: str | None, name: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise click.UsageError(f"{name} expects comma-separated numbers, got {text!r}") from None


@click.command(context_settings=CTX, epilog=EVAL_EPILOG)
@click.option("--ckpt", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Checkpoint to evaluate (default: the bundled demo model).")
@click.option("--prompts", default="shapes", show_default=True,
              help="'shapes' (180 prompts: every colour, shape, size, position) or a text file, one prompt per line.")
@click.option("--num-candidates", "-n", type=click.IntRange(min=1), default=16, show_default=True,
              help="Candidates per prompt; reports best-of-1 (candidate 0), the N = 1 accuracy averaged over all "
                   "N candidates ('1 avg': less sampling noise) and best-of-N by CLIP score.")
@click.option("--seed", type=int, default=0, show_default=True, help="Candidate j of a prompt uses seed + j.")
@click.option("--steps", type=int, default=None, help="Sampling steps (default: the model's).")
@click.option("--guidance", type=float, default=None, help="Guidance scale (default: the model's).")
@click.option("--truncation", type=float, default=None, help="Truncation rate (default: the model's).")
@click.option("--sweep-guidance", default=None,
              help="Comma-separated guidance scales to sweep. Each row reports N = 1 accuracy (averaged over the -n "
                   "candidates when -n > 1) and, with -n > 1, best-of-N under best_of_N/.")
@click.option("--sweep-truncation", default=None, help="Comma-separated truncation rates to sweep.")
@click.option("--temperature", type=float, default=None, help="Autoregressive models: temperature (default: model's).")
@click.option("--top-k", type=int, default=None, help="Autoregressive models: top-k (default: the model's).")
@click.option("--top-p", type=float, default=None, help="Autoregressive models: top-p (default: the model's).")
@click.option("--sweep-top-p", default=None, help="Autoregressive models: comma-separated top-p values to sweep.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True, help="Images per batch.")
@click.option("--device", default="cpu", show_default=True, help="torch device.")
@click.option("--clip-weights", type=click.Path(dir_okay=False), default=None,
              help="CLIP weights for checkpoints that do not carry their CLIP.")
@click.option("--score-clip-model", default=None, help="open_clip model for CLIP scores (default: the model's own).")
@click.option("--score-clip-weights", type=click.Path(dir_okay=False), default=None,
              help="Weights file of --score-clip-model.")
@click.option("--save-images", type=click.Path(file_okay=False), default=None,
              help="Folder for one candidate grid per prompt.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None, help="Write the full report here.")
@click.option("--generated", type=click.Path(exists=True, path_type=Path), default=None,
              help="Score a generated set instead of sampling: a folder with cvqd-run's manifest.jsonl, the "
                   "manifest itself, or a folder of images carrying their prompt. Reports the CLIP score (the "
                   "--score-clip-* CLIP, else --ckpt's own) and, with --reference, FID / FD.")
@click.option("--reference", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Folder of reference images (searched recursively) for FID / --fd-clip.")
@click.option("--inception-weights", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="FID Inception weights file (pt_inception-2015-12-05-6726825d.pth, as torch-fidelity and "
                   "pytorch-fid use); nothing is downloaded. Needed for FID.")
@click.option("--fd-clip", is_flag=True, help="Also the Frechet distance in the scoring CLIP's feature space.")
@click.option("--image-size", type=click.IntRange(min=8), default=None,
              help="Resize every image to this square side before the feature networks (default: as stored; "
                   "generated and reference sizes must then agree).")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where reference statistics are cached (default: $CVQD_CACHE/fid or ~/.cache/cvqd/fid).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def eval_cli(ckpt, prompts, num_candidates, seed, steps, guidance, truncation, sweep_guidance, sweep_truncation,
             temperature, top_k, top_p, sweep_top_p, batch_size, device, clip_weights, score_clip_model,
             score_clip_weights, save_images, generated,
             reference, inception_weights, fd_clip, image_size, cache_dir, json_out, quiet):
    """Measure how well a model follows prompts: analyzer accuracy per attribute, CLIP score, best-of-N.

    Accuracy is split into in-distribution prompts and held-out colour/shape combinations (purple triangle,
    orange square, green circle), which the generator never saw in training.
    """
    ckpt = ckpt or default_checkpoint()
    if generated is not None:
        return _eval_folder(ckpt, generated, reference, inception_weights, fd_clip, image_size, cache_dir, batch_size,
                            device, clip_weights, score_clip_model, score_clip_weights, json_out, quiet)
    if reference is not None or inception_weights is not None or fd_clip:
        raise click.UsageError("--reference, --inception-weights and --fd-clip score a generated set: give "
                               "--generated DIR")
    specs = ev.load_prompts(prompts)
    if json_out:  # the report's path is checked before minutes of evaluation, not after
        _check_writable(Path(json_out))
    if save_images:
        _check_writable(Path(save_images) / "x", folder=True)
    prov = provenance(ckpt) if json_out else {}  # command, commit, model sha256, date: taken as the run starts
    if sweep_guidance or sweep_truncation or sweep_top_p:
        model_cfg = load_checkpoint(ckpt).config
        pipe_cfg = model_cfg.sampling
        gs = _floats(sweep_guidance, "--sweep-guidance") or [guidance if guidance is not None else pipe_cfg.guidance]
        if model_cfg.generator == "ar":
            if truncation is not None:
                raise CvqdError("truncation is a diffusion setting; this is an autoregressive (CLIP-GEN) model, "
                                "sampled with guidance, temperature, top_k and top_p")
            rs, ps = _floats(sweep_truncation, "--sweep-truncation") or [], (
                _floats(sweep_top_p, "--sweep-top-p") or [top_p if top_p is not None else pipe_cfg.top_p])
        else:
            rs = _floats(sweep_truncation, "--sweep-truncation") or [truncation if truncation is not None
                                                                     else pipe_cfg.truncation]
            ps = _floats(sweep_top_p, "--sweep-top-p") or None
            if temperature is not None or top_k is not None or top_p is not None:
                raise CvqdError("temperature, top_k and top_p are for autoregressive (CLIP-GEN) models; this is a "
                                "diffusion model")
        rows = ev.sweep(ckpt, gs, rs, specs, num_candidates=num_candidates, seed=seed, steps=steps,
                        batch_size=batch_size, device=device, clip_weights=clip_weights,
                        progress=None if quiet else lambda line: click.echo(line, err=True), top_ps=ps,
                        temperature=temperature, top_k=top_k)
        if json_out:
            write_json(json_out, {**prov, "checkpoint": str(ckpt), "num_candidates": num_candidates,
                                     "sweep": rows})
        click.echo(json.dumps(rows, indent=2))
        return
    bar = None
    if not quiet:
        from tqdm import tqdm

        bar = tqdm(total=len(specs), desc="evaluating", unit="prompt", file=sys.stderr)

    def progress(done: int, total: int) -> None:
        if bar is not None:
            bar.n = done
            bar.refresh()

    report = ev.evaluate(ckpt, specs, num_candidates=num_candidates, seed=seed, steps=steps, guidance=guidance,
                         truncation=truncation, batch_size=batch_size, device=device, clip_weights=clip_weights,
                         score_clip_model=score_clip_model, score_clip_weights=score_clip_weights,
                         save_images=save_images, progress=progress, temperature=temperature, top_k=top_k,
                         top_p=top_p)
    if bar is not None:
        bar.close()
    if json_out:  # provenance first; its machine record gives way to the report's own (taken at the end)
        write_json(json_out, {**prov, **report})
    s = report["settings"]
    knobs = " ".join(f"{k}={s[k]}" for k in ("steps", "guidance", "truncation", "temperature", "top_k", "top_p")
                     if k in s)
    click.echo(f"{ckpt}: {knobs} candidates={s['num_candidates']} prompts={s['prompts']} ({report['seconds']:.0f} s)")
    click.echo(ev.format_table(report))


def _eval_folder(ckpt, generated, reference, inception_weights, fd_clip, image_size, cache_dir, batch_size, device,
                 clip_weights, score_clip_model, score_clip_weights, json_out, quiet) -> None:
    """cvqd-eval --generated: CLIP score / FID / FD of a folder (cvqd.folder_eval)."""
    from cvqd import folder_eval as fe
    from cvqd.io import file_sha256
    from cvqd.paths import cache_root

    if json_out:
        _check_writable(Path(json_out))
    if inception_weights is not None and reference is None:
        raise click.UsageError("--inception-weights computes FID against --reference DIR; give the reference folder")
    if reference is not None and inception_weights is None and not fd_clip:
        raise click.UsageError("--reference needs --inception-weights FILE (FID) and/or --fd-clip")
    if inception_weights is not None:
        fe.inception_network(inception_weights)  # a wrong file fails now, not after the CLIP score
    prov = provenance(ckpt) if json_out else {}
    scorer = ev.Scorer(ckpt, device, score_clip_model, score_clip_weights, clip_weights)
    clip_id = file_sha256(score_clip_weights if score_clip_weights else ckpt)[:16]
    bar = {}

    def progress(stage: str, done: int, total: int) -> None:
        if quiet:
            return
        from tqdm import tqdm

        if stage not in bar:
            for b in bar.values():
                b.close()
            bar[stage] = tqdm(total=total, desc=stage, unit="image", file=sys.stderr)
        bar[stage].n = done
        bar[stage].refresh()

    report = fe.evaluate_folder(generated, reference=reference, scorer=scorer, clip_id=clip_id,
                                inception_weights=inception_weights, fd_clip=fd_clip, size=image_size,
                                cache_dir=cache_dir or cache_root() / "fid", batch=batch_size, device=device,
                                progress=progress)
    for b in bar.values():
        b.close()
    if json_out:
        write_json(json_out, {**prov, **report})
    lines = [f"{generated}: {report['images']} image(s)"]
    if "clip_score" in report:
        c = report["clip_score"]
        lines.append(f"CLIP score {c['mean']:.4f} +- {c['se'] or 0:.4f} (cosine; x100 clipped: "
                     f"{c['clip_score_100']:.2f}) with {c['clip']}")
    if "fid" in report:
        lines.append(f"FID {report['fid']['fd']:.3f} against {reference} ({report['fid']['reference']} images)")
    if "fd_clip" in report:
        lines.append(f"FD in CLIP space {report['fd_clip']['fd']:.5f} against {reference}")
    click.echo("\n".join(lines))


def _check_writable(path: Path, folder: bool = False) -> None:
    import os

    parent = path.parent
    if path.exists() and path.is_dir() and not folder:
        raise CvqdError(f"--json {path} is a directory; expected a file path")
    probe = parent
    while not probe.exists():  # the first existing ancestor must be writable (folders are made when writing)
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise CvqdError(f"cannot write {path if not folder else parent}: {probe} is not a writable directory")


def main() -> None:
    run_command(eval_cli, "cvqd-eval")


if __name__ == "__main__":
    main()
