"""`cvqd-train demo`: the whole recipe of the bundled demo model, timed, in one command.

    1. render the shapes data: a captioned folder of every combination (for the CLIP only) and a training folder
       without the held-out colour/shape pairs (for the VQGAN and the generator)
    2. the CLIP on one core, beside it on the other the VQGAN, a short second VQGAN run from its weights (the
       Gumbel temperature anneal restarts), then the decoder alone on the argmax codes; one thread each
    3. measure the CLIP's image-text gap and set the pseudo text noise alpha from it
    4. the base diffusion transformer, then the CFG fine-tune (torchrun, 2 processes x 1 thread, gloo)
    5. a guidance x truncation sweep at N = 1 (a guided winner is re-scored against the best unguided setting
       with 16 candidates), then finalize with the chosen setting (fp16) and the full evaluation (N = 1 and 16)
Every stage is an ordinary `cvqd-train` command (printed and recorded), so any step can be rerun alone. The
wall time of each stage, the machine, the CLIP report, the sweep and the evaluation go to `<out>.json`.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from cvqd.errors import CvqdError


@dataclass
class DemoRecipe:
    data_count: int = 20_000
    # 1000, not 500: the CLIP's text-to-image retrieval top-1 0.74 -> 1.0 (position was its weak attribute) and the
    # generator's colour+shape at N = 1 (mean of 16 seeds) 0.715 -> 0.783 in-distribution (docs/training.md)
    clip_steps: int = 1000
    clip_batch: int = 256
    clip_lr: float = 3e-3
    vqgan_steps: int = 5000
    vqgan_batch: int = 8
    vqgan_base_lr: float = 1e-4
    vqgan_disc_start: int = 100_000  # > steps: no GAN phase (see docs/training.md, "The demo model")
    vqgan_straight_through: bool = True
    # "cell": each token's code from its own 8x8 pixels only, so colour is a per-token choice and held-out
    # colour/shape pairs compose. Against "image" (the whole-image encoder of the previous bundled model), same
    # recipe otherwise: colour+shape at N = 1 (mean of 16 seeds) 0.890 -> 0.949 in-distribution and
    # 0.417 -> 0.742 held-out (docs/training.md). Costs ~17% more per VQGAN step.
    vqgan_encoder_scope: str = "cell"
    # A second VQGAN run from the first's weights (fresh optimizer, Gumbel temperature anneal restarted at 0.9).
    # Measured on the demo VQGAN: reconstruction colour accuracy 0.82 -> 0.92 (docs/training.md). 0: skip.
    vqgan_restart_steps: int = 1000
    # Then the decoder alone on the argmax codes inference uses (encoder + codebook frozen, tokens unchanged).
    # Measured on the bundled tokenizer (1500 steps in a trial): reconstruction colour+shape of small shapes
    # 0.79 -> 0.94, and the generator's in-distribution colour+shape at N = 1 0.78 -> 0.92 (docs/training.md).
    # 0: skip.
    vqgan_decoder_steps: int = 1000
    # 1500 (3500 before) with aux weight 0.05 and the decay ending at 0.7 x lr, below: fresh transformers on the
    # previous bundled tokenizer and CLIP scored 0.877 / 0.592 (+ CFG 300) at 1500 steps, and the from-nothing run
    # that made the previous (6-block) bundled model 0.938 / 0.783 (docs/training.md, "Short diffusion schedules")
    diffusion_steps: int = 1500
    diffusion_batch: int = 32  # per process
    diffusion_lr: float = 1e-3
    diffusion_warmup: int = 100
    # The auxiliary x_0 cross-entropy's weight; None keeps the preset's (the paper's 5e-4). See docs/training.md,
    # "Three levers": at 0.05 a fresh transformer learned shape in under half the steps.
    diffusion_aux_weight: float | None = 0.05
    # Where the diffusion stage's cosine learning-rate decay ends, as a share of diffusion_lr; None keeps the
    # trainer's 0.1. See docs/training.md, "Short diffusion schedules": at 1500 steps, 0.7 instead of 0.1 gained
    # ~15 points of colour+shape in-distribution.
    diffusion_final_lr_ratio: float | None = 0.7
    # Blocks of the diffusion transformer; None keeps the preset's (6). 4 runs the diffusion and CFG stages ~1.55x
    # faster on the CPU. From nothing with everything else as here, the bundled model: 0.920 / 0.696 colour+shape
    # at N = 1 (mean of 8), against 0.938 / 0.783 for the 6-block model of the same recipe (docs/training.md,
    # "The bundled model at 36 min").
    transformer_depth: int | None = 4
    ema_decay: float = 0.995
    noise_alpha: float | None = None  # None: from the CLIP's measured image-text gap
    noise_shaped: float = 0.5  # share of the pseudo text noise shaped like the image embeddings (0: isotropic)
    cfg_steps: int = 300  # 600 before, with the 3500-step diffusion stage
    cfg_lr: float | None = None  # None: diffusion_lr / 2
    null_prob: float = 0.1
    processes: int = 2  # torchrun processes for the diffusion stages
    sample_steps: int = 25
    sweep_guidance: tuple[float, ...] = (1.0, 1.5, 2.0, 3.0)
    sweep_truncation: tuple[float, ...] = (0.85, 1.0)
    # candidates per prompt in the sweep: N > 1 scores the N = 1 accuracy averaged over N draws, less noisy than
    # candidate 0 alone (held-out moves ~9 points with the seed at 1) at N times the time (~10 min at 4)
    sweep_candidates: int = 4
    eval_candidates: int = 16
    seed: int = 0
    # "cpu" reproduces the bundled model (two cores); "cuda" runs every stage, the sweep and the evaluation on the
    # GPU, with at most one diffusion process per visible GPU (the per-process batch grows to keep the global batch)
    device: str = "cpu"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0.0 <= self.noise_shaped <= 1.0:
            raise CvqdError(f"demo recipe: noise_shaped must be in [0, 1], got {self.noise_shaped}")
        if self.device.split(":")[0] not in ("cpu", "cuda"):
            raise CvqdError(f"demo recipe: device must be 'cpu' or 'cuda', got {self.device!r}")
        from cvqd.model.config import ENCODER_SCOPES

        if self.vqgan_encoder_scope not in ENCODER_SCOPES:
            raise CvqdError(f"demo recipe: vqgan_encoder_scope must be one of {list(ENCODER_SCOPES)}, "
                            f"got {self.vqgan_encoder_scope!r}")
        if self.diffusion_final_lr_ratio is not None and not 0.0 < self.diffusion_final_lr_ratio <= 1.0:
            raise CvqdError(f"demo recipe: diffusion_final_lr_ratio must be in (0, 1], got {self.diffusion_final_lr_ratio}")
        if self.diffusion_aux_weight is not None and self.diffusion_aux_weight < 0:
            raise CvqdError(f"demo recipe: diffusion_aux_weight must be >= 0, got {self.diffusion_aux_weight}")
        for key in ("diffusion_lr", "cfg_lr", "clip_lr", "vqgan_base_lr"):
            if getattr(self, key) is not None and not getattr(self, key) > 0:
                raise CvqdError(f"demo recipe: {key} must be > 0, got {getattr(self, key)}")
        if self.transformer_depth is not None and self.transformer_depth < 1:
            raise CvqdError(f"demo recipe: transformer_depth must be >= 1, got {self.transformer_depth}")
        if self.sweep_candidates < 1:
            raise CvqdError(f"demo recipe: sweep_candidates must be >= 1, got {self.sweep_candidates}")
        for key in ("vqgan_restart_steps", "vqgan_decoder_steps"):
            if getattr(self, key) < 0:
                raise CvqdError(f"demo recipe: {key} must be >= 0 (0 skips the stage), got {getattr(self, key)}")


def _cmd(*args) -> list[str]:
    return [sys.executable, "-m", "cvqd.training.cli", *map(str, args)]


def _torchrun(n: int, *args) -> list[str]:
    if n <= 1:
        return _cmd(*args)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
            "-m", "cvqd.training.cli", *map(str, args)]


def _show(cmd: list[str]) -> str:
    """The command as a user would type it."""
    text = " ".join(shlex.quote(c) for c in cmd)
    return (text.replace(f"{sys.executable} -m cvqd.training.cli", "cvqd-train")
            .replace(f"{sys.executable} -m torch.distributed.run", "torchrun"))


def _with_threads(cmd: list[str], n: int) -> list[str]:
    """The command with its --threads value set to n (unchanged if it has no --threads)."""
    if "--threads" not in cmd:
        return cmd
    i = cmd.index("--threads")
    return [*cmd[:i + 1], str(n), *cmd[i + 2:]]


def _run_parallel(cmds: dict[str, list[str]], log_dir: Path, env: dict[str, str],
                  after: dict[str, str] | None = None, cores: int = 1,
                  ran: dict[str, list[str]] | None = None,
                  widened: dict[str, float] | None = None,
                  on_done: Callable[[str, float], None] | None = None) -> dict[str, float]:
    """Run commands side by side; -> wall seconds of each. Output goes to <log_dir>/<name>.log.

    after[k] = j: command k starts when command j has finished (a chain on the core j used); a j that is not in
    `cmds` counts as finished. No core is left idle while work remains, with `cores` > 1:
    - a chained command that starts when nothing else runs gets `cores` threads (its --threads value);
    - when a command ends and leaves a single one running, that one is told to take `cores` threads from its next
      steps (commands with a --threads flag: the trainers read <log_dir>/<name>.threads, named by
      $CVQD_THREADS_FILE; training/loop.py::Threads).
      Seconds into the command when that happened go into `widened`.
    The commands as started go into `ran`; `on_done(name, seconds)` is called as each one succeeds (so its time
    survives a failure of another). If any command fails, the others are stopped.
    """
    from cvqd.io import atomic_path
    from cvqd.training.loop import THREADS_FILE_ENV

    after = {k: j for k, j in (after or {}).items() if k in cmds and j in cmds}
    waiting = set(after)  # chained commands not started yet
    running: dict[str, tuple[subprocess.Popen, Any, float]] = {}
    wide: set[str] = set()  # commands that have (or were told to take) every core
    times: dict[str, float] = {}

    def start(name: str) -> None:
        alone = cores > 1 and name in after and not running
        cmd = _with_threads(cmds[name], cores) if alone else cmds[name]
        if alone:
            wide.add(name)
        if ran is not None:
            ran[name] = cmd
        print(f"[demo] {name}: {_show(cmd)}", file=sys.stderr, flush=True)
        control = log_dir / f"{name}.threads"
        control.unlink(missing_ok=True)  # never a stale one from an earlier run
        log = open(log_dir / f"{name}.log", "w")
        running[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                          env={**env, THREADS_FILE_ENV: str(control)}), log, time.perf_counter())

    for name in cmds:
        if name not in waiting:
            start(name)
    while running:
        ended = False
        for name, (p, log, t0) in list(running.items()):
            if p.poll() is None:
                continue
            ended = True
            times[name] = time.perf_counter() - t0
            log.close()
            del running[name]
            if p.returncode != 0:
                for q, _, _ in running.values():
                    q.terminate()
                raise CvqdError(f"demo stage {name} failed (exit {p.returncode}); see {log_dir / (name + '.log')}")
            if on_done is not None:
                on_done(name, times[name])
            for k in [k for k in waiting if after[k] == name]:
                waiting.discard(k)
                start(k)
        if ended and cores > 1 and len(running) == 1:
            (name, (_, _, t0)), = running.items()
            if name not in wide and "--threads" in cmds[name]:  # a trainer (the data generator has no threads)
                wide.add(name)
                control = log_dir / f"{name}.threads"
                with atomic_path(control) as tmp:
                    Path(tmp).write_text(f"{cores}\n")
                if widened is not None:
                    widened[name] = round(time.perf_counter() - t0, 1)
                print(f"[demo] {name}: the stage beside it ended; it takes {cores} threads now", file=sys.stderr,
                      flush=True)
        time.sleep(1.0)
    return times


def _score(row: dict[str, Any]) -> float:
    """A sweep row's merit: colour+shape at N = 1, in-distribution + held-out."""
    return row["in_distribution/colour+shape"] + row["held_out/colour+shape"]


