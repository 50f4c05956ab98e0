"""fp16 with and without the fp32 islands (norms, softmax), transformer and decoder, on ONNX Runtime CPU.

    python -m benchmarks.export_fp16_ablation --ckpt cvqd/assets/demo.pt

"naive": the training module `.half()` as it is (fp16 LayerNorm/GroupNorm, SDPA attention in fp16);
"islands": cvqd's fp16 export modules (norms and softmax in float32). Both exported the same way, run by ONNX
Runtime CPU on the same random inputs (batch 3) and compared with the PyTorch fp32 reference.
Caveat: ONNX Runtime's CPU provider computes fp16 operators without an fp16 kernel in fp32, so this measures
fp16 weight and activation storage, not GPU fp16 arithmetic. Results: benchmarks/results/export_fp16_ablation_<preset>.json.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.common import provenance, run_main, write_json
from cvqd.threads import set_torch_threads


class NaiveTransformer(torch.nn.Module):
    def __init__(self, transformer):
        super().__init__()
        self.t = copy.deepcopy(transformer).half()

    def forward(self, tokens, timestep, cond):
        return self.t.logits(tokens, timestep, cond.half()).float()


class NaiveDecoder(torch.nn.Module):
    def __init__(self, vqgan):
        super().__init__()
        self.v = copy.deepcopy(vqgan).half()

    def forward(self, tokens):
        return self.v.decode(tokens).float()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", type=Path, required=True)
    ap.add_argument("--batch", type=int, default=3)
    args = ap.parse_args()

    from cvqd.export.graphs import build_graph, reference
    from cvqd.export.onnx_export import EXPORT_SAMPLE_BATCH, export_graph
    from cvqd.export.validate import compare, ort_session, sample_inputs
    from cvqd.model.contracts import contracts
    from cvqd.model.clipvqd import load_model

    set_torch_threads(1)
    model = load_model(args.ckpt)
    specs = contracts(model.cfg)
    results: dict = {}
    with tempfile.TemporaryDirectory() as d:
        for name, naive in (("transformer", NaiveTransformer(model.transformer)),
                            ("vq_decoder", NaiveDecoder(model.vqgan))):
            results[name] = {}
            for label, graph in (("naive", naive), ("islands", build_graph(name, model, "fp16"))):
                out = Path(d) / f"{name}-{label}"
                out.mkdir()
                example = sample_inputs(specs[name], model.cfg, EXPORT_SAMPLE_BATCH, torch.Generator().manual_seed(1))
                exported = export_graph(name, graph.eval(), specs[name], example, out, "fp16")
                inputs = sample_inputs(specs[name], model.cfg, args.batch, torch.Generator().manual_seed(0))
                got = ort_session(exported.path).run(None, {k: v.numpy() for k, v in inputs.items()})[0]
                results[name][label] = compare(name, got, reference(name, model, inputs).numpy())
                print(name, label, {k: float(f"{v:.4g}") for k, v in results[name][label].items()}, flush=True)
    payload = {**provenance(args.ckpt), "benchmark": "export_fp16_ablation", "preset": model.cfg.preset,
               "batch": args.batch, "results": results}
    print(f"wrote {write_json(f'export_fp16_ablation_{model.cfg.preset}.json', payload)}", file=sys.stderr)


if __name__ == "__main__":
    run_main(main, "python -m benchmarks.export_fp16_ablation")
