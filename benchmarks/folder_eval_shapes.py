"""The evaluation-at-scale path end to end, small: the bundled model generates the shapes prompts across two
torchrun processes, and `cvqd-eval --generated` scores the folder against rendered reference images.

    python -m benchmarks.folder_eval_shapes [--images-per-prompt 2] [--reference-count 1000]

Steps (each an ordinary command, recorded in the JSON):
  1. references: `cvqd-train shapes --split all` renders the reference folder (seed 9)
  2. generation: `torchrun --nproc_per_node 2 -m cvqd.runtime.cli --prompt-file P --out GEN/` on the bundled plan;
     P holds the benchmark's 180 full prompts
  3. scoring: `cvqd-eval --generated GEN --reference REF --fd-clip --json ...` with the model's own CLIP (CLIP
     score; Frechet distance in that CLIP's feature space)
  4. the same scoring of a second rendered folder (seed 10, as many images as were generated, each carrying its
     caption as its prompt) against the references: what a generator that draws exactly the data distribution
     would score with this many images (the floor of the FD at this sample size)

FID proper needs the FID Inception weights file (`--inception-weights`), which this machine does not have
(nothing is downloaded); with it, pass `--inception-weights FILE` and the FID is added.

Writes benchmarks/results/folder_eval_shapes.json (command, commit, model sha256, machine).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import positive_int, provenance, run_main, write_json

ROOT = Path(__file__).resolve().parent.parent


def _run(argv: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(argv)}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def _show(argv: list[str]) -> str:
    text = " ".join(argv)
    for module, name in (("cvqd.training.cli", "cvqd-train"), ("cvqd.eval_cli", "cvqd-eval"),
                         ("torch.distributed.run", "torchrun")):
        text = text.replace(f"{sys.executable} -m {module}", name)
    return text


def _render_captioned(folder: Path, count: int, seed: int) -> None:
    """Rendered shapes images that carry their full caption as their prompt (what a perfect generator writes)."""
    from cvqd.images import save_image
    from cvqd.training.shapes import iter_samples, render

    folder.mkdir(parents=True)
    for i, spec in iter_samples(count, seed=seed, split="all"):
        save_image(folder / f"{i:05d}.png", render(spec), {"prompt": spec.attrs.caption()})


def main(argv: list[str] | None = None) -> None:
    from cvqd.paths import bundled_model
    from cvqd.training.shapes import benchmark_prompts

    ap = argparse.ArgumentParser(prog="python -m benchmarks.folder_eval_shapes", description=__doc__.split("\n")[0])
    ap.add_argument("--images-per-prompt", type=positive_int, default=2)
    ap.add_argument("--reference-count", type=positive_int, default=1000)
    ap.add_argument("--processes", type=positive_int, default=2)
    ap.add_argument("--inception-weights", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "folder_eval_shapes.json")
    args = ap.parse_args(argv)
    rec = provenance(bundled_model())
    py = sys.executable
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        prompts = t / "prompts.txt"
        prompts.write_text("\n".join(p for p, _ in benchmark_prompts()) + "\n")
        steps = {
            "references": [py, "-m", "cvqd.training.cli", "shapes", "--out", str(t / "ref"), "--split", "all",
                           "--count", str(args.reference_count), "--seed", "9", "-q"],
            "generation": [py, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.processes}",
                           "-m", "cvqd.runtime.cli", "--prompt-file", str(prompts), "--num-images",
                           str(args.images_per_prompt), "--out", str(t / "gen") + "/", "--json", "-q"],
        }
        extra = ["--inception-weights", str(args.inception_weights)] if args.inception_weights else []
        score = [py, "-m", "cvqd.eval_cli", "--reference", str(t / "ref"), "--fd-clip", "--image-size", "64",
                 "--cache-dir", str(t / "cache"), "-q", *extra]
        steps["scoring"] = [*score, "--generated", str(t / "gen"), "--json", str(t / "gen.json")]
        steps["scoring_second_references"] = [*score, "--generated", str(t / "ref2"), "--json", str(t / "ref2.json")]
        count = 180 * args.images_per_prompt
        _render_captioned(t / "ref2", count, seed=10)
        seconds = {name: round(_run(a, env), 1) for name, a in steps.items()}
        gen, floor = json.loads((t / "gen.json").read_text()), json.loads((t / "ref2.json").read_text())
        manifest = [json.loads(line) for line in (t / "gen" / "manifest.jsonl").read_text().splitlines()]
    keep = ("clip_score", "fd_clip", "fid")
    rec.update({
        "commands": {k: _show(v).replace(tmp, "$TMP") for k, v in steps.items()},
        "second_references": f"{count} images rendered by cvqd.training.shapes (split all, seed 10), each carrying "
                             f"its full caption as its prompt (_render_captioned)",
        "seconds": seconds,
        "generated": {"images": gen["images"], "ranks": sorted({m["rank"] for m in manifest}),
                      **{k: gen[k] for k in keep if k in gen}},
        "rendered_second_set": {"images": floor["images"], **{k: floor[k] for k in keep if k in floor}},
        "fid_inception": "computed" if args.inception_weights else
                         "not computed: no FID Inception weights file on this machine (pass --inception-weights)",
    })
    for part in ("generated", "rendered_second_set"):
        for key in ("fd_clip", "fid"):
            if key in rec[part]:
                rec[part][key] = {k: v for k, v in rec[part][key].items() if k not in ("inception_weights",)}
    write_json(args.out, rec)
    g, f = rec["generated"], rec["rendered_second_set"]
    print(f"generated {g['images']} images: CLIP score {g['clip_score']['mean']:.4f}, FD(CLIP) "
          f"{g['fd_clip']['fd']:.4f}; rendered second set: CLIP score {f['clip_score']['mean']:.4f}, FD(CLIP) "
          f"{f['fd_clip']['fd']:.4f}; wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    run_main(main, "benchmarks.folder_eval_shapes")
