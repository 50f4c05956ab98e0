"""CPU cost of the reverse step's math (guidance, truncation, posterior, Gumbel-max) in its three possible forms.

    python -m benchmarks.step_cpu                  # demo (K=256, N=64) and paper (K=4096, N=256) shapes

The torch-free runtime needs the step without torch. It could run the one step implementation
(cvqd/model/step.py) on numpy arrays, or the same code exported once to an ONNX graph and run by ONNX Runtime
beside the denoiser. This measures, on the same random logits, tokens and Philox noise, per step:
  numpy        cvqd.model.step.sample_step on numpy arrays (what the CPU runtime runs)
  torch        the same function on torch CPU tensors (the CPU path before the runtime dropped torch), 1 thread
  onnx-graph   the same function exported to ONNX (torch.onnx.export with dynamo, opset 18) and run in ONNX Runtime, 1 thread
interleaved in rounds, after a warm-up, for guidance 1 (B rows) and guidance 3 (2B rows), truncation 0.85. The
three give the same tokens here (checked); the JSON (benchmarks/results/step_cpu.json) records medians with spread
and the machine.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import MIN_RUNS, load_average, positive_int, provenance, run_main, summary, write_json

SHAPES = {"demo": (256, 64), "paper": (4096, 256)}


def onnx_step(K: int, N: int, B: int, guidance: float, truncation: float, folder: Path):
    """The step exported to ONNX and loaded in ONNX Runtime, one thread. guidance and truncation are baked in as
    constants (the step branches on them in Python); a plan would carry one graph per setting or take them as
    inputs, which costs the same per step."""
    import onnxruntime as ort
    import torch

    from cvqd.model import step as stepmath

    use_null = guidance != 1.0

    class Step(torch.nn.Module):
        def forward(self, logits, x_t, terms, noise):
            return stepmath.sample_step(logits, x_t, {name: terms[i] for i, name in enumerate(stepmath.TERM_NAMES)},
                                        noise, guidance=guidance, truncation=truncation, use_null=use_null)

    R = 2 * B if use_null else B
    ex = (torch.randn(R, K, N), torch.full((B, N), K), torch.zeros(9), torch.zeros(B, K + 1, N))
    path = folder / f"step-{K}-{N}-{B}-{guidance:g}.onnx"
    torch.onnx.export(Step(), ex, str(path), opset_version=18, dynamo=True, verbose=False,
                      input_names=["logits", "x_t", "terms", "noise"])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def run(logits, x_t, terms, noise):
        return sess.run(None, {"logits": logits, "x_t": x_t, "terms": terms, "noise": noise})[0]

    return run


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.step_cpu", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=positive_int, default=MIN_RUNS)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--out", default="step_cpu.json")
    args = ap.parse_args()
    import torch

    from cvqd.model import step as stepmath
    from cvqd.model.rng import gumbel_noise, seed_key_array
    from cvqd.model.schedule import MaskReplaceSchedule

    torch.set_num_threads(1)
    report = {**provenance(None), "benchmark": "step_cpu", "runs": args.runs, "truncation": 0.85, "results": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for shape, (K, N) in SHAPES.items():
            sched = MaskReplaceSchedule(K, 100)
            table = stepmath.build_step_table(sched, 25)
            terms = table.row(10)
            terms_arr = table.terms[10]
            for B in args.batch:
                for guidance in (1.0, 3.0):
                    use_null = guidance != 1.0
                    R = 2 * B if use_null else B
                    rng = np.random.default_rng(K + B)
                    logits = (rng.standard_normal((R, K, N)) * 4).astype(np.float32)
                    x_t = np.where(rng.random((B, N)) < 0.5, K, rng.integers(0, K, (B, N))).astype(np.int64)
                    noise = gumbel_noise(seed_key_array(list(range(B))), 10, K + 1, N)
                    t_logits, t_x, t_noise = map(torch.from_numpy, (logits, x_t, noise))
                    t_terms = table.to("cpu").row(10)
                    kw = dict(guidance=guidance, truncation=0.85, use_null=use_null)
                    forms = {
                        "numpy": lambda: stepmath.sample_step(logits, x_t, terms, noise, **kw),
                        "torch": lambda: stepmath.sample_step(t_logits, t_x, t_terms, t_noise, **kw).numpy(),
                    }
                    try:
                        run = onnx_step(K, N, B, guidance, 0.85, Path(tmp))
                        forms["onnx-graph"] = lambda: run(logits, x_t, terms_arr, noise)
                        onnx_error = None
                    except Exception as exc:  # an exporter that cannot trace the step: recorded, not fatal
                        onnx_error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                    outs = {name: fn() for name, fn in forms.items()}
                    agree = {name: float((o == outs["numpy"]).mean()) for name, o in outs.items()}
                    for fn in forms.values():
                        fn()
                    times = {name: [] for name in forms}
                    for i in range(args.runs):
                        for name in (list(forms) if i % 2 == 0 else list(forms)[::-1]):
                            t = time.perf_counter()
                            forms[name]()
                            times[name].append((time.perf_counter() - t) * 1e3)
                    key = f"{shape}_B{B}_guidance{guidance:g}"
                    report["results"][key] = {"K": K, "N": N, "B": B, "rows": R, "guidance": guidance,
                                              "token_agreement_with_numpy": agree, "onnx_error": onnx_error,
                                              **{name: summary(ts) for name, ts in times.items()}}
                    print(f"{key}: " + ", ".join(f"{n} {summary(ts)['median_ms']:.2f} ms" for n, ts in times.items()),
                          file=sys.stderr, flush=True)
    report["load_average_end"] = load_average()
    print(f"wrote {write_json(args.out, report)}", file=sys.stderr)


if __name__ == "__main__":
    run_main(main, "python -m benchmarks.step_cpu")