def _best_unguided(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The best guidance-1 row (one transformer row per step), or None."""
    return max((row for row in rows if row["guidance"] == 1.0), key=lambda row: (_score(row), row["all/all"]),
               default=None)


def choose_setting(sweep: list[dict[str, Any]]) -> tuple[dict[str, Any], str]:
    """The sweep row to ship: -> (row, reason).

    Score: colour+shape in-distribution + held-out at N = 1. Guidance 1 runs one transformer row per step instead
    of two (about a third less CPU latency), so the best unguided row is chosen unless a guided one scores higher
    by more than one standard error of that score (the one-standard-error rule); ties go to the lower guidance.
    """
    best = max(sweep, key=lambda row: (_score(row), row["all/all"], -row["guidance"]))
    cheap = _best_unguided(sweep)
    if best["guidance"] == 1.0 or cheap is None:
        return best, "best score"
    se = math.hypot(best.get("in_distribution/colour+shape_se") or 0.0, best.get("held_out/colour+shape_se") or 0.0)
    gain = _score(best) - _score(cheap)
    if gain <= se:
        return cheap, (f"guidance {best['guidance']:g} / truncation {best['truncation']:g} scored {gain:+.3f} more, "
                       f"within one standard error ({se:.3f}); guidance 1 runs one transformer row per step "
                       "instead of two")
    return best, f"best score, {gain:+.3f} over the best unguided row (one standard error {se:.3f})"


def _chain_seconds(cmds: dict[str, Any], after: dict[str, str], seconds: dict[str, float]) -> float:
    """Wall time of commands run side by side, each chained one starting when its predecessor ends."""
    def end(k: str) -> float:
        j = after.get(k)
        return seconds[k] + (end(j) if j in cmds else 0.0)

    return round(max(end(k) for k in cmds), 1)


def _previous_times(record: str | os.PathLike | None) -> dict[str, float]:
    """Stage wall times of an earlier record at `record` (for the stages a rerun keeps); {} if none."""
    try:
        return {k: float(v) for k, v in json.loads(Path(record).read_text())["wall_seconds"].items()}
    except (TypeError, OSError, ValueError, KeyError, AttributeError):
        return {}


def _journal_time(path: Path, name: str, seconds: float) -> None:
    """Add a finished stage's wall time to the work folder's journal (atomically), which a rerun reads for the stages
    it keeps: a first attempt that failed before writing its record still leaves its finished stages' times."""
    from cvqd.io import atomic_path

    times = {**_previous_times(path), name: round(seconds, 1)}
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps({"wall_seconds": times}, indent=1) + "\n")


