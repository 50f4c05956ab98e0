"""`cvqd-run`: generate images from text prompts (a thin CLI over runtime/pipeline.py)."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path

import click

from cvqd.cli_util import one_line, run_command
from cvqd.errors import CvqdError

PROG = "cvqd-run"

EPILOG = """\b
Examples:
  cvqd-run --prompt "a small red circle on the left"                 # bundled demo model, ONNX Runtime CPU
  cvqd-run --engine demo.plan --prompt "a blue square" --num-images 4 --out samples/
  cvqd-run --ckpt model.pt --backend torch --device cuda --prompt "a green triangle" --steps 50
  cvqd-run --prompt-file prompts.txt --best-of 8 --grid --out sheet.png --json
  cvqd-run --image shape.png --num-images 4 --out variations/                 # variations of an image
  cvqd-run --interpolate "a large red square in the center" blue.png --frames 8 --grid --out sheet.png
  cvqd-run --image red.png --edit-from "a red circle" --edit-to "a blue circle" --strength 0.7
  cvqd-run --image scene.png --mask right --prompt "a small red square on the right"   # token editing
  cvqd-run --image red.png --prompt "a large blue square in the center" --renoise 0.8  # global edit
  cvqd-run --engine ar.plan --prompt "a red circle" --top-p 0.9 --temperature 0.8   # an autoregressive plan
  cvqd-run --bundled demo-ar --prompt "a small red circle on the left"   # the bundled CLIP-GEN demo
\b
Models: --engine PLAN_DIR (made by cvqd-export) and/or --ckpt MODEL.pt (plan backends export it once into
$CVQD_CACHE, default ~/.cache/cvqd); with neither, the bundled demo plan (torch: the bundled checkpoint). Backends: onnxruntime (CPU, or CUDA with
onnxruntime-gpu), torch (a checkpoint; CUDA graphs and fused sampling kernels on a GPU), tensorrt (the plan's
engines; unverified: only when asked for, with a warning); auto picks the fastest tested backend available here
and says which on stderr.
\b
Outputs: one image -> --out itself (default out.png; .png, .jpg or .jpeg); several -> numbered files, or
names NNN-<prompt>-s<seed>.png inside --out when it is a directory (exists, ends in /, or has no extension).
Every image carries its generation parameters (prompt, seed, steps, guidance, truncation, model hash, backend):
PNG text chunks, or EXIF ImageDescription in JPEGs. Prompts into a directory also write DIR/manifest.jsonl, and
a rerun keeps the files that already hold the requested image (--overwrite makes them again).
\b
Several processes (torchrun) share a prompt set written into a directory; each image is the same whatever the
number of processes (docs/evaluation.md):
  torchrun --nproc_per_node 8 -m cvqd.runtime.cli --ckpt model.pt --prompt-file prompts.txt --out gen/
