"""`cvqd-train demo`: the bundled demo model's whole recipe as a declared list of stages, and a plain runner.

`demo_stages(recipe, work, out)` lists the stages; each is an ordinary command (`cvqd-train ...`, `torchrun ...`,
`cvqd-eval ...`) or, for the one value measured between stages (the pseudo text noise alpha, from the trained
CLIP's image-text gap), a small Python step. A stage names the stages it waits for; `run_stages` starts every
stage whose predecessors have finished, at most `parallel` at a time, so the CLIP trains on one core while the
VQGAN chain trains on the other. Every command is printed, logged to `<work>/logs/<stage>.log` and recorded, so
any stage can be rerun by hand.

A rerun after an interruption keeps the stages that finished (a run folder whose checkpoint reached its step
count, or an output that exists) and resumes a cut training stage. The record's `training_seconds` is the wall
time of this invocation from its start to the end of the last training stage, and it is reported only when
every stage ran in this invocation (`from_nothing: true`); a rerun that kept stages records their names instead
of a training time, so a published time is always one measured run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import subprocess
import sys
import time
import typing
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from cvqd.errors import CvqdError
from cvqd.io import write_json
from cvqd.paths import CACHE_ENV
from cvqd.training.shapes import SPLIT_SEEDS

PROMPTS = ("a small red circle on the left", "a large purple triangle at the top")  # sample grids while training


@dataclass
class DemoRecipe:
    """What `cvqd-train demo` trains; the model itself is `preset("demo")` (cvqd/model/config.py)."""

    data_count: int = 20_000  # images rendered for each of the two data folders
    clip_steps: int = 1000
    clip_batch: int = 256
    clip_lr: float = 3e-3
    vqgan_steps: int = 5000
    vqgan_batch: int = 8
    vqgan_base_lr: float = 1e-4
    vqgan_disc_start: int = 100_000  # beyond the last step: the demo VQGAN trains without its GAN loss
    vqgan_straight_through: bool = True
    # A second VQGAN run from the first's weights: fresh optimizer, the Gumbel temperature anneal restarted. 0: skip.
    vqgan_restart_steps: int = 1000
    # Then the decoder alone on the argmax codes that inference uses (encoder and codebook frozen). 0: skip.
    vqgan_decoder_steps: int = 1000
    diffusion_steps: int = 1500
    diffusion_batch: int = 32  # per process
    diffusion_lr: float = 1e-3
    diffusion_warmup: int = 100
    # Where the cosine learning-rate decay ends, as a share of diffusion_lr (None: the trainer's 0.1). A short
    # schedule keeps learning longer with a high floor.
    diffusion_final_lr_ratio: float | None = 0.7
    ema_decay: float = 0.995
    noise_alpha: float | None = None  # None: from the trained CLIP's image-text gap (train_clip.noise_alpha_for_gap)
    noise_shaped: float = 0.5  # share of the pseudo text noise shaped like the image embeddings (0: isotropic)
    cfg_steps: int = 300
    cfg_lr: float | None = None  # None: diffusion_lr / 2
    null_prob: float = 0.1
    processes: int = 2  # torchrun processes for the diffusion stages
    # Sampling defaults written into the finalized checkpoint (what `cvqd-run` uses without flags)
    steps: int = 25
    guidance: float | None = None  # None: the best of `sweep_guidance` on the benchmark's validation split
    truncation: float = 0.85
    # The validation sweep (cvqd-eval --prompts shapes:validation): guidance scales, seeds per prompt, and how far
    # below the best score (colour+shape, N = 1, mean of full and short in-distribution prompts) a scale may fall
    # and still count as validated (the checkpoint's guidance_range; cvqd-run warns outside it)
    sweep_guidance: str = "1,1.5,2,3"
    sweep_candidates: int = 4
    range_tolerance: float = 0.05
    eval_candidates: int = 8  # seeds per prompt in the closing `cvqd-eval` on the test split
    seed: int = 0
    # "cpu": two single-threaded processes side by side (the 2-core machine the bundled model was trained on);
    # "cuda": every stage on the GPU, one diffusion process per visible GPU (the per-process batch grows to keep
    # the global batch)
    device: str = "cpu"

    def __post_init__(self) -> None:
        if not 0.0 <= self.noise_shaped <= 1.0:
            raise CvqdError(f"demo recipe: noise_shaped must be in [0, 1], got {self.noise_shaped}")
        if self.device.split(":")[0] not in ("cpu", "cuda"):
            raise CvqdError(f"demo recipe: device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.diffusion_final_lr_ratio is not None and not 0.0 < self.diffusion_final_lr_ratio <= 1.0:
            raise CvqdError(f"demo recipe: diffusion_final_lr_ratio must be in (0, 1], got {self.diffusion_final_lr_ratio}")
        for key in ("diffusion_lr", "cfg_lr", "clip_lr", "vqgan_base_lr"):
            if getattr(self, key) is not None and not getattr(self, key) > 0:
                raise CvqdError(f"demo recipe: {key} must be > 0, got {getattr(self, key)}")
        for key in ("vqgan_restart_steps", "vqgan_decoder_steps"):
            if getattr(self, key) < 0:
                raise CvqdError(f"demo recipe: {key} must be >= 0 (0 skips the stage), got {getattr(self, key)}")
        for key in ("data_count", "clip_steps", "vqgan_steps", "diffusion_steps", "cfg_steps", "processes", "steps",
                    "eval_candidates"):
            if getattr(self, key) < 1:
                raise CvqdError(f"demo recipe: {key} must be >= 1, got {getattr(self, key)}")
        try:
            scales = [float(x) for x in self.sweep_guidance.split(",") if x.strip()]
        except ValueError:
            scales = []
        if not scales or any(g < 0 for g in scales):
            raise CvqdError(f"demo recipe: sweep_guidance must be comma-separated scales >= 0, got "
                            f"{self.sweep_guidance!r}")
        if self.sweep_candidates < 1 or not 0 <= self.range_tolerance < 1:
            raise CvqdError(f"demo recipe: sweep_candidates must be >= 1 and range_tolerance in [0, 1), got "
                            f"{self.sweep_candidates}, {self.range_tolerance}")
        if not 0.0 < self.truncation <= 1.0 or (self.guidance is not None and self.guidance < 0):
            raise CvqdError(f"demo recipe: truncation must be in (0, 1] and guidance >= 0, got {self.truncation}, "
                            f"{self.guidance}")


# ------------------------------------------------------------------------------------------------- stages

@dataclass(frozen=True)
class Stage:
    """One step of the recipe.

    argv: the command, with `{name}` placeholders filled from values measured by earlier stages; or `call`, a
    Python step that returns such values. `after`: stages that must finish first. `output`: what the stage makes:
    a run folder (finished when its model.pt reached the steps its run.json asked for) or a file or folder
    (finished when it exists).
    """

    name: str
    output: Path
    argv: tuple[str, ...] = ()
    call: Callable[[], dict[str, Any]] | None = None
    after: tuple[str, ...] = ()
    run_folder: bool = False  # output is a training run folder: resumable with --resume


def _train(*args) -> tuple[str, ...]:
    return (sys.executable, "-m", "cvqd.training.cli", *map(str, args))


def _torchrun(n: int, *args) -> tuple[str, ...]:
    if n <= 1:
        return _train(*args)
    return (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
            "-m", "cvqd.training.cli", *map(str, args))


def show(argv: Iterable[str]) -> str:
    """A command as a user would type it."""
    text = shlex.join(argv)
    for module, name in (("cvqd.training.cli", "cvqd-train"), ("cvqd.eval_cli", "cvqd-eval"),
                         ("torch.distributed.run", "torchrun")):
        text = text.replace(f"{shlex.quote(sys.executable)} -m {module}", name)
    return text


def demo_stages(r: DemoRecipe, work: Path, out: Path, processes: int = 2, batch: int | None = None) -> list[Stage]:
    """The recipe: data -> CLIP beside the VQGAN chain -> noise alpha -> diffusion -> CFG -> finalize -> evaluate."""
    caps, train, runs = work / "shapes-captioned", work / "shapes-train", work / "runs"
    dev = ("--device", r.device)
    batch = batch or r.diffusion_batch

    def vqgan(name: str, start: tuple, steps: int, after: tuple[str, ...], *flags: str) -> Stage:
        return Stage(name, runs / name, _train(
            "vqgan", *start, "--data", train, "--out", runs / name, "--steps", steps, "--batch-size", r.vqgan_batch,
            "--base-lr", r.vqgan_base_lr, "--disc-start", r.vqgan_disc_start,
            *(["--straight-through"] if r.vqgan_straight_through else []), "--sample-every", 500, "--seed", r.seed,
            "--threads", 1, *dev, "-q", *flags), after=after, run_folder=True)

    stages = [
        Stage("data_captioned", caps, _train("shapes", "--out", caps, "--split", "all", "--captions",
                                             "--count", r.data_count, "--seed", r.seed + 1, "-q")),
        Stage("data_train", train, _train("shapes", "--out", train, "--split", "train", "--count", r.data_count,
                                          "--seed", r.seed + 2, "-q")),
        Stage("clip", runs / "clip", _train("clip", "--preset", "demo", "--data", caps, "--out", runs / "clip",
                                            "--steps", r.clip_steps, "--batch-size", r.clip_batch, "--lr", r.clip_lr,
                                            "--warmup", 40, "--seed", r.seed, "--threads", 1, *dev, "-q"),
              after=("data_captioned",), run_folder=True),
        vqgan("vqgan", ("--preset", "demo"), r.vqgan_steps, ("data_train",)),
    ]
    tokenizer = "vqgan"
    for name, steps, flags in (("vqgan-restart", r.vqgan_restart_steps, ()),
                               ("vqgan-decoder", r.vqgan_decoder_steps, ("--decoder-only",))):
        if steps > 0:
            stages.append(vqgan(name, ("--init", runs / tokenizer / "model.pt"), steps, (tokenizer,), *flags))
            tokenizer = name
    alpha_file = runs / "clip" / "noise_alpha.json"
    if r.noise_alpha is None:
        stages.append(Stage("noise_alpha", alpha_file, call=lambda: measure_noise_alpha(runs / "clip" / "model.pt"),
                            after=("clip",)))
    sample = sum((["--sample-prompt", p] for p in PROMPTS), [])
    common = ["--data", train, "--batch-size", batch, "--noise-shaped", r.noise_shaped, "--seed", r.seed,
              "--threads", 1, *dev, "-q"]
    stages += [
        Stage("diffusion", runs / "diffusion", _torchrun(
            processes, "diffusion", "--init", runs / tokenizer / "model.pt", "--clip-from", runs / "clip" / "model.pt",
            "--out", runs / "diffusion", "--steps", r.diffusion_steps, "--lr", r.diffusion_lr,
            "--warmup", r.diffusion_warmup, "--ema-decay", r.ema_decay,
            "--noise-alpha", "{noise_alpha}" if r.noise_alpha is None else r.noise_alpha,
            *(["--final-lr-ratio", r.diffusion_final_lr_ratio] if r.diffusion_final_lr_ratio is not None else []),
            "--sample-every", 500, *sample, *common),
              after=(tokenizer, "noise_alpha" if r.noise_alpha is None else "clip"), run_folder=True),
        Stage("cfg", runs / "cfg", _torchrun(
            processes, "cfg", "--init", runs / "diffusion" / "model.pt", "--out", runs / "cfg", "--steps", r.cfg_steps,
            "--lr", r.cfg_lr if r.cfg_lr is not None else r.diffusion_lr / 2, "--warmup", 20,
            "--ema-decay", r.ema_decay, "--null-prob", r.null_prob, "--sample-every", 200, *sample, *common),
              after=("diffusion",), run_folder=True),
        # Sampling decisions on the validation split only: the guidance sweep, then the default and the range.
        Stage("validation", work / "validation.json", (
            sys.executable, "-m", "cvqd.eval_cli", "--ckpt", str(runs / "cfg" / "model.pt"), "--prompts",
            "shapes:validation", "-n", str(r.sweep_candidates), "--seed", str(SPLIT_SEEDS["validation"]),
            "--steps", str(r.steps), "--truncation", str(r.truncation), "--sweep-guidance", r.sweep_guidance,
            "--device", r.device, "--json", str(work / "validation.json"), "-q"), after=("cfg",)),
        Stage("guidance", work / "guidance.json", call=lambda: choose_guidance(work / "validation.json", r),
              after=("validation",)),
        # The generator's checkpoint carries the VQGAN it started from; the tokenizer's last stage (its decoder
        # fine-tune) goes in here, with the sampling defaults, in fp16.
        Stage("finalize", out, _train("finalize", "--ckpt", runs / "cfg" / "model.pt", "--out", out, "--fp16",
                                      "--vqgan-from", runs / tokenizer / "model.pt", "--steps", r.steps,
                                      "--guidance", "{guidance}", "--guidance-range", "{guidance_low}",
                                      "{guidance_high}", "--truncation", r.truncation,
                                      "--note", "recipe=cvqd-train demo"),
              after=("guidance",)),
        # The reported figures: the test split's prompts and seeds, which no decision above looked at.
        Stage("eval", work / "eval.json", (sys.executable, "-m", "cvqd.eval_cli", "--ckpt", str(out),
                                           "--prompts", "shapes:test", "-n", str(r.eval_candidates),
                                           "--seed", str(SPLIT_SEEDS["test"]), "--device", r.device,
                                           "--json", str(work / "eval.json"), "-q"),
              after=("finalize",)),
    ]
    return stages


def choose_guidance(sweep_json: Path, r: DemoRecipe) -> dict[str, Any]:
    """The default guidance and the validated range from the validation sweep (cvqd-eval --sweep-guidance --json).

    Score of a scale: colour+shape at N = 1 (averaged over the sweep's seeds), the mean of the full and the short
    in-distribution prompts. Default: the best scale (or the recipe's fixed `guidance`); range: the contiguous
    scales around it that score within `range_tolerance` of the best.
    """
    try:
        rows = json.loads(Path(sweep_json).read_text())["sweep"]
    except (OSError, ValueError, KeyError) as exc:
        raise CvqdError(f"cannot read the validation sweep {sweep_json}: {exc}") from None

    def score(row: dict[str, Any]) -> float:
        keys = ("full/in_distribution/colour+shape", "short/in_distribution/colour+shape")
        return float(sum(row[k] for k in keys) / len(keys))

    rows = sorted(rows, key=lambda row: row["guidance"])
    scores = [score(row) for row in rows]
    best = max(range(len(rows)), key=lambda i: scores[i])
    lo = hi = best
    while lo > 0 and scores[lo - 1] >= scores[best] - r.range_tolerance:
        lo -= 1
    while hi < len(rows) - 1 and scores[hi + 1] >= scores[best] - r.range_tolerance:
        hi += 1
    guidance = rows[best]["guidance"] if r.guidance is None else r.guidance
    low, high = min(rows[lo]["guidance"], guidance), max(rows[hi]["guidance"], guidance)
    return {"guidance": guidance, "guidance_low": low, "guidance_high": high,
            "validation": {f"{row['guidance']:g}": round(sc, 4) for row, sc in zip(rows, scores)}}


def measure_noise_alpha(clip_ckpt: Path) -> dict[str, Any]:
    """The pseudo text noise alpha from the trained CLIP's image-text gap, with the CLIP's retrieval report."""
    from cvqd.model.clipvqd import load_model
    from cvqd.training.train_clip import noise_alpha_for_gap, retrieval_report

    report = retrieval_report(load_model(clip_ckpt))
    alpha = round(noise_alpha_for_gap(report["cos_text_image_match"]), 3)
    if not 0.0 <= alpha < 1.0:  # the pseudo text embedding's valid range (ClipConfig.noise_alpha)
        raise CvqdError(f"the CLIP in {clip_ckpt} matches text to images at cosine "
                        f"{report['cos_text_image_match']:.3f}, which asks for a noise alpha of {alpha} (>= 1): "
                        f"train the CLIP longer, or fix it with --set noise_alpha=VALUE")
    return {"noise_alpha": alpha, "clip_report": report}


def fill(arg: str, values: dict[str, Any]) -> str:
    """An argument that is exactly a `{name}` placeholder -> the measured value; every other argument as it is."""
    name = arg[1:-1] if arg[:1] == "{" and arg[-1:] == "}" else None
    return str(values[name]) if name in values else arg


def finished(stage: Stage) -> bool:
    """A stage whose output is complete: a run folder at its requested steps, or any other existing output."""
    if not stage.run_folder:
        return stage.output.exists()
    try:
        from cvqd.model.checkpoint import load_checkpoint
        from cvqd.training.common import read_run_json

        want = read_run_json(stage.output)["config"]["steps"]
        return load_checkpoint(stage.output / "model.pt").step >= want
    except (OSError, ValueError, KeyError, TypeError, CvqdError):
        return False


def _kept_values(stage: Stage) -> dict[str, Any]:
    """The values a kept Python step measured in an earlier run (it wrote them to its output)."""
    try:
        return json.loads(stage.output.read_text())
    except (OSError, ValueError):
        return {}


def run_stages(stages: list[Stage], logs: Path, env: dict[str, str], parallel: int = 2,
               say: Callable[[str], None] = lambda m: print(f"[demo] {m}", file=sys.stderr, flush=True),
               poll: float = 0.5) -> dict[str, Any]:
    """Run `stages`, each once its `after` stages are done, at most `parallel` commands at a time.

    -> {"commands": {name: command line}, "seconds": {name: its wall seconds}, "ends": {name: seconds from this
    call's start to its end}, "kept": [names], "values": {...}}. A failing command stops the others and raises
    CvqdError naming its log.
    """
    names = [s.name for s in stages]
    for s in stages:
        missing = [a for a in s.after if a not in names]
        if missing:
            raise CvqdError(f"demo stage {s.name} waits for unknown stage(s) {missing}")
    logs.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"commands": {}, "seconds": {}, "ends": {}, "kept": [], "values": {}}
    start = time.perf_counter()
    done: set[str] = set()
    for s in stages:
        if finished(s):
            say(f"{s.name}: already finished ({s.output}), kept")
            done.add(s.name)
            result["kept"].append(s.name)
            if s.call is not None:
                result["values"].update(_kept_values(s))
    running: dict[str, tuple[subprocess.Popen, Any, float]] = {}
    pending = [s for s in stages if s.name not in done]

    def finish(name: str, t0: float) -> None:
        now = time.perf_counter()
        result["seconds"][name] = round(now - t0, 1)
        result["ends"][name] = round(now - start, 1)
        done.add(name)

    try:
        while pending or running:
            for s in [s for s in pending if all(a in done for a in s.after)]:
                if s.call is not None:  # quick Python steps run inline
                    t0 = time.perf_counter()
                    say(f"{s.name}: measuring")
                    values = s.call()
                    result["values"].update(values)
                    write_json(s.output, values)  # a rerun keeps the step and reads its values back
                    finish(s.name, t0)
                    pending.remove(s)
                elif len(running) < parallel:
                    argv = [fill(a, result["values"]) for a in map(str, s.argv)]
                    if s.run_folder and (s.output / "model.pt").is_file():
                        argv.append("--resume")  # a cut run continues where its checkpoint stopped
                    result["commands"][s.name] = show(a for a in argv if a != "--resume")
                    say(f"{s.name}: {show(argv)}")
                    log = open(logs / f"{s.name}.log", "w")
                    running[s.name] = (subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env), log,
                                       time.perf_counter())
                    pending.remove(s)
            for name, (proc, log, t0) in list(running.items()):
                if proc.poll() is None:
                    continue
                log.close()
                del running[name]
                if proc.returncode != 0:
                    raise CvqdError(f"demo stage {name} failed (exit {proc.returncode}); see {logs / (name + '.log')}")
                finish(name, t0)
                say(f"{name}: done in {result['seconds'][name]:.0f} s")
            if running:
                time.sleep(poll)
            elif pending and not any(all(a in done for a in s.after) for s in pending):
                raise CvqdError(f"demo stages {[s.name for s in pending]} wait for stages that never finish")
    finally:
        for proc, log, _ in running.values():
            proc.terminate()
            proc.wait()
            log.close()
    return result


# --------------------------------------------------------------------------------------------- the run

def make_demo(work: str | os.PathLike, out: str | os.PathLike, recipe: DemoRecipe | None = None,
              record: str | os.PathLike | None = None) -> dict[str, Any]:
    """Train the demo model from nothing into `out` (a finalized fp16 checkpoint) and evaluate it; -> the record."""
    r = recipe or DemoRecipe()
    work, out = Path(work), Path(out)
    stages, ran, total = run_recipe(work, r.device, r.processes, r.diffusion_batch,
                                    lambda processes, batch: demo_stages(r, work, out, processes, batch), "demo")
    trained = [s.name for s in stages if s.run_folder and s.name in ran["seconds"]]
    rec = recipe_record(r, ran, total, work, out, ("guidance", "guidance_low", "guidance_high", "validation"))
    rec.update(noise_alpha=ran["values"].get("noise_alpha", r.noise_alpha),
               clip_report=ran["values"].get("clip_report"))
    # One measured run: the time from this call's start to the end of its last training stage, only when nothing
    # was kept from an earlier run (stage times of different runs are never added up).
    rec["training_seconds"] = max(ran["ends"][s] for s in trained) if rec["from_nothing"] and trained else None
    if record is not None:
        write_json(record, rec)
    return rec


def run_recipe(work: Path, device: str, processes: int, batch: int,
               make_stages: Callable[[int, int], list[Stage]], name: str) -> tuple[list[Stage], dict[str, Any], float]:
    """What every recipe runner does (`cvqd-train demo`, `demo-ar`): on "cuda", one training process per visible GPU
    (up to `processes`, the per-process `batch` grown to keep the global batch); the work folder; then the stages
    of `make_stages(processes, batch)`, two single-threaded commands side by side on the CPU (the two cores of the
    reference machine), one at a time on a GPU. -> (stages, run_stages' result, wall seconds)."""
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise CvqdError(f"{name} recipe: device cuda was asked for but no CUDA GPU is visible; use device=cpu")
        fit = max(1, min(processes, torch.cuda.device_count()))
        processes, batch = fit, batch * processes // fit
    try:
        work.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CvqdError(f"cannot create the work folder {work}: {exc.strerror or exc}") from None
    stages = make_stages(processes, batch)
    env = {**os.environ, "OMP_NUM_THREADS": "1", CACHE_ENV: str(work / "cache")}
    parallel = 1 if device.startswith("cuda") else max(1, min(2, os.cpu_count() or 1))
    t0 = time.perf_counter()
    ran = run_stages(stages, work / "logs", env, parallel=parallel)
    return stages, ran, round(time.perf_counter() - t0, 1)


def recipe_record(recipe, ran: dict[str, Any], wall: float, work: Path, out: Path,
                  choice: tuple[str, ...]) -> dict[str, Any]:
    """The fields every recipe record has: the recipe, each stage's command and time, what was kept, the sampling
    values the recipe chose (`choice`), the checkpoint, provenance (command, commit, model sha256, date, machine)
    and the closing test-split evaluation (<work>/eval.json)."""
    from cvqd.machine import provenance

    rec: dict[str, Any] = {
        "recipe": asdict(recipe), "commands": ran["commands"], "stage_seconds": ran["seconds"], "kept": ran["kept"],
        "from_nothing": not ran["kept"], "wall_seconds": wall,
        "sampling_choice": {k: ran["values"].get(k) for k in choice},
        "checkpoint": {"path": str(out), "bytes": out.stat().st_size}, **provenance(out)}
    try:
        report = json.loads((work / "eval.json").read_text())
        rec["eval"] = {"settings": report["settings"], "table": report["table"]}
    except (OSError, ValueError, KeyError):
        rec["eval"] = None
    return rec


# ------------------------------------------------------------------------------------------- overrides

def recipe_with(overrides: Iterable[str], recipe: DemoRecipe | None = None) -> DemoRecipe:
    """`recipe` (default: DemoRecipe(); any recipe dataclass, e.g. demo_ar.ArRecipe) with `key=value` overrides
    applied, as `cvqd-train demo --set` takes them; `key=none` unsets a field that may be None. Bad keys or values
    raise CvqdError."""
    recipe = recipe or DemoRecipe()
    kind_of = type(recipe)
    fields = {f.name for f in dataclasses.fields(kind_of)}
    hints = typing.get_type_hints(kind_of)
    for o in overrides:
        key, _, value = o.partition("=")
        if key not in fields or not value:
            raise CvqdError(f"--set expects key=value with key one of {sorted(fields)}, got {o!r}")
        # the field's declared type: `int | None` parses as an int even while the field is None
        args = typing.get_args(hints[key])
        optional = type(None) in args
        kind = next(t for t in args if t is not type(None)) if optional else hints[key]
        try:
            if value.lower() == "none" and optional:
                parsed = None  # back to the field's "not set" meaning (e.g. noise_alpha=none: from the CLIP's gap)
            elif kind is bool:
                if value.lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                    raise ValueError(value)
                parsed = value.lower() in ("1", "true", "yes", "on")
            else:
                parsed = kind(value)  # int, float, str
        except ValueError:
            raise CvqdError(f"--set {key}: expected {'true or false' if kind is bool else kind.__name__}, "
                            f"got {value!r}") from None
        recipe = dataclasses.replace(recipe, **{key: parsed})
    return recipe


def recipe_overrides(recipe: dict[str, Any]) -> dict[str, str]:
    """The `--set key=value` pairs that give `recipe` (a record's) from DemoRecipe's defaults."""
    def text(v: Any) -> str:
        return f"{v:g}" if isinstance(v, float) else str(v)

    default = {k: text(v) for k, v in asdict(DemoRecipe()).items()}
    return {k: text(v) for k, v in recipe.items() if k in default and text(v) != default[k]}
