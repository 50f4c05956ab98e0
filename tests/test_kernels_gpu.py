"""Parity of each fused CUDA kernel with its PyTorch reference (GPU only: skipped without CUDA).

Tolerances: the kernels compute in float32 like the references but reduce in a different order and use the
device's expf/logf, so log-probs agree to ~1e-5 absolute; Philox words agree bit for bit; sampled tokens agree
except where two Gumbel-perturbed scores lie within float rounding of each other (allowed: < 0.1% of positions).
"""

import pytest
import torch
import torch.nn.functional as F

from cvqd.runtime import step as stepmath
from cvqd.runtime.rng import gumbel_bits, gumbel_noise, seed_keys
from cvqd.runtime.schedule import LOG_ZERO, MaskReplaceSchedule

pytestmark = pytest.mark.gpu

KS = [32, 256, 4096, 30]


@pytest.fixture(scope="module", params=KS)
def kern(request):
    from cvqd.kernels.sampling import SamplingKernels

    return SamplingKernels(request.param, "cuda")


def _logits(R, K, N, seed=0, temp=3.0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(R, K, N, device="cuda", generator=g) * temp


def test_philox_bits_identical(kern):
    keys = seed_keys([0, 123456789, -5], "cuda")
    step = torch.tensor([7], device="cuda")
    for C in (kern.num_classes + 1, 5):
        got = kern.philox_bits(keys, step, C, 33)
        assert torch.equal(got.cpu(), gumbel_bits(keys.cpu(), 7, C, 33))


@pytest.mark.parametrize("use_null,scale", [(True, 3.0), (True, 1.15), (False, 1.0)])
def test_guide(kern, use_null, scale):
    B, K, N = 3, kern.num_classes, 40
    logits = _logits(2 * B if use_null else B, K, N)
    got = kern.guide(logits, B, scale, use_null)
    ref = stepmath.guide_logits(logits.cpu(), B, scale, use_null)
    assert torch.allclose(got.cpu(), ref, atol=2e-5, rtol=0)


@pytest.mark.parametrize("rate", [0.5, 0.85, 0.9, 0.99])
def test_truncate(kern, rate):
    B, K, N = 2, kern.num_classes, 64
    lx = F.log_softmax(_logits(B, K, N, seed=1, temp=4.0), 1).clamp(LOG_ZERO, 0)
    got = kern.truncate(lx, rate).cpu()
    ref = stepmath.truncate_threshold(lx.cpu(), rate, "bisect")
    kept_got, kept_ref = got > LOG_ZERO, ref > LOG_ZERO
    # identical kept sets except where a partial mass is within rounding of the rate
    assert (kept_got != kept_ref).float().mean() < 1e-3
    assert torch.equal(got[kept_got & kept_ref], ref[kept_got & kept_ref])


@pytest.mark.parametrize("steps", [None, 5])
def test_posterior(kern, steps):
    K, N, B = kern.num_classes, 48, 3
    sched = MaskReplaceSchedule(num_classes=K, num_steps=16)
    table = stepmath.build_step_table(sched, steps or 16, "cuda")
    for i in range(table.num_steps):
        lx = F.log_softmax(_logits(B, K, N, seed=i), 1).clamp(LOG_ZERO, 0)
        x_t = torch.randint(0, K + 1, (B, N), device="cuda")
        got = kern.posterior(lx, x_t, table.terms, torch.tensor([i], device="cuda"))
        ref = stepmath.posterior(lx.cpu(), x_t.cpu(), stepmath.build_step_table(sched, steps or 16).row(i))
        assert torch.allclose(got.cpu(), ref, atol=5e-5, rtol=0), i


def test_gumbel_argmax(kern):
    K, N, B = kern.num_classes, 64, 4
    logp = F.log_softmax(_logits(B, K + 1, N, seed=2), 1)
    keys = seed_keys([1, 2, 3, 4], "cuda")
    got = kern.gumbel_argmax(logp, torch.tensor([3], device="cuda"), keys).cpu()
    ref = (logp.cpu() + gumbel_noise(keys.cpu(), 3, K + 1, N)).argmax(1)
    assert (got != ref).float().mean() < 1e-3


@pytest.mark.parametrize("use_null,trunc", [(True, 0.9), (False, 1.0), (True, 1.0)])
def test_fused_step(kern, use_null, trunc):
    K, N, B = kern.num_classes, 64, 3
    sched = MaskReplaceSchedule(num_classes=K, num_steps=16)
    table = stepmath.build_step_table(sched, 16, "cuda")
    keys = seed_keys([10, 11, 12], "cuda")
    x = torch.randint(0, K + 1, (B, N), device="cuda")
    logits = _logits(2 * B if use_null else B, K, N, seed=4)
    step = torch.tensor([2], device="cuda")
    out = torch.empty_like(x)
    kern.sample_step(logits, x, out, table.terms, step, keys, guidance=3.0 if use_null else 1.0, truncation=trunc,
                     use_null=use_null)
    ref = stepmath.sample_step(logits.cpu(), x.cpu(), stepmath.build_step_table(sched, 16).row(2),
                               gumbel_noise(keys.cpu(), 2, K + 1, N), guidance=3.0 if use_null else 1.0,
                               truncation=trunc, use_null=use_null, method="bisect")
    assert (out.cpu() != ref).float().mean() < 1e-3
    kern.sample_step(logits, x, x, table.terms, step, keys, guidance=3.0 if use_null else 1.0, truncation=trunc,
                     use_null=use_null)  # in place
    assert torch.equal(x, out)
    kern.advance_step(step)
    assert step.item() == 3
