"""CPU benchmark: end-to-end latency of one image, ONNX Runtime vs the PyTorch backend, in the same run.

    python benchmarks/runtime_cpu.py                      # the bundled demo model, or a demo-preset random init
    python benchmarks/runtime_cpu.py --ckpt model.pt --runs 20 --threads 1 2

For each thread count, both pipelines run the same prompt/seed sequence, interleaved run by run (so both see
the same machine load), after warm-up runs that are reported separately. "End to end" is what `cvqd-run`
does after loading: tokenize + CLIP text encoder, the reverse loop (denoiser + sampling step per step), the
VQ decoder, conversion to a PIL image. A per-stage breakdown (text, loop, decode; denoiser vs step math inside
the loop) comes from separately timed runs. Medians with p10/p90/IQR; JSON in benchmarks/results/.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runtime_common import machine, summary, write_json  # noqa: E402

CLI_RUNS = 5
PROMPTS = ["a small red circle on the left", "a large blue square", "a green triangle at the top",
           "a purple triangle on the right"]


def build(ckpt: Path, plan_dir: Path, threads: int):
    import os

    from cvqd.runtime.pipeline import Pipeline

    torch.set_num_threads(threads)
    os.environ["CVQD_ORT_THREADS"] = str(threads)
    return {"onnxruntime": Pipeline.from_plan(plan_dir, backend="onnxruntime"),
            "torch": Pipeline.from_checkpoint(ckpt, device="cpu")}


def end_to_end(pipe, prompt: str, seed: int, steps: int | None, guidance: float | None = None) -> float:
    t0 = time.perf_counter()
    pipe.generate([prompt], seed=seed, steps=steps, guidance=guidance)
    return (time.perf_counter() - t0) * 1e3


def stages(pipe, prompt: str, seed: int, steps: int | None, guidance: float | None = None) -> dict[str, float]:
    """One image with each stage timed; the denoiser calls inside the loop are timed by wrapping them."""
    from cvqd.images import to_pil

    settings = pipe.resolve(steps, guidance, None)
    den_ms = []
    real = pipe.loop.denoise

    def timed_denoise(*a):
        t = time.perf_counter()
        out = real(*a)
        den_ms.append((time.perf_counter() - t) * 1e3)
        return out

    pipe.loop.denoise = timed_denoise
    try:
        t0 = time.perf_counter()
        cond = pipe.encode_prompts([prompt])
        t1 = time.perf_counter()
        tokens = pipe.sample_tokens(cond, [seed], **settings)
        t2 = time.perf_counter()
        to_pil(pipe.backend.decode(tokens))
        t3 = time.perf_counter()
    finally:
        pipe.loop.denoise = real
    loop_ms = (t2 - t1) * 1e3
    return {"text_ms": (t1 - t0) * 1e3, "loop_ms": loop_ms, "decode_ms": (t3 - t2) * 1e3,
            "denoise_ms": sum(den_ms), "step_math_ms": loop_ms - sum(den_ms), "denoise_per_step_ms": sum(den_ms) / len(den_ms)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", type=Path, default=None, help="checkpoint (default: cvqd/assets/demo.pt, else a "
                    "demo-preset random init)")
    ap.add_argument("--runs", type=int, default=20, help="timed end-to-end runs per backend and thread count")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--steps", type=int, default=None, help="reverse steps (default: the model's)")
    ap.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model's; 1 runs "
                    "one denoiser row per step, anything else two: conditional and null)")
    ap.add_argument("--out", default="runtime_cpu.json")
    args = ap.parse_args()
    from cvqd.errors import CvqdError
    from cvqd.runtime.pipeline import check_settings

    try:  # before the plan export, not after it
        check_settings(args.steps, args.guidance, None)
    except CvqdError as exc:
        ap.error(str(exc))

    from cvqd.export import export_plan
    from cvqd.paths import bundled_model

    work = Path(tempfile.mkdtemp(prefix="cvqd-bench-"))
    ckpt = args.ckpt or (bundled_model() if bundled_model().is_file() else None)
    weights = "trained" if ckpt is not None else "random-init (demo preset; the bundled model was not there yet)"
    if ckpt is None:
        from cvqd.training.init import init_checkpoint

        ckpt = work / "demo-init.pt"
        init_checkpoint("demo", ckpt, seed=0)
    plan_dir = work / "plan"
    t = time.perf_counter()
    export_plan(ckpt, plan_dir)
    export_s = time.perf_counter() - t

    report = {"benchmark": "runtime_cpu", "what": "end-to-end latency of one image (text -> PIL image), ONNX Runtime "
              "CPU EP vs the PyTorch backend, interleaved runs in one process", "checkpoint": str(ckpt),
              "weights": weights, "runs": args.runs, "warmup": args.warmup, "export_seconds": round(export_s, 2),
              "machine": machine(), "results": {}}
    for threads in args.threads:
        pipes = build(ckpt, plan_dir, threads)
        settings = pipes["torch"].resolve(args.steps, args.guidance, None)
        steps = settings["steps"]
        res = {"threads": threads, "steps": steps, "guidance": settings["guidance"],
               "truncation": settings["truncation"], "preset": pipes["torch"].config.preset}
        warm = {name: [end_to_end(p, PROMPTS[0], 0, args.steps, args.guidance) for _ in range(args.warmup)]
                for name, p in pipes.items()}
        times = {name: [] for name in pipes}
        for i in range(args.runs):
            order = list(pipes) if i % 2 == 0 else list(pipes)[::-1]  # alternate who goes first
            for name in order:
                times[name].append(end_to_end(pipes[name], PROMPTS[i % len(PROMPTS)], i, args.steps, args.guidance))
        for name in pipes:
            per_stage = [stages(pipes[name], PROMPTS[i % len(PROMPTS)], i, args.steps, args.guidance) for i in range(5)]
            res[name] = {"end_to_end": summary(times[name]), "warmup_ms": [round(w, 1) for w in warm[name]],
                         "stages_median_ms": {k: round(sorted(s[k] for s in per_stage)[2], 3) for k in per_stage[0]},
                         "describe": pipes[name].describe()}
        ratio = res["torch"]["end_to_end"]["median_ms"] / res["onnxruntime"]["end_to_end"]["median_ms"]
        paired = sorted(b / a for a, b in zip(times["onnxruntime"], times["torch"]))
        res["speedup_ort_over_torch"] = {"ratio_of_medians": round(ratio, 3),
                                         "paired_ratio_p10": round(paired[len(paired) // 10], 3),
                                         "paired_ratio_median": round(paired[len(paired) // 2], 3),
                                         "paired_ratio_p90": round(paired[(9 * len(paired)) // 10], 3)}
        # tokens: same seed, both backends (the Philox noise is shared)
        c = pipes["torch"].encode_prompts(PROMPTS)
        a = pipes["onnxruntime"].sample_tokens(c, [0, 1, 2, 3], steps, 3.0, 0.9)
        b = pipes["torch"].sample_tokens(c, [0, 1, 2, 3], steps, 3.0, 0.9)
        res["identical_token_images_of_4"] = int((a == b).all(1).sum())
        report["results"][f"threads_{threads}"] = res
        print(f"threads={threads}: onnxruntime {res['onnxruntime']['end_to_end']['median_ms']:.1f} ms, torch "
              f"{res['torch']['end_to_end']['median_ms']:.1f} ms (median of {args.runs}); speedup {ratio:.2f}x",
              file=sys.stderr)
    # the whole command as a user runs it: process start, imports, model load, one image, PNG write
    import os
    import shutil
    import subprocess

    cli = {}
    for name, cli_args in (("onnxruntime", ["--engine", plan_dir, "--backend", "onnxruntime"]),
                       ("torch", ["--ckpt", ckpt, "--backend", "torch", "--device", "cpu"])):
        wall = []
        for i in range(CLI_RUNS):
            t = time.perf_counter()
            extra = ["--guidance", str(args.guidance)] if args.guidance is not None else []
            subprocess.run([sys.executable, "-m", "cvqd.runtime.cli", *map(str, cli_args), *extra,
                            "--prompt", PROMPTS[0], "--seed", str(i), "--out", str(work / f"cli-{name}.png"), "-q"],
                           check=True)
            wall.append((time.perf_counter() - t) * 1e3)
        cli[name] = summary(wall)
    report["cvqd_run_wall"] = {"what": f"cvqd-run subprocess, one image, default threads, {CLI_RUNS} runs",
                               **cli}
    print(f"cvqd-run wall: onnxruntime {cli['onnxruntime']['median_ms']:.0f} ms, torch "
          f"{cli['torch']['median_ms']:.0f} ms", file=sys.stderr)
    report["machine"]["load_average_end"] = os.getloadavg()
    path = write_json(args.out, report)
    shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
