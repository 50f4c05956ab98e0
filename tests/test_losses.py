"""VQ-Diffusion losses and the importance sampler."""

import torch

from cvqd.model.config import DiffusionConfig
from cvqd.model.schedule import MaskReplaceSchedule
from cvqd.training.losses import ImportanceSampler, diffusion_loss, diffusion_loss_terms, log_onehot

K, N, T = 10, 12, 20


def setup():
    sched = MaskReplaceSchedule(K, T)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, K, (6, N), generator=g)
    t = torch.tensor([0, 1, 5, 10, 18, 19])
    xt = sched.q_sample(x0, t, g)
    return sched, x0, t, xt


def test_loss_is_minimal_for_the_true_prediction():
    sched, x0, t, xt = setup()
    cfg = DiffusionConfig(num_steps=T)
    vb, aux = diffusion_loss_terms(log_onehot(x0, K), x0, xt, t, sched, cfg)
    assert vb.abs().max() < 1e-3 and aux.abs().max() < 1e-3
    wrong = torch.log_softmax(torch.randn(6, K, N), 1)
    vb_w, aux_w = diffusion_loss_terms(wrong, x0, xt, t, sched, cfg)
    assert (vb_w[1:] > 1.0).all() and (aux_w > 0).all()


def test_loss_decreases_as_prediction_sharpens():
    sched, x0, t, xt = setup()
    cfg = DiffusionConfig(num_steps=T)
    losses = []
    for sharp in (0.0, 1.0, 3.0, 10.0):
        pred = torch.log_softmax(sharp * log_onehot(x0, K).exp() + 0.0, 1)
        loss, _ = diffusion_loss(pred, x0, xt, t, torch.full((6,), 1 / T), sched, cfg)
        losses.append(loss.item())
    assert all(a > b for a, b in zip(losses, losses[1:])), losses


def test_aux_weight_decays_with_t():
    sched, x0, _, _ = setup()
    cfg = DiffusionConfig(num_steps=T)
    pred = torch.log_softmax(torch.zeros(2, K, N), 1)
    xt = torch.full((2, N), K)  # everything masked: same -log p for both
    _, aux = diffusion_loss_terms(pred, x0[:2], xt, torch.tensor([2, 18]), sched, cfg)
    torch.testing.assert_close(aux[0] / aux[1], torch.tensor((2 - 2 / T) / (2 - 18 / T)))


def test_importance_sampler_uniform_then_weighted():
    s = ImportanceSampler(T)
    g = torch.Generator().manual_seed(0)
    t, pt = s.sample(64, g)
    assert torch.allclose(pt, torch.full((64,), 1 / T))
    for step in range(15):
        tt = torch.arange(T)
        s.update(tt, torch.where(tt > 10, 10.0, 1.0))
    assert s.ready()
    p = s.probs()
    assert p[15] > 5 * p[5] and torch.isclose(p.sum(), torch.tensor(1.0, dtype=torch.float64))
    assert p[0] == p[1]
    state = s.state_dict()
    s2 = ImportanceSampler(T)
    s2.load_state_dict(state)
    assert torch.equal(s2.probs(), p)
