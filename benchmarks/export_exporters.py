"""Evidence for the exporter choice: TorchScript ("legacy", dynamo=False) vs dynamo exporter, same modules.

    python -m benchmarks.export_exporters --ckpt cvqd/assets/demo.pt

For every component (the export modules of cvqd.export.graphs, fp32) and both exporters at opset 18:
export seconds, graph nodes before/after onnxslim, whether ONNX Runtime loads the graph, parity against PyTorch
at batch 1 and 3 (max relative error), and ONNX Runtime CPU latency (median of 20 runs, 1 thread). Also tries
open_clip's own `encode_text` unchanged (nn.MultiheadAttention under torch.no_grad, where its fast path is
active) with both exporters. Results: printed table and benchmarks/results/export_exporters_<preset>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import provenance, run_main, summary, write_json
from cvqd.threads import set_torch_threads


def export(graph, args, names, outs, exporter: str, path: Path) -> float:
    t0 = time.perf_counter()
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if exporter == "legacy":
            torch.onnx.export(graph, args, str(path), dynamo=False, opset_version=18, input_names=names,
                              output_names=outs, dynamic_axes={n: {0: "batch"} for n in (*names, *outs)})
        else:
            batch = torch.export.Dim("batch", min=1, max=1 << 16)
            prog = torch.onnx.export(graph, args, None, dynamo=True, opset_version=18, input_names=names,
                                     output_names=outs, dynamic_shapes={n: {0: batch} for n in names}, verbose=False)
            import onnx

            onnx.save_model(prog.model_proto, str(path))
    return time.perf_counter() - t0


def measure(component, graph, ref_fn, contract, cfg, exporter, tmp: Path) -> dict:
    import onnx
    import onnxruntime as ort
    import onnxslim

    from cvqd.export.validate import compare, sample_inputs

    names, outs = [s.name for s in contract.inputs], [s.name for s in contract.outputs]
    example = sample_inputs(contract, cfg, 2, torch.Generator().manual_seed(1))
    path = tmp / f"{component}.{exporter}.onnx"
    row: dict = {}
    try:
        row["export_s"] = round(export(graph, tuple(example[n] for n in names), names, outs, exporter, path), 2)
    except Exception as exc:  # the point is to record which exporter fails
        row["error"] = f"export failed: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
        return row
    model = onnx.load(str(path))
    row["nodes"] = len(model.graph.node)
    with contextlib.redirect_stdout(io.StringIO()):
        row["nodes_after_onnxslim"] = len(onnxslim.slim(model).graph.node)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.log_severity_level = 1, 3
    try:
        sess = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        row["error"] = f"onnxruntime rejects the graph: {' '.join(str(exc).split())[:200]}"
        return row
    gen = torch.Generator().manual_seed(0)
    errs = []
    for b in (1, 3):
        inputs = sample_inputs(contract, cfg, b, gen)
        got = sess.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
        errs.append(compare(component, got, ref_fn(inputs).numpy())["max_rel_err"])
    row["max_rel_err"] = max(errs)
    feeds = {k: v.numpy() for k, v in sample_inputs(contract, cfg, 1, gen).items()}
    for _ in range(3):
        sess.run(None, feeds)
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        times.append((time.perf_counter() - t0) * 1e3)
    row["ort_latency_batch1"] = summary(times)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", type=Path, required=True)
    args = ap.parse_args()

    import torch.nn.functional as F

    from cvqd.export.graphs import build_graph, reference
    from cvqd.model.contracts import COMPONENTS, contracts
    from cvqd.model.clipvqd import load_model

    set_torch_threads(1)
    model = load_model(args.ckpt)
    cfg = model.cfg
    specs = contracts(cfg)
    results: dict = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for name in COMPONENTS:
            graph = build_graph(name, model, "fp32")
            ref = lambda inputs, name=name: reference(name, model, inputs)  # noqa: E731
            results[name] = {ex: measure(name, graph, ref, specs[name], cfg, ex, tmp) for ex in ("legacy", "dynamo")}
            print(name, {ex: {k: v for k, v in r.items() if k != "ort_latency_batch1"} for ex, r in
                         results[name].items()}, flush=True)

        class RawText(torch.nn.Module):  # open_clip unchanged: MultiheadAttention and the EOT gather
            def __init__(self, clip):
                super().__init__()
                self.clip = clip

            def forward(self, input_ids):
                return F.normalize(self.clip.encode_text(input_ids).float(), dim=-1)

        raw = RawText(model.require_clip().model).eval()
        ref = lambda inputs: reference("clip_text", model, inputs)  # noqa: E731
        results["clip_text_open_clip_unchanged"] = {
            ex: measure("clip_text", raw, ref, specs["clip_text"], cfg, ex, tmp) for ex in ("legacy", "dynamo")}
        print("clip_text (open_clip unchanged)", results["clip_text_open_clip_unchanged"], flush=True)
    payload = {**provenance(args.ckpt), "benchmark": "export_exporters", "preset": cfg.preset, "opset": 18,
               "results": results}
    print(f"wrote {write_json(f'export_exporters_{cfg.preset}.json', payload)}", file=sys.stderr)


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    run_main(main, "python -m benchmarks.export_exporters")
