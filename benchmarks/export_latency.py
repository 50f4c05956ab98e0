"""ONNX Runtime (CPU) vs PyTorch eager latency per component, measured side by side in one run.

    python -m benchmarks.export_latency --ckpt cvqd/assets/demo.pt [--plan demo.plan] [--runs 50]

Exports the checkpoint to a plan first when --plan is not given (into a temporary folder, removed at the end) or
is missing. For each component, at the
batch the runtime uses (clip_text 1 prompt, clip_image 1 image, transformer 2 rows = conditional + null, vq_decoder
1 image), the PyTorch reference (the training modules, fp32, torch.inference_mode) and the ONNX Runtime session
of the plan get the same inputs; iterations alternate between the two so load from other jobs on the shared cores
hits both alike. Warm-up runs are excluded and reported separately. Results: printed table and
benchmarks/results/export_latency_<preset>.json.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import positive_int, provenance, run_main, summary, write_json
from cvqd.threads import set_torch_threads

BATCH = {"clip_text": 1, "clip_image": 1, "transformer": 2, "vq_decoder": 1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", type=Path, required=True)
    ap.add_argument("--plan", type=Path, default=None, help="plan of --ckpt (exported if absent)")
    ap.add_argument("--runs", type=positive_int, default=50)
    ap.add_argument("--warmup", type=positive_int, default=5)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                    help="thread counts to measure, each for both torch and ONNX Runtime")
    args = ap.parse_args()

    import onnxruntime as ort

    from cvqd.export import export_plan
    from cvqd.export.graphs import reference
    from cvqd.export.validate import compare, sample_inputs
    from cvqd.io import file_sha256
    from cvqd.machine import model_sha256
    from cvqd.model.plan import load_plan
    from cvqd.model.clipvqd import load_model

    scratch = None if args.plan else Path(tempfile.mkdtemp(prefix="cvqd-bench-"))
    plan_dir = args.plan or scratch / f"{args.ckpt.stem}.plan"
    if not (plan_dir / "manifest.json").is_file():
        print(f"exporting {args.ckpt} -> {plan_dir}", file=sys.stderr)
        export_plan(args.ckpt, plan_dir, progress=True)
    plan = load_plan(plan_dir)
    model = load_model(args.ckpt)
    if plan.source.get("sha256") != file_sha256(args.ckpt):
        raise SystemExit(f"{plan_dir} was not exported from {args.ckpt}")

    all_results: dict[str, dict] = {}
    for threads in args.threads:
        set_torch_threads(threads)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        results = all_results[str(threads)] = {}
        gen = torch.Generator().manual_seed(0)
        for name, batch in BATCH.items():
            contract = plan.contracts[name]
            sess = ort.InferenceSession(str(plan.onnx_path(name)), sess_options=opts, providers=["CPUExecutionProvider"])
            inputs = sample_inputs(contract, model.cfg, batch, gen)
            feeds = {k: v.numpy() for k, v in inputs.items()}
            run_torch = lambda: reference(name, model, inputs)  # noqa: E731
            run_ort = lambda: sess.run(None, feeds)  # noqa: E731
            warm = {"torch": [], "onnxruntime": []}
            for _ in range(args.warmup):
                for key, fn in (("torch", run_torch), ("onnxruntime", run_ort)):
                    t0 = time.perf_counter()
                    fn()
                    warm[key].append((time.perf_counter() - t0) * 1e3)
            times = {"torch": [], "onnxruntime": []}
            for i in range(args.runs):
                order = (("torch", run_torch), ("onnxruntime", run_ort)) if i % 2 == 0 else \
                    (("onnxruntime", run_ort), ("torch", run_torch))
                for key, fn in order:
                    t0 = time.perf_counter()
                    fn()
                    times[key].append((time.perf_counter() - t0) * 1e3)
            err = compare(name, run_ort()[0], run_torch().numpy())
            row = {"batch": batch, "torch": summary(times["torch"]), "onnxruntime": summary(times["onnxruntime"]),
                   "warmup_ms": {k: [round(x, 2) for x in v] for k, v in warm.items()}, "max_rel_err": err["max_rel_err"]}
            row["speedup_median"] = row["torch"]["median_ms"] / row["onnxruntime"]["median_ms"]
            results[name] = row
            print(f"{threads} thr {name:<12} batch {batch}: torch {row['torch']['median_ms']:8.2f} ms "
                  f"[p10 {row['torch']['p10_ms']:.2f}, p90 {row['torch']['p90_ms']:.2f}]  onnxruntime "
                  f"{row['onnxruntime']['median_ms']:8.2f} ms [p10 {row['onnxruntime']['p10_ms']:.2f}, "
                  f"p90 {row['onnxruntime']['p90_ms']:.2f}]  speedup {row['speedup_median']:.2f}x", flush=True)
    payload = {**provenance(args.ckpt), "plan_manifest_sha256": model_sha256(plan_dir),
               "benchmark": "export_latency", "what": "per-component latency, ONNX Runtime CPU EP vs PyTorch eager "
               "(fp32, same inputs, interleaved iterations)", "plan": str(plan_dir),
               "preset": plan.config.preset, "precision": plan.precision, "threads": args.threads,
               "runs": args.runs, "warmup": args.warmup, "results_by_threads": all_results}
    if scratch is not None:
        shutil.rmtree(scratch, ignore_errors=True)
    path = write_json(f"export_latency_{plan.config.preset}_{plan.precision}.json", payload)
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    run_main(main, "python -m benchmarks.export_latency")
