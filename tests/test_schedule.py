"""The schedule against brute force: explicit (K+1)x(K+1) transition matrices and Bayes' rule."""

import numpy as np
import pytest
import torch

from cvqd.model.schedule import LOG_ZERO, MaskReplaceSchedule

K, T = 5, 8
# A schedule with real replacement mass (the defaults are almost pure masking), so every term is exercised.
PARAMS = dict(att_1=0.9, att_T=0.05, ctt_1=0.02, ctt_T=0.9)


def transition(a, b, g, k=K):
    """[Q]_{mn} = q(x_t = m | x_{t-1} = n) on states 0..K-1 real, K = [MASK]."""
    q = np.zeros((k + 1, k + 1))
    q[:k, :k] = b
    q[np.arange(k), np.arange(k)] += a
    q[k, :k] = g
    q[k, k] = 1.0
    return q


@pytest.fixture(scope="module")
def sched():
    return MaskReplaceSchedule(K, T, **PARAMS)


@pytest.fixture(scope="module")
def mats(sched):
    steps = [transition(sched.alpha[t], sched.beta[t], sched.gamma[t]) for t in range(T)]
    cum = [steps[0]]
    for t in range(1, T):
        cum.append(steps[t] @ cum[-1])
    return steps, cum


def test_matrices_are_stochastic(mats):
    steps, _ = mats
    for q in steps:
        assert (q >= 0).all()
        np.testing.assert_allclose(q.sum(0), 1.0, atol=1e-12)


def test_cumulative_terms_match_matrix_products(sched, mats):
    _, cum = mats
    for t in range(T):
        np.testing.assert_allclose(transition(sched.abar[t], sched.bbar[t], sched.gbar[t]), cum[t], atol=1e-12)
    # the linear cumulative schedule (docs/algorithm.md#schedule) and the identity padding at index T
    np.testing.assert_allclose(sched.abar[:T], np.linspace(PARAMS["att_1"], PARAMS["att_T"], T))
    np.testing.assert_allclose(sched.gbar[:T], np.linspace(PARAMS["ctt_1"], PARAMS["ctt_T"], T))
    assert sched.abar[T] == 1 and sched.gbar[T] == 0 and sched.bbar[T] == 0


def test_default_schedule_is_nearly_pure_masking():
    s = MaskReplaceSchedule(4096)
    np.testing.assert_allclose(s.abar[:100] + s.gbar[:100], 0.999999, atol=1e-12)
    assert (s.beta > 0).all() and (s.alpha <= 1).all() and (s.gamma >= 0).all()


def test_forward_marginal_matches_matrices(sched, mats):
    _, cum = mats
    x0 = torch.arange(K).view(1, K)  # each real class once
    for t in range(T):
        got = sched.log_q_xt_given_x0(x0, t)[0].exp().double().numpy()  # [K+1, K] columns = x0
        np.testing.assert_allclose(got, cum[t][:, :K], atol=1e-6)


def brute_posterior(p, xt, t, s, mats):
    """sum_x0 p(x0) q(x_s | x_t, x0) from explicit matrices (Bayes' rule)."""
    steps, cum = mats
    q_st = np.eye(K + 1)
    for u in range(s + 1, t + 1):
        q_st = steps[u] @ q_st  # q(x_t | x_s)
    q_s0 = np.eye(K + 1) if s < 0 else cum[s]  # q(x_s | x_0)
    post = np.zeros(K + 1)
    for x0 in range(K):
        joint = q_st[xt, :] * q_s0[:, x0]
        post += p[x0] * joint / joint.sum()
    return post


@pytest.mark.parametrize("strided", [False, True])
def test_posterior_matches_bayes(sched, mats, strided):
    rng = np.random.default_rng(0)
    worst = 0.0
    for t in range(T):
        for s in (range(-1, t) if strided else [t - 1]):
            p = rng.dirichlet(np.ones(K) * 0.7)
            log_p = torch.tensor(np.log(p), dtype=torch.float32).view(1, K, 1).expand(1, K, K + 1).contiguous()
            xt = torch.arange(K + 1).view(1, K + 1)  # every state of x_t, one position each
            got = sched.q_posterior(log_p, xt, t, None if not strided else s)[0].exp().double().numpy()
            for j in range(K + 1):
                want = brute_posterior(p, j, t, s, mats)
                worst = max(worst, np.abs(got[:, j] - want).max())
    assert worst < 2e-6, worst