"""


@click.command(epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--prompt", "prompts", multiple=True, help="Text prompt (repeat for several).")
@click.option("--prompt-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="UTF-8 text file with one prompt per line (blank lines and lines starting with # are skipped).")
@click.option("--engine", type=click.Path(path_type=Path), default=None,
              help="Plan directory made by cvqd-export (ONNX graphs, TensorRT engines, manifest).")
@click.option("--ckpt", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="A cvqd checkpoint (model.pt): the torch backend runs it; plan backends export it once.")
@click.option("--bundled", type=click.Choice(["demo", "demo-ar"]), default=None,
              help="A bundled model instead of --engine/--ckpt: demo (CLIP-VQDiffusion, the default) or demo-ar "
              "(CLIP-GEN, autoregressive, same VQGAN and CLIP).")
@click.option("--backend", type=click.Choice(["auto", "onnxruntime", "tensorrt", "torch"]), default="auto",
              show_default=True, help="How to run the networks; auto = the fastest tested backend available here "
              "(never tensorrt).")
@click.option("--device", default=None, help="cpu, cuda or cuda:N (default: onnxruntime on cpu, tensorrt on cuda, "
              "torch on cuda if there is a GPU, else cpu; auto picks both).")
@click.option("--precision", type=click.Choice(["auto", "fp32", "fp16", "bf16"]), default="auto", show_default=True,
              help="torch: autocast dtype of the denoiser (auto = bf16 on GPUs, fp32 on CPU); plans: require this "
              "plan precision (a checkpoint's plan is exported at it).")
@click.option("--clip-weights", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="CLIP weights file, for checkpoints that do not carry their CLIP (e.g. the paper preset).")
@click.option("--out", default="out.png", show_default=True,
              help="Output image (.png, .jpg or .jpeg), or a directory (an existing one, a path ending in /, or a "
              "name without an extension) for one file per image.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Image j of each prompt uses seed + j; seeds are 64-bit, in [0, 2^64).")
@click.option("--num-images", type=click.IntRange(min=1), default=1, show_default=True, help="Images per prompt.")
@click.option("--batch-size", type=int, default=8, show_default=True,
              help="Images sampled together (each costs two denoiser rows per step with guidance).")
@click.option("--steps", type=int, default=None, help="Reverse steps, 1..T (default: the model's). Fewer than T "
              "uses the exact strided posterior.")
@click.option("--guidance", type=float, default=None, help="Classifier-free guidance scale s in [0, 50] (1 = none).")
@click.option("--truncation", type=float, default=None, help="Truncation r in (0, 1]: keep the top classes "
              "holding mass r at each position (1 = keep all).")
@click.option("--temperature", type=float, default=None,
              help="Autoregressive models: divide the token log-probs by T in [0, 10] (0 = greedy; default: the "
              "model's).")
@click.option("--top-k", type=int, default=None, help="Autoregressive models: sample among the k most likely tokens "
              "(0 = all; default: the model's).")
@click.option("--top-p", type=float, default=None, help="Autoregressive models: sample among the most likely tokens "
              "holding mass p in (0, 1] (1 = all; default: the model's).")
@click.option("--best-of", type=int, default=None,
              help="Sample N candidates per image and keep the best by CLIP text-image score (the paper's protocol); "
              "default: the model's (1 for cvqd-trained models; a converted official model brings its `times`).")
@click.option("--grid", is_flag=True, help="Write one contact sheet of all images (to --out) instead of files.")
@click.option("--kernels", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="Fused CUDA sampling kernels on GPUs (auto: use them if NVRTC can build them).")
@click.option("--cuda-graphs", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="Capture the reverse step in a CUDA graph (auto: on GPUs with torch or tensorrt).")
@click.option("--image", "images", type=click.Path(dir_okay=False, path_type=Path), multiple=True,
              help="Variations: condition on this image's CLIP image embedding (repeatable; --num-images each). With "
              "--edit-from/--edit-to: the image to move toward a text.")
@click.option("--interpolate", nargs=2, default=None, metavar="A B",
              help="Interpolate from A to B, each a prompt or an image file: --frames images along the great circle "
              "between their CLIP embeddings, all with --seed.")
@click.option("--frames", type=click.IntRange(min=2), default=8, show_default=True, help="Frames of --interpolate.")
@click.option("--edit-from", default=None, help="Text diff: the text describing --image now (with --edit-to).")
@click.option("--edit-to", default=None, help="Text diff: the text to move --image toward.")
@click.option("--strength", type=float, default=0.5, show_default=True,
              help="Text diff: how far along the great circle toward the text direction, in [0, 1].")
@click.option("--mask", default=None, metavar="REGION",
              help="Token editing of --image for --prompt: regenerate the tokens in REGION (left, right, top, bottom, "
              "center, a pixel box x0,y0,x1,y1, or a mask image file: white = regenerate), keep the others exactly. "
              "Works on every backend whose model has the VQ encoder (plans exported by this cvqd, checkpoints).")
@click.option("--renoise", type=float, default=None, metavar="STRENGTH",
              help="Global edit of --image for --prompt: re-noise its tokens to step STRENGTH x (T-1), in (0, 1], and "
              "denoise from there (small: keep the layout; 1: a fresh sample).")
@click.option("--overwrite", is_flag=True,
              help="With --out DIR: make every image again. Without it, files that already hold the image asked for "
                   "(same prompt, seed, settings and model, read from the file) are kept, so a cut run resumes.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or messages (errors still go to stderr).")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary on stdout.")
def cli(prompts, prompt_file, engine, ckpt, bundled, backend, device, precision, clip_weights, out, seed, num_images,
        batch_size, steps, guidance, truncation, temperature, top_k, top_p, best_of, grid, kernels, cuda_graphs,
        images, interpolate, frames, edit_from, edit_to, strength, mask, renoise, overwrite, quiet, as_json):
    """Generate images from text prompts with a CLIP-VQDiffusion model (or from images: variations,
    interpolations, text diffs, token and global edits; see the examples below).

    The reverse diffusion starts from an all-[MASK] token grid; each step runs the conditional and null
    rows in one batched forward, then classifier-free guidance, truncation, the exact mask-and-replace
    posterior and Gumbel-max sampling (counter-based Philox noise: the same seed gives the same image on
    every backend, up to the networks' numerics). The VQGAN decoder turns the tokens into pixels.
    Autoregressive (CLIP-GEN) plans draw the tokens one by one in raster order instead (a KV cache keeps each
    step to one token's work), with --guidance, --temperature, --top-k and --top-p.
    Images are written as they are finished; Ctrl-C keeps the ones already written.
    """
    t0 = time.perf_counter()
    from cvqd.runtime.shard import Ranks

    ranks = Ranks.from_env()  # torchrun: this process's share of a prompt set; else world size 1
    console = Console(quiet or not ranks.main)
    say, warn = console.say, console.warn
    try:
        _run(ranks, console, t0, prompts, prompt_file, engine, ckpt, bundled, backend, device, precision,
             clip_weights, out,
             seed, num_images, batch_size, steps, guidance, truncation, best_of, grid, kernels, cuda_graphs, images,
             interpolate, frames, edit_from, edit_to, strength, mask, renoise, overwrite, quiet, as_json,
             {"temperature": temperature, "top_k": top_k, "top_p": top_p})
    finally:
        ranks.close()


def _run(ranks, console, t0, prompts, prompt_file, engine, ckpt, bundled, backend, device, precision,
         clip_weights, out,
         seed, num_images, batch_size, steps, guidance, truncation, best_of, grid, kernels, cuda_graphs, images,
         interpolate, frames, edit_from, edit_to, strength, mask, renoise, overwrite, quiet, as_json, ar_settings):
    say, warn = console.say, console.warn

    from cvqd.paths import default_checkpoint, default_model_override
    from cvqd.runtime.pipeline import (MAX_BEST_OF, check_ar_settings, check_seed, check_settings, load_bundled_plan,
                                       load_pipeline, resolve_settings, validate_prompts)

    prompts_given = list(prompts)
    mode = condition_mode(prompts, prompt_file, images, interpolate, edit_from, edit_to, strength, mask, renoise)
    if mode == "prompts":
        prompts = validate_prompts(list(prompts) + read_prompt_file(prompt_file))
    else:
        for path in images:  # unreadable images fail now, before any model is loaded
            from cvqd.runtime.pipeline import image_array

            image_array(path)
        if mask is not None or renoise is not None:
            validate_prompts(prompts_given)
        prompts = [mode]  # names of outputs are planned once the conditions are known
    if batch_size < 1:
        raise CvqdError(f"--batch-size must be >= 1, got {batch_size}")
    if best_of is not None and not 1 <= best_of <= MAX_BEST_OF:
        raise CvqdError(f"--best-of must be in 1..{MAX_BEST_OF}, got {best_of}")
    check_seed(seed, num_images * (best_of or 1))
    first = output_targets(out, prompts, num_images, seed, best_of or 1, grid)  # checked before any heavy work
    folder = first.get("folder") if mode == "prompts" and not grid else None
    if ranks.world > 1 and folder is None:
        raise CvqdError(f"several processes ({ranks.world}, torchrun) share a prompt set written into a folder: give "
                        f"--prompt/--prompt-file and --out DIR/ (no --grid, no image conditions)")
    device = ranks.device(device)
    plan = None
    if bundled is not None and (engine is not None or ckpt is not None):
        raise CvqdError("--bundled names a model itself; drop --engine/--ckpt (or --bundled)")
    if bundled is not None and backend == "torch":
        from cvqd.paths import bundled_model

        ckpt = bundled_model(bundled)
    elif engine is None and ckpt is None and bundled is None and (default_model_override() is not None
                                                                  or backend == "torch"):
        ckpt = default_checkpoint()
    if engine is None and ckpt is None:
        plan = load_bundled_plan(bundled or "demo")
    elif engine is not None:
        from cvqd.model.plan import load_plan

        plan = load_plan(engine)
    if plan is not None:
        resolve_settings(plan.config, steps, guidance, truncation, **ar_settings)  # range errors before any loading
    else:
        check_settings(steps, guidance, truncation)  # steps against the model's T once it is loaded
        check_ar_settings(**ar_settings)

    def plan_for(path: Path, plan_precision: str):
        """A plan for a checkpoint: exported once into the cache by the export package, then reused."""
        try:
            from cvqd.export.cache import cached_plan
        except ImportError as exc:
            raise CvqdError(f"running --ckpt on a plan backend needs the export package ({exc}; pip install "
                            f"'cvqd[train]'); pass --engine PLAN_DIR or --backend torch") from None
        return cached_plan(path, precision=plan_precision, notify=say)

    pipe = load_pipeline(plan=plan, ckpt=ckpt, backend=backend, device=device,
                         precision=None if precision == "auto" else precision, clip_weights=clip_weights,
                         kernels=kernels, graphs=cuda_graphs, warn=warn, plan_for=plan_for)
    settings = pipe.resolve(steps, guidance, truncation, **ar_settings)
    pipe.check_batch(batch_size)
    best_of = pipe.config.sampling.best_of if best_of is None else best_of  # the model's default
    check_seed(seed, num_images * best_of)
    jobs = None
    if mode == "prompts":
        targets = output_targets(out, prompts, num_images, seed, best_of, grid)
    else:
        jobs = plan_condition_jobs(pipe, mode, images, interpolate, frames, edit_from, edit_to, strength, num_images,
                                   seed, mask=mask, prompt=(list(prompts_given)[0] if prompts_given else None),
                                   renoise=renoise)
        check_seed(seed, (max(jobs["index"]) + 1) * best_of)
        targets = output_targets(out, jobs["labels"], 1, seed, best_of, grid,
                                 seeds=[seed + i * best_of for i in jobs["index"]])
    if backend != "auto":
        d = pipe.describe()
        say(f"backend {d['backend']} on {d['device']} ({d['precision']}, step: {d['step']})")
    else:
        say(pipe.selection)

    if folder is not None:
        return _run_folder(pipe, ranks, console, prompts, folder, num_images, seed, best_of, batch_size, settings,
                           overwrite, as_json, quiet)
    results, written = [], []
    try:
        with console.progress("sampling") as progress:
            stream = (pipe.iter_generate(prompts, seed=seed, num_images=num_images, batch_size=batch_size,
                                         best_of=best_of, callback=progress, **settings) if jobs is None else
                      pipe.generate_from(**jobs, batch_size=batch_size, best_of=best_of, callback=progress,
                                         **settings))
            for g in stream:
                results.append(g)
                if not grid:
                    path = targets["images"][g.position]
                    save_image(path, g.image, g.params)
                    written.append(path)
    except KeyboardInterrupt:
        total = len(targets.get("images", [])) if not grid else 1
        raise CvqdInterrupted(f"interrupted; {len(written)} of {total} image(s) written"
                              + (f" (the last: {written[-1]})" if written else "")) from None
    if grid:
        write_grid(results, targets["grid"])
        written = [targets["grid"]]
    summary = {"backend": pipe.describe(), "seconds": round(time.perf_counter() - t0, 3),
               "images": [{"path": str(targets["grid"] if grid else p), **g.params}
                          for g, p in zip(results, written * len(results) if grid else written)]}
    if grid:
        summary["grid"] = str(targets["grid"])
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    elif not quiet:
        for p in written:
            click.echo(str(p), err=True)


def _run_folder(pipe, ranks, console, prompts, folder, num_images, seed, best_of, batch_size, settings, overwrite,
                as_json, quiet) -> None:
    """Prompts into a directory: resumable, shared among torchrun's processes, with a manifest (runtime/shard.py)."""
    from cvqd.runtime.shard import generate_folder

    written: list[Path] = []
    plan = [0]  # images this process has to make

    def planned(todo: int, kept: int) -> None:
        plan[0] = todo

    try:
        with console.progress("sampling" if ranks.world == 1 else f"sampling (rank 0 of {ranks.world})") as progress:
            summary = generate_folder(pipe, prompts, folder, num_images=num_images, seed=seed, best_of=best_of,
                                      batch_size=batch_size, ranks=ranks, overwrite=overwrite, callback=progress,
                                      on_image=lambda g, path: written.append(path), on_plan=planned, **settings)
    except KeyboardInterrupt:
        raise CvqdInterrupted(f"interrupted; {len(written)} of {plan[0]} image(s) written"
                              + (f" (the last: {written[-1]})" if written else "")
                              + "; the same command makes the rest") from None
    if not ranks.main:
        return
    records = summary.pop("records")
    if as_json:
        click.echo(json.dumps({"backend": pipe.describe(), **summary,
                               "images": [{"path": str(Path(folder) / r["file"]), **r} for r in records]}, indent=2))
        return
    rate = f", {summary['images_per_s']} images/s" if summary["images_per_s"] else ""
    kept = f"; kept {summary['kept']} already made with these settings" if summary["kept"] else ""
    procs = f" over {ranks.world} processes" if ranks.world > 1 else ""
    console.say(f"made {summary['made']} of {summary['total']} image(s) in {summary['seconds']:.1f} s{rate}{procs}"
                f"{kept}; manifest: {summary['manifest']}")
    if not quiet:
        for p in written:
            click.echo(str(p), err=True)


class CvqdInterrupted(CvqdError):
    """Ctrl-C during generation: what was finished is on disk (exit status 130)."""

    exit_code = 130


class Console:
    """stderr messages and the progress bar, kept apart: a message while the bar is drawn is written above it
    (tqdm.write), never glued onto its line. quiet: no bar, no messages (warnings still show)."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.bar = None

    def _echo(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            click.echo(text, err=True)

    def say(self, msg: str) -> None:
        if not self.quiet:
            self._echo(f"{PROG}: {one_line(msg)}")

    def warn(self, msg: str) -> None:
        self._echo(f"{PROG}: warning: {one_line(msg)}")

    @contextlib.contextmanager
    def progress(self, desc: str):
        """A callback(done, total) drawing a bar of reverse steps; the bar appears with the first call (total known
        from the start) and is cleared at the end, so what follows stands on its own line."""
        def update(done: int, total: int) -> None:
            if self.quiet:
                return
            if self.bar is None:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="step", file=sys.stderr, desc=desc, leave=False, dynamic_ncols=True)
            self.bar.total = total
            self.bar.update(done - self.bar.n)

        try:
            yield update
        finally:
            if self.bar is not None:
                self.bar.close()
                self.bar = None


# --------------------------------------------------------------------------------------------- inputs

def read_prompt_file(path: Path | None) -> list[str]:
    """Prompts of a UTF-8 file, one per line; blank lines and # comments skipped."""
    if path is None:
        return []
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CvqdError(f"cannot read --prompt-file {path}: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CvqdError(f"--prompt-file {path} is not UTF-8 text (invalid byte 0x{data[exc.start]:02x} at offset "
                        f"{exc.start}); save it as UTF-8") from None
    lines = [ln.strip() for ln in text.splitlines()]
    prompts = [ln for ln in lines if ln and not ln.startswith("#")]
    if not prompts:
        raise CvqdError(f"--prompt-file {path} holds no prompt (every line is blank or a # comment)")
    return prompts


# -------------------------------------------------------------------------------------------- outputs

def condition_mode(prompts, prompt_file, images, interpolate, edit_from, edit_to, strength, mask=None,
                   renoise=None) -> str:
    """Which kind of request the options make: "prompts", "variations", "interpolation", "text_diff", "edit" or
    "global_edit"; a one-line error for combinations that do not make one."""
    text = bool(prompts) or prompt_file is not None
    if renoise is not None:
        if mask is not None or len(images) != 1 or len(prompts) != 1 or prompt_file is not None or interpolate \
                or edit_from is not None:
            raise CvqdError("a global edit takes one --image, one --prompt and --renoise STRENGTH (no --mask)")
        if not 0 < renoise <= 1:
            raise CvqdError(f"--renoise must be in (0, 1], got {renoise}")
        return "global_edit"
    if mask is not None:
        if len(images) != 1 or len(prompts) != 1 or prompt_file is not None or interpolate or edit_from is not None:
            raise CvqdError("token editing takes one --image, one --prompt and --mask REGION")
        return "edit"
    if (edit_from is None) != (edit_to is None):
        raise CvqdError("a text diff needs both --edit-from and --edit-to (what the image shows, what it should)")
    if interpolate is not None:
        if any(str(end).startswith("--") or not str(end).strip() for end in interpolate):
            raise CvqdError(f"--interpolate needs two ends, each a prompt or an image file (A B), got "
                            f"{list(interpolate)}")
        if text or images or edit_from is not None:
            raise CvqdError("--interpolate A B takes its two ends itself; drop --prompt/--prompt-file/--image/--edit-*")
        return "interpolation"
    if edit_from is not None:
        if len(images) != 1 or text:
            raise CvqdError("a text diff (--edit-from/--edit-to) moves exactly one --image; drop --prompt")
        if not 0 <= strength <= 1:
            raise CvqdError(f"--strength must be in [0, 1], got {strength}")
        return "text_diff"
    if images:
        if text:
            raise CvqdError("--image (variations) and --prompt are two kinds of request; give one of them")
        return "variations"
    return "prompts"


def plan_condition_jobs(pipe, mode: str, images, interpolate, frames, edit_from, edit_to, strength, num_images,
                        seed, mask=None, prompt=None, renoise=None) -> dict:
    """The conditions, labels and seeds of a variations / interpolation / text-diff / edit request."""
    import numpy as np

    if mode == "global_edit":
        return pipe.renoise_jobs(images[0], prompt, strength=renoise, num_images=num_images, seed=seed)
    if mode == "edit":
        return pipe.edit_jobs(images[0], mask, prompt, num_images=num_images, seed=seed)
    if mode == "interpolation":
        return pipe.interpolation_jobs(interpolate[0], interpolate[1], frames=frames, seed=seed)
    if mode == "text_diff":
        return pipe.text_diff_jobs(images[0], edit_from, edit_to, strength=strength, num_images=num_images,
                                   seed=seed)
    parts = [pipe.variation_jobs(path, num_images=num_images, seed=seed) for path in images]
    return {"conditions": np.concatenate([p["conditions"] for p in parts]), "seed": seed,
            "labels": [x for p in parts for x in p["labels"]], "index": [x for p in parts for x in p["index"]],
            "extra": [x for p in parts for x in p["extra"]]}


def output_targets(out: str | Path, prompts: list[str], num_images: int, seed: int, best_of: int = 1,
                   grid: bool = False, seeds: list[int] | None = None) -> dict:
    """Deterministic output paths, checked for writability before any sampling (nothing half-written later).

    --out is a directory when it exists as one, ends with a path separator, or has no extension; otherwise it is
    an image file (.png, .jpg, .jpeg; anything else is an error). One image goes to that file; several get
    numbered files beside it (out-000.png, ...), or NNN-<prompt>-s<seed>.<ext> inside a directory, with the index
    and the seed zero-padded to a common width so the names sort in generation order.
    """
    from cvqd.images import image_format, slug

    text = str(out)
    path = Path(text)
    is_dir = path.is_dir() or text.endswith(("/", os.sep)) or not path.suffix
    if is_dir and path.exists() and not path.is_dir():
        raise CvqdError(f"--out {path} exists and is not a directory; expected an image path or a directory")
    if not is_dir:
        image_format(path)  # .png / .jpg / .jpeg, else a one-line error
    if is_dir:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CvqdError(f"cannot create output directory {path}: {exc.strerror or exc}") from None
        folder = path
    else:
        folder = path.parent if str(path.parent) else Path(".")
        if not folder.is_dir():
            raise CvqdError(f"cannot write {path}: directory {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CvqdError(f"cannot write to {folder}: permission denied")
    total = len(prompts) * num_images
    stride = best_of  # image j's chosen seed is decided later; names use the first candidate's seed
    per_image = seeds  # explicit seeds, one per entry of `prompts` (conditions other than prompts)
    seeds = [seed + j * stride for j in range(num_images)]
    iw, sw = max(3, len(str(total - 1))), len(str(max(per_image or seeds)))
    if grid:
        return {"grid": folder / f"grid-{slug(prompts[0])}-s{seed}.png" if is_dir else path}
    if is_dir and per_image is not None:
        names = [folder / f"{i:0{iw}d}-{slug(p)}-s{s:0{sw}d}.png" for i, (p, s) in enumerate(zip(prompts, per_image))]
    elif is_dir:
        from cvqd.runtime.shard import folder_names

        names = folder_names(folder, prompts, num_images, seeds)
    elif total == 1:
        names = [path]
    else:
        names = [path.with_name(f"{path.stem}-{k:0{iw}d}{path.suffix}") for k in range(total)]
    return {"images": names, "folder": folder if is_dir else None}


def write_grid(results, path: Path) -> None:
    """One contact sheet of all images, with the shared parameters and every prompt and seed embedded."""
    from cvqd.images import grid as make_grid, save_image

    params = {"prompts": [g.prompt for g in results], "seeds": [g.seed for g in results], "grid": True,
              **{k: v for k, v in results[0].params.items() if k not in ("prompt", "seed", "clip_score")}}
    save_image(path, make_grid([g.image for g in results]), params)


def save_image(path: Path, image, params) -> None:
    from cvqd.images import save_image as _save

    _save(path, image, params)


# Python parameter names in the library's messages -> this command's flags
FLAGS = {"kernels='on'": "--kernels on", "backend='torch' / 'tensorrt'": "--backend torch / tensorrt",
         "backend='torch'": "--backend torch", "device='cpu'": "--device cpu", "device='cuda'": "--device cuda",
         "ckpt=": "--ckpt ", "batch_size": "--batch-size", "num_images": "--num-images", "best_of": "--best-of", "steps": "--steps",
         "guidance": "--guidance", "truncation": "--truncation", "seed": "--seed", "top_k": "--top-k",
         "top_p": "--top-p", "temperature": "--temperature"}


def main() -> None:
    run_command(cli, PROG, flags=FLAGS)


if __name__ == "__main__":
    main()
