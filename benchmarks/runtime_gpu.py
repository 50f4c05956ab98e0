"""GPU benchmark: eager torch vs CUDA-graph torch (fused kernels) vs TensorRT, per step and end to end, plus parity.

    python -m benchmarks.runtime_gpu                          # paper preset, random weights, 100 steps, CFG, batch 1
    python -m benchmarks.runtime_gpu --precision fp32 --runs 10
    python -m benchmarks.runtime_gpu --plan paper.plan        # adds the TensorRT backend if its engines fit here
    python -m benchmarks.runtime_gpu --ckpt cvqd/assets/demo.pt --ort --steps 25 --guidance 1 --truncation 0.85
                                                              # a trained checkpoint; --ort adds ONNX Runtime CUDA
    python -m benchmarks.runtime_gpu --device cpu --preset tiny --runs 2   # dry run of the script logic on a CPU

Variants (same model, same prompt and seeds, one process):
  eager           torch denoiser (autocast) + the PyTorch sampling step, no graph: the reference implementation
  eager+kernels   torch denoiser + the fused CUDA sampling kernels (kernels/sampling.cu), no graph
  graph+kernels   the whole step captured in a CUDA graph and replayed S times (runtime/cuda_graph.py)
  tensorrt        the plan's TensorRT engines + kernels + graph (only with --plan and TensorRT present)
  onnxruntime-cuda  a plan exported from the checkpoint, ONNX Runtime's CUDA execution provider with IOBinding +
                  the fused kernels (no graph: ORT sessions are not capturable here); --ort, needs onnxruntime-gpu
                  and a checkpoint that carries its CLIP (--ckpt)
The hardware's limit for one step: the denoiser's floating-point operations (counted by torch's FlopCounterMode
on one forward of the step's rows) over the bf16 matrix rate measured here (a 8192^3 product), and its weight
bytes over the copy bandwidth measured here; the larger is the floor no implementation of the step beats.
Each is timed end to end (prompt -> PIL image, synchronised wall clock) and for the reverse loop alone (CUDA
events), medians with p10/p90 over --runs runs after warm-up (warm-up and graph capture reported apart). Kernel
parity: each kernel against its PyTorch reference at the model's shapes (cvqd/model/step.py, cvqd/model/rng.py).
Writes benchmarks/results/runtime_gpu.json (or --out).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import MIN_RUNS, load_average, positive_int, provenance, run_main, summary, write_json

PROMPT = "a photograph of a smiling woman with long hair"


def build_model(preset: str, device: torch.device, seed: int = 0, ckpt: Path | None = None):
    from cvqd.model.config import preset as get_preset
    from cvqd.model.clipvqd import CLIPVQDiffusion, load_model

    if ckpt is not None:
        return load_model(ckpt, device=device).eval()
    torch.manual_seed(seed)
    return CLIPVQDiffusion(get_preset(preset)).eval().to(device)  # random weights, CLIP architecture included


def hardware_limit(backend, model, device: torch.device, guidance: float) -> dict:
    """Floor of one reverse step on this GPU: counted FLOPs / measured bf16 matrix rate, weight bytes / measured
    copy bandwidth (each rate: the median of CUDA-event-timed repeats after warm-up)."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = model.cfg
    rows = 2 if guidance != 1.0 else 1
    N, D = cfg.transformer.seq_len, cfg.transformer.cond_dim
    x = torch.randint(0, cfg.transformer.num_classes, (rows, N), device=device)
    t = torch.full((rows,), 5, device=device)
    cond = torch.randn(rows, D, device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        backend.denoise(x, t, cond)
    flops = fc.get_total_flops()
    params = sum(p.numel() for p in model.transformer.parameters())

    def timed(fn, reps=10) -> float:
        for _ in range(3):
            fn()
        ts = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            ts.append(a.elapsed_time(b))
        return sorted(ts)[len(ts) // 2]

    m = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    tflops = 2 * 8192 ** 3 / timed(lambda: m @ m) / 1e9
    src = torch.randn(1 << 28, device=device)  # 1 GiB
    dst = torch.empty_like(src)
    tbps = 2 * src.numel() * 4 / timed(lambda: dst.copy_(src)) / 1e9

    out = {"rows_per_step": rows, "flops_per_step": flops, "bf16_matmul_tflops_measured": round(tflops, 1),
           "copy_tb_per_s_measured": round(tbps, 2), "compute_floor_ms": round(flops / tflops / 1e9, 4)}
    out.update(transformer_params=params, bf16_weight_bytes=2 * params,
               memory_floor_ms=round(2 * params / tbps / 1e9, 4))
    out["floor_ms_per_step"] = max(out["compute_floor_ms"], out["memory_floor_ms"])
    return out


def timed_generate(pipe, seed: int, steps: int, guidance: float, truncation: float) -> float:
    sync = torch.cuda.synchronize if str(pipe.backend.device).startswith("cuda") else (lambda: None)
    sync()
    t0 = time.perf_counter()
    pipe.generate([PROMPT], seed=seed, steps=steps, guidance=guidance, truncation=truncation)
    sync()
    return (time.perf_counter() - t0) * 1e3


def loop_ms(pipe, cond, seed: int, steps: int, guidance: float, truncation: float) -> float:
    """The reverse loop alone: CUDA events on GPU, a synchronised clock on CPU."""
    if not str(pipe.backend.device).startswith("cuda"):
        t0 = time.perf_counter()
        pipe.sample_tokens(cond, [seed], steps, guidance, truncation)
        return (time.perf_counter() - t0) * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    pipe.sample_tokens(cond, [seed], steps, guidance, truncation)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def kernel_parity(K: int, N: int, device: torch.device, steps: int, num_steps: int) -> dict:
    """Each fused kernel vs its PyTorch reference at the model's shapes (kernels/parity.py), and the step math
    alone: the fused kernel vs the PyTorch step on the GPU, per step (CUDA events), batch 1 with CFG."""
    from cvqd.kernels.parity import failures, parity_report
    from cvqd.kernels.sampling import SamplingKernels
    from cvqd.model import step as stepmath
    from cvqd.model.rng import gumbel_noise, seed_keys
    from cvqd.model.schedule import MaskReplaceSchedule

    kern = SamplingKernels(K, device)
    out = {"batch_1": parity_report(kern, device, seq_len=N, batch=1, num_steps=num_steps),
           "batch_4": parity_report(kern, device, seq_len=N, batch=4, num_steps=num_steps)}
    out["failures"] = failures(out["batch_1"]) + failures(out["batch_4"])
    g = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(2, K, N, device=device, generator=g) * 4
    x_t = torch.randint(0, K + 1, (1, N), device=device, generator=g)
    xs = torch.empty_like(x_t)
    keys = seed_keys([0], device)
    step = torch.tensor([3], device=device)
    table = stepmath.build_step_table(MaskReplaceSchedule(K, num_steps), steps, device)

    def fused():
        kern.sample_step(logits, x_t, xs, table.terms, step, keys, guidance=3.0, truncation=0.9, use_null=True)

    def reference():
        stepmath.sample_step(logits, x_t, table.row(step), gumbel_noise(keys, step[0], K + 1, N), guidance=3.0,
                             truncation=0.9, use_null=True)

    timings = {}
    for name, fn in (("fused_kernel", fused), ("torch_step_with_noise", reference)):
        for _ in range(3):
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(50):
            fn()
        end.record()
        torch.cuda.synchronize()
        timings[name] = round(start.elapsed_time(end) / 50, 4)
    out["step_math_per_step_ms"] = timings
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    ap.add_argument("--steps", type=int, default=None, help="reverse steps (default: T of the preset, 100 for paper)")
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--truncation", type=float, default=0.9)
    ap.add_argument("--runs", type=positive_int, default=MIN_RUNS,
                    help=f"timed runs per variant (published medians need >= {MIN_RUNS})")
    ap.add_argument("--warmup", type=positive_int, default=2)
    ap.add_argument("--plan", type=Path, default=None, help="a plan with TensorRT engines for the tensorrt variant")
    ap.add_argument("--ckpt", type=Path, default=None, help="a trained checkpoint instead of --preset's random init")
    ap.add_argument("--ort", action="store_true", help="add ONNX Runtime's CUDA provider (exports a plan of --ckpt)")
    ap.add_argument("--out", default="runtime_gpu.json")
    args = ap.parse_args()

    from cvqd.runtime.backend_torch import backend_from_model
    from cvqd.runtime.pipeline import Pipeline

    try:
        device = torch.device(args.device)
    except RuntimeError:
        ap.error(f"unknown device {args.device!r}; expected cpu, cuda or cuda:N")
    if args.ckpt is not None and not args.ckpt.is_file():
        ap.error(f"--ckpt {args.ckpt} is not a file; expected a cvqd model.pt")
    if args.ort and args.ckpt is None:
        ap.error("--ort exports a plan from a checkpoint; give --ckpt (e.g. cvqd/assets/demo.pt)")
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("no CUDA GPU here; run it on a GPU machine (or --device cpu --preset tiny to "
                 "dry-run the script)")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    precision = args.precision
    if args.ort:
        # every column at one precision: plans are fp32 or fp16, so the torch variants follow the plan
        if precision == "bf16":
            ap.error("--ort compares at one precision and plans are fp32 or fp16; use --precision "
                     "fp16 or fp32")
        if precision == "auto":
            precision = "fp16" if device.type == "cuda" else "fp32"
    model = build_model(args.preset, device, ckpt=args.ckpt)
    cfg = model.cfg
    steps = args.steps or cfg.diffusion.num_steps
    null = model.null_condition().detach().float()
    report = {**provenance(args.ckpt), "benchmark": "runtime_gpu", "preset": cfg.preset if args.ckpt else args.preset,
              "weights": str(args.ckpt) if args.ckpt else "random-init", "steps": steps,
              "guidance": args.guidance, "truncation": args.truncation, "batch": 1, "precision": precision,
              "runs": args.runs, "warmup": args.warmup, "variants": {}}

    variants: dict[str, Pipeline] = {}
    gpu = device.type == "cuda"
    for name, kernels, graphs in [("eager", "off", "off"), ("eager+kernels", "on", "off"),
                                  ("graph+kernels", "on", "on")]:
        if not gpu and kernels == "on":
            continue
        backend = backend_from_model(model, device, None if precision == "auto" else precision,
                                     source=f"{args.preset} random init")
        variants[name] = Pipeline(backend, cfg, null, model_id="random", kernels=kernels, graphs=graphs)
    if args.plan is not None:
        try:
            from cvqd.runtime.pipeline import load_pipeline
            from cvqd.model.plan import load_plan

            variants["tensorrt"] = load_pipeline(plan=load_plan(args.plan), backend="tensorrt", device=str(device))
        except Exception as exc:  # TensorRT missing or engines for another GPU: say so in the report
            report["tensorrt_unavailable"] = str(exc).splitlines()[0]
    else:
        report["tensorrt_unavailable"] = "no --plan with TensorRT engines given (TensorRT is not installed here)"
    if args.ort:
        import tempfile

        from cvqd.export import export_plan
        from cvqd.runtime.backend import ort_cuda_usable

        if not ort_cuda_usable():
            report["onnxruntime_cuda_unavailable"] = "onnxruntime-gpu (CUDAExecutionProvider) is not installed here"
        else:
            t0 = time.perf_counter()
            plan_dir = tempfile.TemporaryDirectory()  # removed when the benchmark exits
            plan = export_plan(args.ckpt, Path(plan_dir.name) / "bench.plan", precision=precision)
            report["ort_plan_export_s"] = round(time.perf_counter() - t0, 1)
            variants["onnxruntime-cuda"] = Pipeline.from_plan(plan, backend="onnxruntime", device=str(device),
                                                              kernels="on" if gpu else "off")

    for name, pipe in variants.items():
        torch.cuda.reset_peak_memory_stats() if gpu else None
        cond = pipe.encode_prompts([PROMPT])
        t0 = time.perf_counter()
        warm = [timed_generate(pipe, 1000 + i, steps, args.guidance, args.truncation) for i in range(args.warmup)]
        e2e = [timed_generate(pipe, i, steps, args.guidance, args.truncation) for i in range(args.runs)]
        loops = [loop_ms(pipe, cond, i, steps, args.guidance, args.truncation) for i in range(args.runs)]
        loop_sum = summary(loops)
        report["variants"][name] = {
            "describe": pipe.describe(), "warmup_ms": [round(w, 1) for w in warm],
            "end_to_end": summary(e2e), "loop": loop_sum,
            "per_step_ms": round(loop_sum["median_ms"] / steps, 4),
            "peak_memory_gib": round(torch.cuda.max_memory_allocated() / (1 << 30), 2) if gpu else None,
            "seconds": round(time.perf_counter() - t0, 1)}
        print(f"{name:>14}: end-to-end {summary(e2e)['median_ms']:.1f} ms, loop {loop_sum['median_ms']:.1f} ms "
              f"({loop_sum['median_ms'] / steps:.3f} ms/step)", file=sys.stderr)
    # tokens of the variants for the same seed (graph replay must equal eager kernels exactly)
    if gpu and {"eager+kernels", "graph+kernels"} <= set(variants):
        c = variants["eager"].encode_prompts([PROMPT])
        toks = {n: variants[n].sample_tokens(c, [7], steps, args.guidance, args.truncation).cpu() for n in variants}
        report["tokens_graph_equals_eager_kernels"] = bool(torch.equal(toks["eager+kernels"], toks["graph+kernels"]))
        report["token_agreement_kernels_vs_torch_step"] = float((toks["eager+kernels"] == toks["eager"]).float().mean())
        if "onnxruntime-cuda" in toks:
            report["token_agreement_ort_cuda_vs_torch_step"] = float(
                (toks["onnxruntime-cuda"] == toks["eager"]).float().mean())
        report["kernel_parity"] = kernel_parity(cfg.transformer.num_classes, cfg.transformer.seq_len, device, steps,
                                                cfg.diffusion.num_steps)
    if gpu:
        lim = hardware_limit(variants["eager"].backend, model, device, args.guidance)
        best = min(v["per_step_ms"] for v in report["variants"].values())
        lim["best_per_step_ms"] = best
        lim["best_over_floor"] = round(best / lim["floor_ms_per_step"], 1) if lim["floor_ms_per_step"] else None
        report["hardware_limit"] = lim
        print(f"  hardware floor: {lim['floor_ms_per_step']:.3f} ms/step (best measured {best:.3f}, "
              f"{lim['best_over_floor']}x)", file=sys.stderr)
    report["load_average_end"] = load_average()
    path = write_json(args.out, report)
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    run_main(main, "python -m benchmarks.runtime_gpu")