def _finished(run: Path) -> bool:
    """A run folder whose model.pt reached the step count its run.json asked for."""
    try:
        from cvqd.model.checkpoint import load_checkpoint

        want = json.loads((run / "run.json").read_text())["config"]["steps"]
        return load_checkpoint(run / "model.pt").step >= want
    except (OSError, ValueError, KeyError, TypeError, CvqdError):
        return False


def make_demo(work: str | os.PathLike, out: str | os.PathLike, recipe: DemoRecipe | None = None,
              record: str | os.PathLike | None = None) -> dict[str, Any]:
    """Train the demo model from nothing into `out` (a finalized fp16 checkpoint); -> the record dict."""
    import torch

    from cvqd import evaluation as ev
    from cvqd.model.clipvqd import load_model
    from cvqd.training.train_clip import noise_alpha_for_gap, retrieval_report

    r = recipe or DemoRecipe()
    processes, per_process_batch = r.processes, r.diffusion_batch
    if r.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise CvqdError("demo recipe: device cuda was asked for but no CUDA GPU is visible; use device=cpu")
        processes = max(1, min(r.processes, torch.cuda.device_count()))
        per_process_batch = r.diffusion_batch * r.processes // processes
    dev = ["--device", r.device]
    work, out = Path(work), Path(out)
    work.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CVQD_CACHE": str(work / "cache")}
    # one thread per process; a chained VQGAN stage that starts after the CLIP lane has ended takes every core
    cores = 1 if r.device.startswith("cuda") else max(1, min(r.processes, os.cpu_count() or 1))
    rec: dict[str, Any] = {"recipe": asdict(r), "commands": {}, "wall_seconds": {}, "machine": ev.machine_info()}
    t_all = time.perf_counter()

    # Times of the stages a rerun keeps: the work folder's own journal (written as each stage ends), over the record
    journal = logs / "stage_times.json"
    previous = {**_previous_times(record), **_previous_times(journal)}
    phases: list[float] = []

    def stage(name: str, cmds: dict[str, list[str]], after: dict[str, str] | None = None) -> None:
        for k, c in cmds.items():
            rec["commands"][k] = _show(c)
        todo = {k: c + (["--resume"] if (work / "runs" / k / "model.pt").is_file() else [])
                for k, c in cmds.items() if not _finished(work / "runs" / k)}
        kept = [k for k in cmds if k not in todo]
        for k in kept:  # a rerun after an interruption keeps what is done
            print(f"[demo] {k}: already finished in {work / 'runs' / k}, kept", file=sys.stderr, flush=True)
            rec.setdefault("reused", []).append(k)
            if k in previous:  # its time as the record it came with measured it
                rec["wall_seconds"][k] = previous[k]
        if todo:
            t0 = time.perf_counter()
            ran: dict[str, list[str]] = {}
            widened: dict[str, float] = {}
            rec["wall_seconds"].update({f"{k}": round(v, 1) for k, v in
                                        _run_parallel(todo, logs, env, after, cores, ran, widened,
                                                      on_done=lambda k, v: _journal_time(journal, k, v)).items()})
            if widened:  # seconds into the stage when the one beside it ended and it took every core
                rec.setdefault("threads_widened_at", {}).update(widened)
            for k, c in ran.items():  # as run: a chained stage that started alone had every core
                rec["commands"][k] = _show([x for x in c if x != "--resume"])
            rec["wall_seconds"][f"phase:{name}"] = round(time.perf_counter() - t0, 1)
        if kept and all(k in rec["wall_seconds"] for k in cmds):  # the phase as it would run from scratch
            rec["wall_seconds"][f"phase:{name}"] = _chain_seconds(cmds, after or {}, rec["wall_seconds"])
        if f"phase:{name}" in rec["wall_seconds"]:
            phases.append(rec["wall_seconds"][f"phase:{name}"])

    caps, train = work / "shapes-captioned", work / "shapes-train"
    data_cmds = {}
    if not caps.exists():
        data_cmds["data_captioned"] = _cmd("shapes", "--out", caps, "--split", "all", "--captions",
                                           "--count", r.data_count, "--seed", r.seed + 1, "-q")
    if not train.exists():
        data_cmds["data_train"] = _cmd("shapes", "--out", train, "--split", "train", "--count", r.data_count,
                                       "--seed", r.seed + 2, "-q")
    if data_cmds:
        stage("data", data_cmds)

    runs = work / "runs"
    runs.mkdir(exist_ok=True)

    def vqgan_cmd(start: list, name: str, steps: int) -> list[str]:
        """The VQGAN stage and its restart differ only in where they start, their folder and their length."""
        return _cmd("vqgan", *start, "--data", train, "--out", runs / name, "--steps", steps,
                    "--batch-size", r.vqgan_batch, "--base-lr", r.vqgan_base_lr, "--disc-start", r.vqgan_disc_start,
                    *(["--straight-through"] if r.vqgan_straight_through else []),
                    "--sample-every", 500, "--seed", r.seed, "--threads", 1, *dev, "-q")

    # The CLIP on one core; on the other the VQGAN, then its restart, then its decoder fine-tune (a chain).
    vqgan_ckpt = runs / "vqgan" / "model.pt"
    first = {
        "clip": _cmd("clip", "--preset", "demo", "--data", caps, "--out", runs / "clip", "--steps", r.clip_steps,
                     "--batch-size", r.clip_batch, "--lr", r.clip_lr, "--warmup", 40, "--seed", r.seed,
                     "--threads", 1, *dev, "-q"),
        "vqgan": vqgan_cmd(["--preset", "demo", "--encoder-scope", r.vqgan_encoder_scope], "vqgan", r.vqgan_steps),
    }
    chain = {}
    for name, steps, flags in (("vqgan-restart", r.vqgan_restart_steps, []),
                               ("vqgan-decoder", r.vqgan_decoder_steps, ["--decoder-only"])):
        if steps > 0:
            first[name] = vqgan_cmd(["--init", vqgan_ckpt], name, steps) + flags
            chain[name] = vqgan_ckpt.parent.name
            vqgan_ckpt = runs / name / "model.pt"
    stage("clip+vqgan", first, after=chain)

    clip_report = retrieval_report(load_model(runs / "clip" / "model.pt"))
    alpha = r.noise_alpha if r.noise_alpha is not None else round(noise_alpha_for_gap(clip_report["cos_text_image_match"]), 3)
    rec["clip_report"], rec["noise_alpha"] = clip_report, alpha
    print(f"[demo] CLIP: {json.dumps(clip_report)}; noise alpha {alpha}", file=sys.stderr, flush=True)

    prompts = ("a small red circle on the left", "a large purple triangle at the top")
    common = ["--data", train, "--batch-size", per_process_batch, "--noise-shaped", r.noise_shaped, "--seed", r.seed,
              "--threads", 1, *dev, "-q"]
    stage("diffusion", {"diffusion": _torchrun(
        processes, "diffusion", "--init", vqgan_ckpt, "--clip-from", runs / "clip" / "model.pt",
        "--out", runs / "diffusion", "--steps", r.diffusion_steps, "--lr", r.diffusion_lr,
        "--warmup", r.diffusion_warmup, "--ema-decay", r.ema_decay, "--noise-alpha", alpha,
        *(["--aux-weight", r.diffusion_aux_weight] if r.diffusion_aux_weight is not None else []),
        *(["--final-lr-ratio", r.diffusion_final_lr_ratio] if r.diffusion_final_lr_ratio is not None else []),
        *(["--depth", r.transformer_depth] if r.transformer_depth is not None else []),
        "--sample-every", 500, *sum((["--sample-prompt", p] for p in prompts), []), *common)})
    stage("cfg", {"cfg": _torchrun(
        processes, "cfg", "--init", runs / "diffusion" / "model.pt", "--out", runs / "cfg", "--steps", r.cfg_steps,
        "--lr", r.cfg_lr if r.cfg_lr is not None else r.diffusion_lr / 2, "--warmup", 20, "--ema-decay", r.ema_decay,
        "--null-prob", r.null_prob,
        "--sample-every", 200, *sum((["--sample-prompt", p] for p in prompts), []), *common)})
    rec["wall_seconds"]["training_total"] = (round(sum(phases), 1) if rec.get("reused")
                                             else round(time.perf_counter() - t_all, 1))
    if rec.get("reused"):
        timed = [k for k in rec["reused"] if k in previous]
        rec["reused_note"] = (
            f"kept from an earlier run in this work folder: {', '.join(rec['reused'])}"
            + (f"; their wall times are the ones measured when they ran (the work folder's logs/stage_times.json, "
               f"else the previous record): {', '.join(timed)}" if timed else "")
            + ". Phases and training_total add the stages as a run from scratch would (side-by-side lanes: the "
            "longest chain), so they are not the wall time of this rerun.")

    from cvqd.training.release import finalize

    # The generator's checkpoint carries the VQGAN it started from; the tokenizer's last stage (its decoder
    # fine-tune) goes in here. The same weights when the diffusion started from that stage, as a fresh run does;
    # a run that kept an older diffusion stage gets the new decoder (its tokens are unchanged, which is checked).
    cfg_ckpt = work / "model.pt"
    finalize(runs / "cfg" / "model.pt", cfg_ckpt, vqgan_from=vqgan_ckpt)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    t0 = time.perf_counter()
    sweep = ev.sweep(cfg_ckpt, list(r.sweep_guidance), list(r.sweep_truncation), num_candidates=r.sweep_candidates,
                     steps=r.sample_steps, seed=r.seed, device=r.device, progress=lambda line: print(f"[demo] sweep {line}",
                                                                                    file=sys.stderr, flush=True))
    best, why = choose_setting(sweep)
    rec["sweep"] = sweep
    n = r.eval_candidates
    unguided = _best_unguided(sweep)
    if best["guidance"] != 1.0 and n > r.sweep_candidates and unguided is not None:
        # A few candidates per prompt can flatter a setting by luck (held-out moves by several points between
        # seeds), and a guided setting costs a second transformer row on every step: the best guided and the
        # best unguided rows are scored again with the evaluation's candidates, and the rule decides on those.
        confirm = []
        for row in (best, unguided):  # one-setting sweeps: the same rows, with n candidates
            confirm += ev.sweep(cfg_ckpt, [row["guidance"]], [row["truncation"]], num_candidates=n,
                                steps=r.sample_steps, seed=r.seed, device=r.device,
                                progress=lambda line: print(f"[demo] confirm ({n} candidates) {line}",
                                                            file=sys.stderr, flush=True))
        best, why = choose_setting(confirm)
        why = f"re-scored with {n} candidates per prompt against the best unguided setting: {why}"
        rec["sweep_confirm"] = confirm
    rec["chosen"] = {"guidance": best["guidance"], "truncation": best["truncation"], "steps": r.sample_steps,
                     "why": why}
    rec["wall_seconds"]["sweep"] = round(time.perf_counter() - t0, 1)

    size = finalize(cfg_ckpt, out, fp16=True, steps=r.sample_steps, guidance=best["guidance"],
                    truncation=best["truncation"], notes={"recipe": "cvqd-train demo (see cvqd/assets/demo.json)"})
    rec["checkpoint"] = {"path": str(out), "bytes": size}
    t0 = time.perf_counter()
    report = ev.evaluate(out, num_candidates=r.eval_candidates, seed=r.seed, device=r.device)
    rec["wall_seconds"]["eval"] = round(time.perf_counter() - t0, 1)
    rec["eval"] = {"settings": report["settings"], "table": report["table"]}
    rec["eval_table_text"] = ev.format_table(report)
    rec["wall_seconds"]["all"] = (round(rec["wall_seconds"]["training_total"] + rec["wall_seconds"]["sweep"]
                                        + rec["wall_seconds"]["eval"], 1) if rec.get("reused")
                                  else round(time.perf_counter() - t_all, 1))
    if record is not None:
        ev.write_json(record, rec)
        write_markdown(rec, Path(record).with_suffix(".md"))
    print(rec["eval_table_text"], file=sys.stderr)
    return rec


