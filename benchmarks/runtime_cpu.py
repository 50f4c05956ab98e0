"""CPU benchmark: latency of one image, ONNX Runtime (the default backend) vs PyTorch eager (the reference), same run.

    python -m benchmarks.runtime_cpu                          # the bundled demo model, its default guidance
    python -m benchmarks.runtime_cpu --guidance 1 2           # also with classifier-free guidance (two rows/step)
    python -m benchmarks.runtime_cpu --ckpt model.pt --runs 30 --threads 1 2

The checkpoint is exported to an fp32 plan first; ONNX Runtime runs that plan and the PyTorch backend runs the
checkpoint, both in fp32 (the report checks that the precisions match). For each thread count and guidance
scale, both pipelines run the same prompt/seed sequence, interleaved run by run (who goes first alternates, so
both see the same machine load), after warm-up runs that are reported apart. Every timed run is one
`Pipeline.generate` call (tokenize + CLIP text encoder, the reverse loop, the VQ decoder, the PIL image: what
`cvqd-run` does after loading) and, inside that same call, the reverse loop alone (`sample_tokens`) and the
denoiser calls within it, so "end to end" and "loop" come from the same runs. The whole `cvqd-run` command
(process start, imports, load, one image, PNG write) is timed too, as subprocesses. Medians with p10/p25/p75/p90
and min; the JSON (benchmarks/results/runtime_cpu.json) starts with the provenance record: command, git commit,
model sha256, date and machine (with the load average at the start; load_average_end at the end).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


from benchmarks.common import MIN_RUNS, load_average, positive_int, provenance, run_main, summary, write_json
from cvqd.threads import set_torch_threads

PROMPTS = ["a small red circle on the left", "a large blue square", "a green triangle at the top",
           "a purple triangle on the right"]
BACKENDS = ("onnxruntime", "torch")  # the default backend, then the reference


def build(ckpt: Path, plan_dir: Path, threads: int) -> dict:
    from cvqd.runtime.pipeline import Pipeline

    set_torch_threads(threads)
    os.environ["CVQD_ORT_THREADS"] = str(threads)
    return {"onnxruntime": Pipeline.from_plan(plan_dir, backend="onnxruntime"),
            "torch": Pipeline.from_checkpoint(ckpt, device="cpu", precision="fp32")}


def timed_generate(pipe, prompt: str, seed: int, steps: int | None, guidance: float | None) -> dict[str, float]:
    """One `generate` call: its wall time, and inside it the reverse loop and the denoiser calls (ms)."""
    loop_ms, den_ms = [], []
    real_sample, real_denoise = pipe.sample_tokens, pipe.loop.denoise

    def sample_tokens(*a, **k):
        t = time.perf_counter()
        out = real_sample(*a, **k)
        loop_ms.append((time.perf_counter() - t) * 1e3)
        return out

    def denoise(*a):
        t = time.perf_counter()
        out = real_denoise(*a)
        den_ms.append((time.perf_counter() - t) * 1e3)
        return out

    pipe.sample_tokens, pipe.loop.denoise = sample_tokens, denoise
    try:
        t0 = time.perf_counter()
        pipe.generate([prompt], seed=seed, steps=steps, guidance=guidance)
        total = (time.perf_counter() - t0) * 1e3
    finally:
        del pipe.sample_tokens  # back to the class method
        pipe.loop.denoise = real_denoise
    return {"end_to_end": total, "loop": sum(loop_ms), "denoise": sum(den_ms), "outside_loop": total - sum(loop_ms)}


def measure(pipes: dict, runs: int, warmup: int, steps: int | None, guidance: float | None) -> dict:
    res: dict = {}
    warm = {name: [round(timed_generate(p, PROMPTS[0], 1000 + i, steps, guidance)["end_to_end"], 1)
                   for i in range(warmup)] for name, p in pipes.items()}
    times: dict = {name: [] for name in pipes}
    for i in range(runs):
        order = list(pipes) if i % 2 == 0 else list(pipes)[::-1]  # alternate who goes first
        for name in order:
            times[name].append(timed_generate(pipes[name], PROMPTS[i % len(PROMPTS)], i, steps, guidance))
    for name in pipes:
        res[name] = {key: summary([t[key] for t in times[name]]) for key in times[name][0]}
        res[name]["warmup_ms"] = warm[name]
        res[name]["describe"] = pipes[name].describe()
    for key in ("end_to_end", "loop"):
        paired = sorted(b[key] / a[key] for a, b in zip(times["onnxruntime"], times["torch"]))
        res[f"speedup_{key}"] = {
            "ratio_of_medians": round(res["torch"][key]["median_ms"] / res["onnxruntime"][key]["median_ms"], 3),
            "paired_ratio_p10": round(paired[len(paired) // 10], 3),
            "paired_ratio_median": round(paired[len(paired) // 2], 3),
            "paired_ratio_p90": round(paired[(9 * len(paired)) // 10], 3)}
    return res


def cvqd_run_wall(plan_dir: Path, ckpt: Path, work: Path, runs: int) -> dict:
    """The whole command as a user runs it (default threads, the model's default settings), one image."""
    out = {"what": f"cvqd-run subprocess: process start, imports, load, one image, PNG write; default threads and "
                   f"settings; {runs} runs each, interleaved"}
    walls: dict = {name: [] for name in BACKENDS}
    cli_args = {"onnxruntime": ["--engine", str(plan_dir), "--backend", "onnxruntime"],
                "torch": ["--ckpt", str(ckpt), "--backend", "torch", "--device", "cpu", "--precision", "fp32"]}
    for i in range(runs):
        for name in (BACKENDS if i % 2 == 0 else BACKENDS[::-1]):
            t = time.perf_counter()
            subprocess.run([sys.executable, "-m", "cvqd.runtime.cli", *cli_args[name], "--prompt", PROMPTS[0],
                            "--seed", str(i), "--out", str(work / f"cli-{name}.png"), "-q"], check=True)
            walls[name].append((time.perf_counter() - t) * 1e3)
    out.update({name: summary(w) for name, w in walls.items()})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.runtime_cpu", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", type=Path, default=None, help="checkpoint (default: the bundled cvqd/assets/demo.pt)")
    ap.add_argument("--runs", type=positive_int, default=MIN_RUNS, help=f"timed runs per backend, thread count and guidance "
                    f"(at least {MIN_RUNS})")
    ap.add_argument("--warmup", type=positive_int, default=2)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--steps", type=int, default=None, help="reverse steps (default: the model's)")
    ap.add_argument("--guidance", type=float, nargs="+", default=[None], help="guidance scales (default: the "
                    "model's; 1 runs one denoiser row per step, anything else two: conditional and null)")
    ap.add_argument("--cli-runs", type=int, default=MIN_RUNS, help="timed `cvqd-run` subprocesses per backend (0: none)")
    ap.add_argument("--out", default="runtime_cpu.json", help="a bare name goes to benchmarks/results/")
    args = ap.parse_args()
    if args.runs < MIN_RUNS:
        ap.error(f"--runs {args.runs}: published medians need at least {MIN_RUNS} runs")
    from cvqd.errors import CvqdError
    from cvqd.export import export_plan
    from cvqd.paths import bundled_model
    from cvqd.runtime.pipeline import check_settings

    try:  # before the plan export, not after it
        for g in args.guidance:
            check_settings(args.steps, g, None)
    except CvqdError as exc:
        ap.error(str(exc))
    ckpt = args.ckpt or bundled_model()
    if not ckpt.is_file():
        ap.error(f"checkpoint {ckpt} is missing")

    report = {**provenance(ckpt), "benchmark": "runtime_cpu",
              "what": "latency of one image (text -> PIL image) and of its reverse loop, ONNX Runtime CPU EP on an "
                      "fp32 plan vs the PyTorch backend (fp32, the reference), interleaved runs in one process",
              "runs": args.runs, "warmup": args.warmup, "results": {}}
    work = Path(tempfile.mkdtemp(prefix="cvqd-bench-"))
    try:
        plan_dir = work / "plan"
        t = time.perf_counter()
        export_plan(ckpt, plan_dir, precision="fp32")
        report["export_seconds"] = round(time.perf_counter() - t, 2)
        for threads in args.threads:
            pipes = build(ckpt, plan_dir, threads)
            precisions = {name: p.describe()["precision"] for name, p in pipes.items()}
            if len(set(precisions.values())) != 1:
                raise SystemExit(f"runtime_cpu: the backends run different precisions {precisions}")
            for g in args.guidance:
                settings = pipes["torch"].resolve(args.steps, g, None)
                res = {"threads": threads, **settings, "precision": precisions["torch"],
                       "preset": pipes["torch"].config.preset,
                       **measure(pipes, args.runs, args.warmup, args.steps, g)}
                # tokens: same seeds, both backends (the Philox noise is shared), at the measured settings
                c = pipes["torch"].encode_prompts(PROMPTS)
                a = pipes["onnxruntime"].sample_tokens(c, [0, 1, 2, 3], **settings)
                b = pipes["torch"].sample_tokens(c, [0, 1, 2, 3], **settings)
                res["identical_token_images_of_4"] = int((a == b).all(1).sum())
                report["results"][f"threads_{threads}_guidance_{settings['guidance']:g}"] = res
                print(f"threads={threads} guidance={settings['guidance']:g}: onnxruntime "
                      f"{res['onnxruntime']['end_to_end']['median_ms']:.1f} ms (loop "
                      f"{res['onnxruntime']['loop']['median_ms']:.1f}), torch {res['torch']['end_to_end']['median_ms']:.1f}"
                      f" ms (loop {res['torch']['loop']['median_ms']:.1f}), median of {args.runs}; speed-up "
                      f"{res['speedup_end_to_end']['ratio_of_medians']:.2f}x", file=sys.stderr, flush=True)
        if args.cli_runs > 0:
            report["cvqd_run_wall"] = cvqd_run_wall(plan_dir, ckpt, work, args.cli_runs)
            w = report["cvqd_run_wall"]
            print(f"cvqd-run wall: onnxruntime {w['onnxruntime']['median_ms']:.0f} ms, torch "
                  f"{w['torch']['median_ms']:.0f} ms", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["load_average_end"] = load_average()
    print(f"wrote {write_json(args.out, report)}", file=sys.stderr)


if __name__ == "__main__":
    run_main(main, "python -m benchmarks.runtime_cpu")
