"""Validation of exported graphs: onnx.checker, then ONNX Runtime (CPU) against PyTorch on random inputs.

Every graph is run by ONNX Runtime's CPU execution provider at two batch sizes (1 and 3: neither is the
export sample's 2, so a batch dimension baked in at export shows up) and compared with the fp32 PyTorch
training modules (`graphs.reference`) on the same random inputs. Measured and recorded in the manifest:

- max_abs_err, and max_rel_err = max|ort - torch| / max|torch| (relative to the output's scale: elementwise
  relative errors blow up on outputs near zero);
- clip_text / clip_image: min cosine similarity between the ORT and torch embeddings;
- transformer: argmax agreement of the x_0 logits over the K classes, per token position;
- ar_prefill / ar_decode: argmax agreement of the next-token logits, and the KV cache's relative error
  (present_max_rel_err, also counted in max_rel_err); the decode step gets a random cache and position, so slots
  it must not attend to hold random values too;
- vq_decoder: PSNR of the images mapped to 8-bit range ((x.clamp(-1, 1) + 1) * 127.5, as the runtime saves);
- vq_encoder: token agreement; its max_abs_err and max_rel_err are the fraction of cells whose code differs (so
  the fp32 tolerance allows no mismatch at these sizes, fp16 2%).

Tolerances (TOLERANCES below) are checked; a graph that misses one is not written (ParityError).
fp16 graphs are compared with the same fp32 reference, so their numbers are the fp16 error of the plan.
Note: on the CPU, ONNX Runtime runs fp16 operators it has no fp16 kernel for in fp32 (it inserts casts),
so CPU validation of an fp16 graph bounds the error of its fp16 weights and casts; GPU arithmetic adds its own.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cvqd.model.config import ModelConfig
from cvqd.errors import CvqdError
from cvqd.model.contracts import Contract

VALIDATION_BATCHES = (1, 3)
PSNR_CAP = 200.0  # dB recorded for identical images (JSON has no infinity)
SOT, EOT = 49406, 49407  # open_clip SimpleTokenizer start/end-of-text ids (EOT is the largest id)

# Limits per precision; "max" keys are upper bounds, "min" keys lower bounds.
TOLERANCES: dict[str, dict[str, float]] = {
    "fp32": {"max_rel_err": 1e-4, "min_cosine": 0.99999, "min_argmax_agreement": 0.999, "min_psnr_db": 60.0},
    "fp16": {"max_rel_err": 2e-2, "min_cosine": 0.999, "min_argmax_agreement": 0.95, "min_psnr_db": 35.0},
}


class ParityError(CvqdError):
    """An exported graph whose outputs disagree with PyTorch beyond the stated tolerance."""


def sample_inputs(contract: Contract, cfg: ModelConfig, batch: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random inputs of a contract at `batch`: ids/tokens in their valid range, float inputs of realistic scale."""
    g = generator
    K, T = cfg.transformer.num_classes, cfg.transformer.num_steps
    out: dict[str, torch.Tensor] = {}
    for spec in contract.inputs:
        shape = spec.concrete(batch)
        if contract.component == "clip_text":
            ctx = shape[1]
            ids = torch.zeros(shape, dtype=torch.int64)
            for b in range(batch):  # [SOT, words..., EOT, 0...], lengths from empty to the full context
                n = int(torch.randint(0, ctx - 1, (1,), generator=g)) if b else ctx - 2
                ids[b, 0] = SOT
                ids[b, 1:n + 1] = torch.randint(1, SOT, (n,), generator=g)
                ids[b, n + 1] = EOT
            out[spec.name] = ids
        elif spec.name == "pixel_values":
            out[spec.name] = torch.randn(shape, generator=g)
        elif spec.name == "images":  # VQ encoder input: images in [-1, 1]
            out[spec.name] = torch.rand(shape, generator=g) * 2 - 1
        elif spec.name == "timestep":
            out[spec.name] = torch.randint(0, T, shape, generator=g)
        elif spec.name == "cond":
            out[spec.name] = F.normalize(torch.randn(shape, generator=g), dim=-1)
        elif spec.name == "tokens" and contract.component == "transformer":
            tok = torch.randint(0, K, shape, generator=g)
            masked = torch.rand(shape, generator=g) < torch.rand((batch, 1), generator=g)  # per-row mask rate
            out[spec.name] = torch.where(masked, torch.full_like(tok, K), tok)  # [MASK] = K
        elif spec.name in ("tokens", "token"):
            out[spec.name] = torch.randint(0, K, shape, generator=g)
        elif spec.name == "position":  # the decode step's token index, 0 .. N-2
            out[spec.name] = torch.randint(0, cfg.ar.seq_len - 1, shape, generator=g)
        else:
            assert spec.dtype == "float32", spec
            out[spec.name] = torch.randn(shape, generator=g)
        assert out[spec.name].dtype == (torch.int64 if spec.dtype == "int64" else torch.float32)
    return out