def recipe_with(overrides: Iterable[str], recipe: DemoRecipe | None = None) -> DemoRecipe:
    """`recipe` (default: today's DemoRecipe) with `key=value` overrides applied, as `cvqd-train demo --set` takes
    them; `key=none` unsets a field that may be None. Bad keys or values raise CvqdError."""
    import dataclasses
    import typing

    recipe = recipe or DemoRecipe()
    fields = {f.name for f in dataclasses.fields(DemoRecipe) if f.name != "extra"}
    hints = typing.get_type_hints(DemoRecipe)
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
            elif typing.get_origin(kind) is tuple:
                parsed = tuple(float(x) for x in value.split(","))
            else:
                parsed = kind(value)  # int, float, str
        except ValueError:
            name = ("comma-separated numbers" if typing.get_origin(kind) is tuple else
                    "true or false" if kind is bool else kind.__name__)
            raise CvqdError(f"--set {key}: expected {name}, got {value!r}") from None
        recipe = dataclasses.replace(recipe, **{key: parsed})
    return recipe


def recipe_overrides(recipe: dict[str, Any]) -> dict[str, str]:
    """The `--set key=value` pairs that give `recipe` (a record's) from today's DemoRecipe defaults."""
    def text(v: Any) -> str:
        if isinstance(v, (list, tuple)):
            return ",".join(text(x) for x in v)
        return f"{v:g}" if isinstance(v, float) else str(v)

    default = {k: text(v) for k, v in asdict(DemoRecipe()).items() if k != "extra"}
    return {k: text(v) for k, v in recipe.items() if k in default and text(v) != default[k]}


