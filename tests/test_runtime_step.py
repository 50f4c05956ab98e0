"""The torch step (cvqd/model/step.py) against the loop's reference math (cvqd/model/sampling.py, schedule.py)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cvqd.model import step as stepmath
from cvqd.model.rng import gumbel_noise, seed_keys
from cvqd.model.sampling import guide, truncate
from cvqd.model.schedule import LOG_ZERO, MaskReplaceSchedule


def _log_x0(B, K, N, temp, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.log_softmax(torch.randn(B, K, N, generator=g) * temp, dim=1).clamp(LOG_ZERO, 0)


@pytest.mark.parametrize("method", ["sort", "bisect"])
@pytest.mark.parametrize("K,temp", [(32, 1.0), (256, 3.0), (1024, 5.0)])
@pytest.mark.parametrize("rate", [0.3, 0.75, 0.9, 0.99])
def test_threshold_truncation_equals_sort_reference(method, K, temp, rate):
    lx = _log_x0(2, K, 8, temp, seed=K)
    got = stepmath.truncate_threshold(lx, rate, method)
    ref = truncate(lx, rate)
    # no exact ties in continuous random data: the kept sets are identical
    assert torch.equal(got, ref)
    assert torch.equal(torch.from_numpy(stepmath.truncate_threshold(lx.numpy(), rate, method)), ref)  # numpy form


def test_truncation_keeps_every_tied_class_and_always_the_top():
    lx = torch.tensor([0.3, 0.3, 0.2, 0.1, 0.1]).log().view(1, 5, 1)
    tied = torch.tensor([0.4, 0.2, 0.2, 0.2]).log().view(1, 4, 1)
    for method in ("sort", "bisect"):
        kept = lambda x, r: (stepmath.truncate_threshold(x, r, method) > LOG_ZERO).view(-1).tolist()  # noqa: E731
        assert kept(lx, 0.35) == [True, True, False, False, False]
        assert kept(lx, 0.65) == [True, True, True, False, False]
        assert kept(lx, 1e-6) == [True, True, False, False, False]  # the (tied) top is always kept
        # mass above 0.2 is 0.4 < 0.5: every 0.2 qualifies; the sort keeps only the first one it ranks
        assert kept(tied, 0.5) == [True, True, True, True]
    ref = (truncate(tied, 0.5) > LOG_ZERO).view(-1)
    assert ref.sum() == 2  # the documented difference at exact ties: an order-dependent subset
    assert torch.equal(stepmath.truncate_threshold(lx, 1.0), lx)


def test_bisect_and_sort_thresholds_agree():
    lx = _log_x0(3, 512, 16, 4.0, seed=1)
    for rate in (0.5, 0.9):
        a = stepmath.truncation_threshold(lx, rate, "sort")
        b = stepmath.truncation_threshold(lx, rate, "bisect")
        # numpy form: its own exp rounds differently from torch's in the last bit, so compare within numpy
        a_np = stepmath.truncation_threshold(lx.numpy(), rate, "sort")
        assert np.array_equal(a_np, stepmath.truncation_threshold(lx.numpy(), rate, "bisect"))
        assert torch.allclose(torch.from_numpy(a_np), a, rtol=1e-6, atol=0)
        assert torch.equal(a, b)


def test_guide_logits_matches_the_model_head_and_reference_guidance():
    torch.manual_seed(0)
    B, K, N = 2, 16, 5
    logits = torch.randn(2 * B, K, N) * 4
    # the transformer's head: log_softmax over K, clamp; then the reference guide
    head = F.log_softmax(logits, dim=1).clamp(LOG_ZERO, 0)
    ref = guide(head[:B], head[B:], 3.0)
    assert torch.allclose(stepmath.guide_logits(logits, B, 3.0, use_null=True), ref, atol=1e-6)
    assert torch.allclose(stepmath.guide_logits(logits[:B], B, 1.0, use_null=False), head[:B], atol=1e-6)


def test_step_table_holds_the_schedule_terms():
    sched = MaskReplaceSchedule(num_classes=32, num_steps=16)
    table = stepmath.build_step_table(sched, 5)
    pairs = sched.strided_steps(5)
    assert table.t.tolist() == [t for t, _ in pairs] and table.s.tolist() == [s for _, s in pairs]
    assert table.terms.shape == (5, 9)
    assert isinstance(table.terms, np.ndarray) and table.terms.dtype == np.float32  # the CPU loop's form
    dev_table = stepmath.build_step_table(sched, 5, "cpu")  # the device loop's form: tensors
    for i, (t, s) in enumerate(pairs):
        terms = sched.posterior_terms(t, s)
        row = table.row(i)
        dev_row = dev_table.row(torch.tensor([i]))
        for name in stepmath.TERM_NAMES:
            assert torch.equal(torch.as_tensor(row[name]), terms[name].float()), name
            assert torch.equal(dev_row[name], terms[name].float())


@pytest.mark.parametrize("steps", [16, 4])
def test_posterior_from_table_equals_q_posterior(steps):
    K, N, B = 32, 12, 3
    sched = MaskReplaceSchedule(num_classes=K, num_steps=16)
    table = stepmath.build_step_table(sched, steps)
    g = torch.Generator().manual_seed(3)
    for i, (t, s) in enumerate(sched.strided_steps(steps)):
        lx = _log_x0(B, K, N, 2.0, seed=i)
        x_t = torch.randint(0, K + 1, (B, N), generator=g)
        ref = sched.q_posterior(lx, x_t, t, s)
        assert torch.equal(stepmath.posterior(lx, x_t, table.to("cpu").row(i)), ref)
        # the numpy form of the same code: equal up to the libraries' exp/log rounding
        got = stepmath.posterior(lx.numpy(), x_t.numpy(), table.row(i))
        assert got.dtype == np.float32 and torch.allclose(torch.from_numpy(got), ref, atol=2e-5, rtol=0)


def test_sample_step_composes_the_stages():
    K, N, B = 32, 12, 2
    sched = MaskReplaceSchedule(num_classes=K, num_steps=16)
    table = stepmath.build_step_table(sched, 16)
    logits = torch.randn(2 * B, K, N) * 3
    x_t = torch.full((B, N), K)
    noise = gumbel_noise(seed_keys([0, 1]), 0, K + 1, N)
    x = stepmath.sample_step(logits, x_t, table.to("cpu").row(0), noise, guidance=2.0, truncation=0.8, use_null=True)
    x_np = stepmath.sample_step(logits.numpy(), x_t.numpy(), table.row(0), noise.numpy(), guidance=2.0,
                                truncation=0.8, use_null=True)
    assert x_np.dtype == np.int64 and np.array_equal(x_np, x.numpy())
    lx = truncate(guide(F.log_softmax(logits[:B], 1).clamp(LOG_ZERO, 0),
                        F.log_softmax(logits[B:], 1).clamp(LOG_ZERO, 0), 2.0), 0.8)
    ref = (sched.q_posterior(lx, x_t, 15, 14) + noise).argmax(1)
    assert x.shape == (B, N) and x.dtype == torch.int64 and torch.equal(x, ref)