def check_graph(path: str | Path) -> None:
    """onnx.checker with full shape inference (path-based: works for graphs with external data)."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # onnx raises ValidationError / InferenceError
        raise ParityError(f"{Path(path).name} fails onnx.checker: {' '.join(str(exc).split())[:200]}") from None


def ort_session(path: str | Path):
    """An ONNX Runtime CPU session (external data is found next to the graph file)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def compare(component: str, got: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """Error metrics of one output against its reference (see the module docstring)."""
    assert got.shape == ref.shape, (got.shape, ref.shape)
    if component == "vq_encoder":  # token ids: the error is the fraction of cells whose code differs
        agree = float((got == ref).mean())
        return {"max_abs_err": 1 - agree, "max_rel_err": 1 - agree, "finite": 1.0, "token_agreement": agree}
    diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
    scale = float(np.abs(ref).max()) or 1.0
    m: dict[str, float] = {"max_abs_err": float(diff.max()), "max_rel_err": float(diff.max()) / scale,
                           "finite": float(np.isfinite(got).all())}
    if component in ("clip_text", "clip_image"):
        cos = (got * ref).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(ref, axis=-1) + 1e-12)
        m["min_cosine"] = float(cos.min())
    elif component in ("transformer", "ar_prefill", "ar_decode"):  # [B, K, N] / [B, K]: which class wins
        m["argmax_agreement"] = float((got.argmax(1) == ref.argmax(1)).mean())
    elif component == "vq_decoder":
        to8 = lambda x: (np.clip(x.astype(np.float64), -1, 1) + 1) * 127.5  # noqa: E731
        mse = float(((to8(got) - to8(ref)) ** 2).mean())
        m["psnr_db"] = min(PSNR_CAP, 10 * math.log10(255.0 ** 2 / mse)) if mse > 0 else PSNR_CAP
    return m


def failures(metrics: dict[str, float], tol: dict[str, float]) -> list[str]:
    out = []
    if metrics.get("finite", 1.0) < 1:
        out.append("non-finite outputs")
    if metrics["max_rel_err"] > tol["max_rel_err"]:
        out.append(f"max relative error {metrics['max_rel_err']:.2e} > {tol['max_rel_err']:.0e}")
    for key, lim in (("min_cosine", "min_cosine"), ("argmax_agreement", "min_argmax_agreement"),
                     ("psnr_db", "min_psnr_db")):
        if key in metrics and metrics[key] < tol[lim]:
            out.append(f"{key.replace('_', ' ')} {metrics[key]:.5g} < {tol[lim]}")
    return out


def validate_component(component: str, onnx_path: str | Path, model, contract: Contract, precision: str,
                       batches: tuple[int, ...] = VALIDATION_BATCHES, seed: int = 0) -> dict[str, Any]:
    """Check one exported graph; -> parity record for the manifest. Raises ParityError beyond tolerance."""
    check_graph(onnx_path)
    t0 = time.perf_counter()
    sess = ort_session(onnx_path)
    names = [o.name for o in sess.get_outputs()]
    if names != [o.name for o in contract.outputs]:
        raise ParityError(f"{component}: graph outputs {names} differ from the contract's")
    from cvqd.export.graphs import reference

    tol = TOLERANCES[precision]
    per_batch = []
    gen = torch.Generator().manual_seed(seed)
    for b in batches:
        b = max(contract.min_batch, min(b, contract.max_batch))
        inputs = sample_inputs(contract, model.cfg, b, gen)
        outs = sess.run(None, {k: v.numpy() for k, v in inputs.items()})
        refs = reference(component, model, inputs)
        refs = [r.numpy() for r in (refs if isinstance(refs, tuple) else (refs,))]
        for got, ref in zip(outs, refs):
            if got.shape != ref.shape:
                raise ParityError(f"{component}: graph output shape {got.shape} at batch {b}, PyTorch gives "
                                  f"{ref.shape}")
        row = {"batch": b, **compare(component, outs[0], refs[0])}
        if len(refs) > 1:  # the KV cache (ar graphs): its error counts toward max_rel_err too
            extra = compare("present", outs[1], refs[1])
            row["present_max_rel_err"] = extra["max_rel_err"]
            row["max_rel_err"] = max(row["max_rel_err"], extra["max_rel_err"])
            row["finite"] = min(row["finite"], extra["finite"])
        per_batch.append(row)
    record = {"precision": precision, "provider": "onnxruntime CPUExecutionProvider", "seed": seed,
              **judge_parity(per_batch, tol, "PyTorch fp32 eager (training modules)"),
              "seconds": round(time.perf_counter() - t0, 3)}
    if not record["passed"]:
        raise ParityError(f"{component} ({precision}) disagrees with PyTorch: {'; '.join(record['failures'])} "
                          f"(batches {[p['batch'] for p in per_batch]}); the plan was not written")
    return record


def worst_of(rows: list[dict[str, float]]) -> dict[str, float]:
    """The worst value of each metric over per-batch comparison rows (lowest cosine/agreement/PSNR, largest error)."""
    keys = [k for k in rows[0] if k != "batch"]
    lower_is_worse = {"min_cosine", "argmax_agreement", "psnr_db", "finite"}
    return {k: (min if k in lower_is_worse else max)(r[k] for r in rows) for k in keys}


def judge_parity(rows: list[dict[str, Any]], tol: dict[str, float], reference: str) -> dict[str, Any]:
    """Per-batch comparison rows -> the parity record: the worst value of each metric, the tolerances, and
    passed = no metric outside them (failures says which)."""
    worst = worst_of(rows)
    bad = failures(worst, tol)
    return {"reference": reference, "batches": rows, "worst": worst, "tolerance": tol, "passed": not bad,
            "failures": bad}
