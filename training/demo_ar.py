"""`cvqd-train demo-ar`: the bundled CLIP-GEN (autoregressive) demo, trained on the diffusion demo's VQGAN and CLIP.

Stages (ordinary commands, run by training/demo.py's stage runner: printed, logged, resumable):
  1. data_train   the shapes training folder (the diffusion demo's command: same seed, same held-out pairs)
  2. ar           `cvqd-train ar --init BASE` (torchrun, 2 processes on the CPU): the generator on BASE's frozen
                  VQGAN and CLIP, with BASE's pseudo text noise alpha
  3. validation   cvqd-eval on the shapes benchmark's validation split, swept over guidance x top-p
  4. sampling     the best (guidance, top-p) pair and the validated guidance range at that top-p
  5. finalize     fp16, those sampling defaults
  6. eval         cvqd-eval on the test split: the reported figures
BASE is the bundled diffusion demo (cvqd/assets/demo.pt) by default, so the two generators share the tokenizer and
the CLIP and the comparison (benchmarks/ar_vs_diffusion.py) isolates the generator.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cvqd.errors import CvqdError
from cvqd.io import file_sha256, write_json
from cvqd.training.demo import PROMPTS, Stage, _torchrun, _train, recipe_record, run_recipe
from cvqd.training.shapes import SPLIT_SEEDS


@dataclass
class ArRecipe:
    """What `cvqd-train demo-ar` trains; the generator's sizes are `preset("demo-ar")`'s."""

    base: str = ""  # the diffusion checkpoint whose VQGAN and CLIP the generator uses ("": the bundled demo)
    data_count: int = 20_000  # as DemoRecipe: the same training folder
    data_seed: int = 2  # DemoRecipe renders its training folder with seed + 2
    steps: int = 2000
    batch: int = 32  # per process
    lr: float = 1e-3
    warmup: int = 100
    final_lr_ratio: float = 0.5
    ema_decay: float = 0.995
    null_prob: float = 0.1
    noise_shaped: float = 0.5  # as the diffusion demo
    processes: int = 2
    temperature: float = 1.0
    sweep_guidance: str = "1,1.5,2,3"
    sweep_top_p: str = "0.8,1"
    sweep_candidates: int = 4
    range_tolerance: float = 0.05
    eval_candidates: int = 8
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        for key in ("data_count", "steps", "batch", "processes", "sweep_candidates", "eval_candidates"):
            if getattr(self, key) < 1:
                raise CvqdError(f"demo-ar recipe: {key} must be >= 1, got {getattr(self, key)}")
        if not self.lr > 0 or not 0 < self.final_lr_ratio <= 1 or not 0 <= self.null_prob < 1:
            raise CvqdError("demo-ar recipe: need lr > 0, final_lr_ratio in (0, 1], null_prob in [0, 1)")
        for key in ("sweep_guidance", "sweep_top_p"):
            try:
                values = [float(x) for x in getattr(self, key).split(",") if x.strip()]
            except ValueError:
                values = []
            if not values or any(v < 0 for v in values):
                raise CvqdError(f"demo-ar recipe: {key} must be comma-separated numbers >= 0, got "
                                f"{getattr(self, key)!r}")


def ar_stages(r: ArRecipe, work: Path, out: Path, base: Path, processes: int, batch: int) -> list[Stage]:
    from cvqd.model.config import preset

    a = preset("demo-ar").ar
    train, runs, dev = work / "shapes-train", work / "runs", ("--device", r.device)
    sample = sum((["--sample-prompt", p] for p in PROMPTS), [])
    run = runs / "ar"
    return [
        Stage("data_train", train, _train("shapes", "--out", train, "--split", "train", "--count", r.data_count,
                                          "--seed", r.data_seed, "-q")),
        Stage("ar", run, _torchrun(
            processes, "ar", "--init", base, "--data", train, "--out", run, "--steps", r.steps, "--batch-size", batch,
            "--lr", r.lr, "--warmup", r.warmup, "--final-lr-ratio", r.final_lr_ratio, "--ema-decay", r.ema_decay,
            "--null-prob", r.null_prob, "--noise-shaped", r.noise_shaped, "--width", a.width, "--depth", a.depth,
            "--heads", a.heads, "--mlp-hidden", a.mlp_hidden, "--prefix", a.prefix, "--sample-every", 500,
            *sample, "--seed", r.seed, "--threads", 1, *dev, "-q"), after=("data_train",), run_folder=True),
        Stage("validation", work / "validation.json", (
            sys.executable, "-m", "cvqd.eval_cli", "--ckpt", str(run / "model.pt"), "--prompts", "shapes:validation",
            "-n", str(r.sweep_candidates), "--seed", str(SPLIT_SEEDS["validation"]), "--temperature",
            str(r.temperature), "--sweep-guidance", r.sweep_guidance, "--sweep-top-p", r.sweep_top_p,
            "--device", r.device, "--json", str(work / "validation.json"), "-q"), after=("ar",)),
        Stage("sampling", work / "sampling.json", call=lambda: choose_ar_sampling(work / "validation.json", r),
              after=("validation",)),
        Stage("finalize", out, _train("finalize", "--ckpt", run / "model.pt", "--out", out, "--fp16",
                                      "--guidance", "{guidance}", "--guidance-range", "{guidance_low}",
                                      "{guidance_high}", "--top-p", "{top_p}", "--temperature", r.temperature,
                                      "--note", "recipe=cvqd-train demo-ar"), after=("sampling",)),
        Stage("eval", work / "eval.json", (sys.executable, "-m", "cvqd.eval_cli", "--ckpt", str(out),
                                           "--prompts", "shapes:test", "-n", str(r.eval_candidates),
                                           "--seed", str(SPLIT_SEEDS["test"]), "--device", r.device,
                                           "--json", str(work / "eval.json"), "-q"), after=("finalize",)),
    ]


def choose_ar_sampling(sweep_json: Path, r: ArRecipe) -> dict[str, Any]:
    """The default (guidance, top_p) and the validated guidance range at that top_p, from the validation sweep.

    Score of a cell: colour+shape at N = 1 (averaged over the sweep's seeds), the mean of the full and the short
    in-distribution prompts (as the diffusion demo's choice). Range: the contiguous guidance scales at the chosen
    top_p within `range_tolerance` of the best."""
    try:
        rows = json.loads(Path(sweep_json).read_text())["sweep"]
    except (OSError, ValueError, KeyError) as exc:
        raise CvqdError(f"cannot read the validation sweep {sweep_json}: {exc}") from None
    keys = ("full/in_distribution/colour+shape", "short/in_distribution/colour+shape")
    score = {(row["guidance"], row["top_p"]): float(sum(row[k] for k in keys) / len(keys)) for row in rows}
    g_best, p_best = max(score, key=lambda gp: (score[gp], -abs(gp[0] - 1.5)))
    line = sorted(g for g, p in score if p == p_best)
    i = line.index(g_best)
    lo = hi = i
    while lo > 0 and score[(line[lo - 1], p_best)] >= score[(g_best, p_best)] - r.range_tolerance:
        lo -= 1
    while hi < len(line) - 1 and score[(line[hi + 1], p_best)] >= score[(g_best, p_best)] - r.range_tolerance:
        hi += 1
    return {"guidance": g_best, "top_p": p_best, "guidance_low": line[lo], "guidance_high": line[hi],
            "validation": {f"g{g:g} p{p:g}": round(s, 4) for (g, p), s in sorted(score.items())}}


def make_demo_ar(work: str | os.PathLike, out: str | os.PathLike, recipe: ArRecipe | None = None,
                 record: str | os.PathLike | None = None) -> dict[str, Any]:
    """Train the AR demo into `out` (a finalized fp16 checkpoint) and evaluate it; -> the record."""
    from cvqd.paths import bundled_model

    r = recipe or ArRecipe()
    base = Path(r.base) if r.base else bundled_model()
    if not base.is_file():
        raise CvqdError(f"demo-ar: the base checkpoint {base} does not exist (give --set base=PATH)")
    work, out = Path(work), Path(out)
    _, ran, wall = run_recipe(work, r.device, r.processes, r.batch,
                              lambda processes, batch: ar_stages(r, work, out, base, processes, batch), "demo-ar")
    rec = recipe_record(r, ran, wall, work, out, ("guidance", "top_p", "guidance_low", "guidance_high", "validation"))
    rec["base"] = {"path": str(base), "sha256": file_sha256(base)}
    rec["training_seconds"] = ran["seconds"].get("ar") if "ar" not in ran["kept"] else None
    if record is not None:
        write_json(record, rec)
    return rec


def recipe_with(overrides, recipe: ArRecipe | None = None) -> ArRecipe:
    """`--set key=value` overrides of ArRecipe (the diffusion demo's parser on this dataclass)."""
    from cvqd.training.demo import recipe_with as parse

    return parse(overrides, recipe or ArRecipe())