def test_posterior_batched_timesteps_equal_scalar(sched):
    g = torch.Generator().manual_seed(1)
    log_p = torch.log_softmax(torch.randn(4, K, 6, generator=g), 1)
    xt = torch.randint(0, K + 1, (4, 6), generator=g)
    t = torch.tensor([1, 3, 5, 7])
    s = torch.tensor([0, -1, 2, 6])
    batched = sched.q_posterior(log_p, xt, t, s)
    for b in range(4):
        single = sched.q_posterior(log_p[b:b + 1], xt[b:b + 1], int(t[b]), int(s[b]))
        torch.testing.assert_close(batched[b:b + 1], single)


def test_posterior_rows_sum_to_one_default_schedule():
    s = MaskReplaceSchedule(64, 100)
    g = torch.Generator().manual_seed(0)
    log_p = torch.log_softmax(3 * torch.randn(3, 64, 10, generator=g), 1)
    xt = torch.randint(0, 65, (3, 10), generator=g)
    for t, sp in [(99, 98), (50, 49), (1, 0), (0, -1), (99, -1), (80, 20)]:
        post = s.q_posterior(log_p, xt, t, sp)
        assert post.shape == (3, 65, 10)
        assert post.max() <= 0 and post.min() >= LOG_ZERO
        torch.testing.assert_close(post.exp().sum(1), torch.ones(3, 10), atol=1e-4, rtol=0)


def test_t0_posterior_samples_x0_directly():
    """At t = 0 (s = -1) q(x_t | x_s) and q(x_t | x_0) cancel: the step samples p_theta(x_0) at every
    position (masked or not), and [MASK] gets no mass."""
    s = MaskReplaceSchedule(16, 100)
    log_p = torch.log_softmax(torch.randn(2, 16, 5), 1)
    xt = torch.tensor([[16, 16, 3, 16, 7], [16, 2, 16, 16, 16]])
    post = s.q_posterior(log_p, xt, 0)
    torch.testing.assert_close(post[:, :16], log_p, atol=1e-4, rtol=0)
    assert (post[:, 16] == LOG_ZERO).all()
    # a prediction consistent with an unmasked x_t keeps it
    sharp = torch.full((1, 16, 1), LOG_ZERO).index_fill_(1, torch.tensor([3]), 0.0)
    assert s.q_posterior(sharp, torch.tensor([[3]]), 0)[0, 3, 0].exp() > 0.999


def test_forward_noising_frequencies(sched, mats):
    _, cum = mats
    n = 200_000
    g = torch.Generator().manual_seed(0)
    for t in (0, 3, 7):
        x0 = torch.full((1, n), 2)
        xt = sched.q_sample(x0, t, generator=g)
        freq = torch.bincount(xt[0], minlength=K + 1).double().numpy() / n
        np.testing.assert_allclose(freq, cum[t][:, 2], atol=4 * np.sqrt(0.25 / n))
    # batched timesteps
    xt = sched.q_sample(torch.zeros(2, n, dtype=torch.long), torch.tensor([0, 7]), generator=g)
    assert (xt[0] == K).double().mean() < 0.05 and (xt[1] == K).double().mean() > 0.85


def test_strided_steps():
    s = MaskReplaceSchedule(8, 100)
    assert s.strided_steps(100) == [(t, t - 1) for t in range(99, -1, -1)]
    assert s.strided_steps(1) == [(99, -1)]
    for n in (2, 7, 25, 50, 99):
        pairs = s.strided_steps(n)
        ts = [t for t, _ in pairs]
        assert len(pairs) == n and ts[0] == 99 and pairs[-1] == (0, -1)
        assert all(a > b for a, b in zip(ts, ts[1:])) and all(sp == t2 for (_, sp), (t2, _) in zip(pairs, pairs[1:]))
    with pytest.raises(ValueError):
        s.strided_steps(0)
    with pytest.raises(ValueError):
        s.strided_steps(101)
    with pytest.raises(ValueError):
        s.q_posterior(torch.zeros(1, 8, 1), torch.zeros(1, 1, dtype=torch.long), 5, 5)
