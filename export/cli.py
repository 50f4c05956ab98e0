"""`cvqd-export`: turn a checkpoint into a plan directory the runtime runs without training code."""

from __future__ import annotations

import json
from pathlib import Path

import click

from cvqd.cli_util import run_command
from cvqd.errors import CvqdError

EPILOG = """\b
Examples:
  cvqd-export --ckpt model.pt                          # -> model.plan/ (fp32 ONNX graphs, validated)
  cvqd-export --ckpt model.pt --precision fp16 --out model-fp16.plan
  cvqd-export --ckpt paper.pt --clip-weights ViT-B-32.pt --out paper.plan
  cvqd-export --ckpt model.pt --trt                    # also TensorRT engines (needs TensorRT and a GPU)
  cvqd-export --plan model.plan --trt [--force]        # add (or rebuild) engines for this GPU
  cvqd-export --plan model.plan --verify               # check every file's sha256 against the manifest
\b
A plan holds clip_text, clip_image, transformer and vq_decoder as ONNX graphs with a dynamic batch
dimension, and manifest.json: model config, schedule, null embedding, tokenizer, I/O contracts, file
hashes, versions and the parity of every graph against PyTorch. Run it with: cvqd-run --engine PLAN.
"""


@click.command(epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--ckpt", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Checkpoint (model.pt) to export.")
@click.option("--plan", "plan_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="An existing plan directory, for --trt (add engines) or --verify.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Plan directory to write [default: next to the checkpoint, NAME.plan or NAME-fp16.plan].")
@click.option("--precision", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True,
              help="Weights and arithmetic of the graphs. fp16 keeps norms and softmax in fp32; graph inputs and "
                   "outputs are int64/float32 either way.")
@click.option("--clip-weights", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="CLIP weights file, for checkpoints that do not carry their CLIP (e.g. the paper preset).")
@click.option("--max-images", type=click.IntRange(1, 256), default=8, show_default=True,
              help="Most images sampled together; sets the max batch of the I/O contracts (TensorRT profiles use "
                   "it; ONNX graphs take any batch).")
@click.option("--force", is_flag=True, help="Replace an existing plan (or its engines). The old plan stays until "
              "the new one is complete.")
@click.option("--trt", is_flag=True, help="Build TensorRT engines (one per component) for this GPU.")
@click.option("--timing-cache", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="TensorRT timing cache file, reused across builds [default: $CVQD_CACHE or ~/.cache/cvqd/trt/].")
@click.option("--workspace-gib", type=float, default=8.0, show_default=True, help="TensorRT workspace limit.")
@click.option("--opt-level", type=click.IntRange(0, 5), default=3, show_default=True,
              help="TensorRT builder optimisation level (higher: longer builds, maybe faster engines).")
@click.option("--verify", is_flag=True, help="With --plan: check every file against the manifest's sha256.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar (the summary and the verification line stay).")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary on stdout.")
def cli(ckpt, plan_dir, out, precision, clip_weights, max_images, force, trt, timing_cache, workspace_gib, opt_level,
        verify, quiet, as_json):
    """Export a CLIP-VQDiffusion checkpoint to a plan directory of validated ONNX graphs.

    Every graph passes onnx.checker and is compared with PyTorch on ONNX Runtime (CPU) at two batch sizes
    before the plan is written; the plan appears atomically (built in a temporary directory next to it).
    """
    if (ckpt is None) == (plan_dir is None):
        raise CvqdError("give either --ckpt MODEL.pt (export a checkpoint) or --plan DIR (an existing plan)")
    trt_options = None
    if trt:
        from cvqd.export.trt_build import TrtOptions

        trt_options = TrtOptions(workspace_gib=workspace_gib, opt_level=opt_level, timing_cache=timing_cache)
    if plan_dir is not None:
        if not (trt or verify):
            raise CvqdError("with --plan, say what to do: --trt (build engines) or --verify (check file hashes)")
        if out is not None:
            raise CvqdError("--out goes with --ckpt; --plan DIR is updated in place (atomically)")
        from cvqd.model.plan import load_plan

        if trt:
            from cvqd.export.trt_build import add_engines

            plan = add_engines(plan_dir, force=force, options=trt_options, progress=not quiet)
        if verify:
            plan = load_plan(plan_dir, verify=True)  # PlanError (one line, exit 2) on the first mismatch
    else:
        from cvqd.export import export_plan

        if not ckpt.is_file():
            raise CvqdError(f"checkpoint not found: {ckpt}")
        out = out or default_out(ckpt, precision)
        plan = export_plan(ckpt, out, precision, clip_weights=clip_weights, force=force, max_images=max_images,
                           trt=trt, trt_options=trt_options, progress=not quiet)
    summary = summarize(plan)
    if verify:
        summary["verified"] = True
        summary["verified_files"] = len(plan.files())
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        click.echo(format_summary(summary), err=True)
        if verify:
            click.echo(f"cvqd-export: plan {plan.root} verified: all {len(plan.files())} files match the manifest's "
                       f"sha256", err=True)


def default_out(ckpt: Path, precision: str) -> Path:
    return ckpt.with_name(ckpt.stem + ("-fp16" if precision == "fp16" else "") + ".plan")


def summarize(plan) -> dict:
    comps = {}
    for name, c in plan.components.items():
        comps[name] = {"onnx": c.onnx.file, "bytes": sum(f.size for f in c.files), "parity": c.parity.get("worst", {}),
                       "engine": plan.engines[name].engine.file if name in plan.engines else None}
    return {"plan": str(plan.root), "precision": plan.precision, "preset": plan.config.preset,
            "model": plan.model_id, "components": comps}


def format_summary(s: dict) -> str:
    lines = [f"plan {s['plan']} ({s['preset']}, {s['precision']}, model {s['model']}):"]
    for name, c in s["components"].items():
        p = c["parity"]
        extra = "".join(f", {k} {p[k]:.6g}" for k in ("min_cosine", "argmax_agreement", "psnr_db") if k in p)
        eng = f", engine {c['engine']}" if c["engine"] else ""
        lines.append(f"  {name:<12} {c['bytes'] / 1e6:8.2f} MB  max rel err {p.get('max_rel_err', float('nan')):.2e}"
                     f"{extra}{eng}")
    return "\n".join(lines)


def main() -> None:
    run_command(cli, "cvqd-export")


if __name__ == "__main__":
    main()
