"""Parity of the sampling kernels with their PyTorch references, as one measured report.

Used by the GPU tests (real kernels), the CPU emulation tests (kernels/emulate.py) and the GPU benchmark:

    from cvqd.kernels.parity import parity_report, failures
    report = parity_report(kernels, device="cuda", seq_len=64)      # measured errors per kernel
    assert not failures(report), failures(report)

References: cvqd/model/rng.py (Philox words, bit-exact), cvqd/model/step.py (guide, truncate "bisect", posterior,
sample_step). Tolerances: the kernels compute in float32 like the references but reduce in another order and
use the device's expf/logf, so log-probabilities agree to ~1e-5; Philox words agree bit for bit; a sampled token
may differ only where two Gumbel-perturbed scores lie within float rounding of each other (bounded by a small
mismatch fraction).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

TOLERANCES = {
    "guide_max_abs_err": 5e-5,
    "truncate_kept_mismatch_frac": 2e-3,
    "truncate_kept_values_max_abs_err": 0.0,  # kept classes keep their value exactly
    "posterior_max_abs_err": 1e-4,
    "gumbel_argmax_mismatch_frac": 2e-3,
    "fused_step_mismatch_frac": 5e-3,
}


def parity_report(kern, device: str | torch.device, *, seq_len: int = 32, batch: int = 2, num_steps: int = 16,
                  seed: int = 0) -> dict[str, Any]:
    """Run every kernel of `kern` (SamplingKernels or EmulatedKernels) against its reference on random inputs."""
    from cvqd.model import step as stepmath
    from cvqd.model.rng import gumbel_bits, gumbel_noise, seed_keys
    from cvqd.model.schedule import LOG_ZERO, MaskReplaceSchedule

    dev = torch.device(device)
    K, N, B = kern.num_classes, seq_len, batch
    g = torch.Generator().manual_seed(seed)
    on = lambda t: t.to(dev).contiguous()  # noqa: E731  (inputs made on the CPU, identical for both sides)
    sched = MaskReplaceSchedule(K, num_steps)
    table = stepmath.build_step_table(sched, num_steps, "cpu")  # tensors, moved to the device per use
    keys = seed_keys([seed, seed + 1, 2**40 + 3][:B] + list(range(100, 100 + max(0, B - 3))))
    step_i = 3 % num_steps
    step = torch.tensor([step_i])
    rep: dict[str, Any] = {"K": K, "N": N, "B": B}

    bits = kern.philox_bits(on(keys), on(step), K + 1, N).cpu()
    rep["philox_bits_identical"] = bool(torch.equal(bits, gumbel_bits(keys, step_i, K + 1, N)))

    logits = torch.randn(2 * B, K, N, generator=g) * 4
    errs = []
    for use_null, scale in ((True, 3.0), (True, 1.15), (False, 1.0)):
        rows = logits if use_null else logits[:B].contiguous()
        got = kern.guide(on(rows), B, scale, use_null).cpu()
        errs.append(float((got - stepmath.guide_logits(rows, B, scale, use_null)).abs().max()))
    rep["guide_max_abs_err"] = max(errs)

    lx = F.log_softmax(torch.randn(B, K, N, generator=g) * 4, 1).clamp(LOG_ZERO, 0)
    mism, val = [], []
    for rate in (0.5, 0.85, 0.99):
        got = kern.truncate(on(lx), rate).cpu()
        ref = stepmath.truncate_threshold(lx, rate, "bisect")
        kg, kr = got > LOG_ZERO, ref > LOG_ZERO
        mism.append(float((kg != kr).float().mean()))
        both = kg & kr
        val.append(float((got[both] - ref[both]).abs().max()) if both.any() else 0.0)
    rep["truncate_kept_mismatch_frac"], rep["truncate_kept_values_max_abs_err"] = max(mism), max(val)

    errs = []
    for i in sorted({0, 1, num_steps // 2, num_steps - 1}):  # first, strided middle and last (s = -1) steps
        x_t = torch.randint(0, K + 1, (B, N), generator=g)
        got = kern.posterior(on(lx), on(x_t), on(table.terms), on(torch.tensor([i]))).cpu()
        errs.append(float((got - stepmath.posterior(lx, x_t, table.row(i))).abs().max()))
    rep["posterior_max_abs_err"] = max(errs)

    lp = F.log_softmax(torch.randn(B, K + 1, N, generator=g), 1)
    got = kern.gumbel_argmax(on(lp), on(step), on(keys)).cpu()
    ref = (lp + gumbel_noise(keys, step_i, K + 1, N)).argmax(1)
    rep["gumbel_argmax_mismatch_frac"] = float((got != ref).float().mean())

    mism = []
    for use_null, guidance, trunc in ((True, 3.0, 0.9), (False, 1.0, 1.0), (True, 2.0, 1.0)):
        rows = logits if use_null else logits[:B].contiguous()
        x_t = torch.randint(0, K + 1, (B, N), generator=g)
        out = torch.empty_like(x_t)
        kern.sample_step(on(rows), on(x_t), d_out := on(out), on(table.terms), on(step), on(keys),
                         guidance=guidance, truncation=trunc, use_null=use_null)
        ref = stepmath.sample_step(rows, x_t, table.row(step_i), gumbel_noise(keys, step_i, K + 1, N),
                                   guidance=guidance, truncation=trunc, use_null=use_null, method="bisect")
        mism.append(float((d_out.cpu() != ref).float().mean()))
        # in place (x_out aliases x_t), as the loop runs it
        x_dev = on(x_t)
        kern.sample_step(on(rows), x_dev, x_dev, on(table.terms), on(step), on(keys), guidance=guidance,
                         truncation=trunc, use_null=use_null)
        rep.setdefault("fused_step_in_place_identical", True)
        rep["fused_step_in_place_identical"] &= bool(torch.equal(x_dev.cpu(), d_out.cpu()))
    rep["fused_step_mismatch_frac"] = max(mism)

    s = on(torch.tensor([5]))
    kern.advance_step(s)
    rep["advance_step_ok"] = int(s.cpu()) == 6
    return rep


def failures(report: dict[str, Any]) -> list[str]:
    """What in a parity report is outside its tolerance (empty when everything passes)."""
    bad = [f"{k} = {report[k]:.3g} > {tol:.3g}" for k, tol in TOLERANCES.items() if report[k] > tol]
    bad += [k for k in ("philox_bits_identical", "fused_step_in_place_identical", "advance_step_ok") if not report[k]]
    return bad