def _cpu_words(m: dict[str, Any]) -> str:
    """"AMD EPYC (2 cores; family 25, model 1, 2445 MHz)" from a record's machine (older records: name and cores)."""
    details = [f"{label} {m[k]}" for label, k in (("family", "cpu_family"), ("model", "cpu_model")) if k in m]
    details += [f"{float(m['cpu_mhz']):.0f} MHz"] if "cpu_mhz" in m else []
    return f"{m['cpu']} ({m['cores']} cores" + (f"; {', '.join(details)})" if details else ")")


def write_markdown(rec: dict[str, Any], path: Path) -> None:
    """A human-readable summary of a demo record (next to the JSON)."""
    from cvqd.io import atomic_path

    w = rec["wall_seconds"]
    m = rec["machine"]
    lines = ["# The bundled demo model", "",
             f"`{rec['checkpoint']['path']}`: {rec['checkpoint']['bytes'] / 1e6:.1f} MB (fp16 weights), preset `demo`, "
             f"trained on the shapes benchmark by `cvqd-train demo` on {_cpu_words(m)}, "
             f"torch {m['torch']}.", "",
             "## Reproduce", "", "```bash", "cvqd-train demo --work runs/demo --out cvqd/assets/demo.pt"
             + "".join(f" --set {k}={v}" for k, v in recipe_overrides(rec["recipe"]).items()), "```", "",
             rec.get("commands_note", "which runs these commands (one thread per process, CLIP and VQGAN side by "
                     "side; a stage left running alone takes every core, and so does a chained VQGAN stage that "
                     "starts alone):"), ""]
    if rec.get("threads_widened_at"):
        lines += ["Stages that took every core when the one beside them ended (seconds into the stage): "
                  + ", ".join(f"{k} {v:.0f} s" for k, v in rec["threads_widened_at"].items()) + ".", ""]
    lines += ["```bash"]
    lines += [c for c in rec["commands"].values()]
    lines += ["```", "", "## Wall time per stage (seconds)", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in w.items()]
    if rec.get("reused_note"):
        lines += ["", f"Reused stages: {rec['reused_note']}"]
    lines += ["", "## CLIP", "", "Text-to-image retrieval on the 180 benchmark prompts and the image-text gap "
              f"(noise alpha {rec['noise_alpha']} from the gap):", "", "```", json.dumps(rec["clip_report"], indent=1),
              "```", "", "## Guidance / truncation sweep (N = 1, 180 prompts"
              + (f"; averaged over {rec['recipe'].get('sweep_candidates', 1)} candidates"
                 if rec["recipe"].get("sweep_candidates", 1) > 1 else "") + ")", "",
              "| guidance | truncation | colour+shape in-dist | colour+shape held-out | all attrs in-dist | "
              "all attrs held-out | CLIP score |", "|---|---|---|---|---|---|---|"]
    for row in rec["sweep"]:
        lines.append(f"| {row['guidance']:g} | {row['truncation']:g} | {row['in_distribution/colour+shape']:.3f} | "
                     f"{row['held_out/colour+shape']:.3f} | {row['in_distribution/all']:.3f} | "
                     f"{row['held_out/all']:.3f} | {row['all/clip_score']:.3f} |")
    if rec.get("sweep_confirm"):
        lines += ["", f"Re-scored with {rec['eval']['settings']['num_candidates']} candidates per prompt (N = 1 "
                  "averaged over them):", "", "| guidance | truncation | colour+shape in-dist | colour+shape held-out |",
                  "|---|---|---|---|"]
        lines += [f"| {row['guidance']:g} | {row['truncation']:g} | {row['in_distribution/colour+shape']:.3f} | "
                  f"{row['held_out/colour+shape']:.3f} |" for row in rec["sweep_confirm"]]
    c = rec["chosen"]
    lines += ["", f"Chosen defaults: guidance {c['guidance']:g}, truncation {c['truncation']:g}, {c['steps']} steps"
              + (f" ({c['why']})." if c.get("why") else "."), "",
              f"## Evaluation (cvqd-eval, {rec['eval']['settings']['num_candidates']} candidates per prompt)", "",
              "```", rec["eval_table_text"], "```", ""]
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines))
