"""The reverse loop (cvqd/model/loop.py) against the reference sampler, its seeding contract, and its shapes."""

import pytest
import torch

import cvqd.model.sampling as sampling
from cvqd.model.config import preset
from cvqd.model.loop import ReverseLoop
from cvqd.runtime.pipeline import load_kernels
from cvqd.model.rng import gumbel_uniforms, seed_keys
from cvqd.model.schedule import MaskReplaceSchedule


@pytest.fixture(scope="module")
def tiny_net():
    from cvqd.model.transformer import DiffusionTransformer

    torch.manual_seed(0)
    cfg = preset("tiny").transformer
    net = DiffusionTransformer(cfg).eval()
    with torch.no_grad():  # a sharper head than the init's, so guidance and truncation matter
        net.head.weight.mul_(40)
    return net, cfg


def _conds(B, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(B, D, generator=g), dim=-1)


@pytest.mark.parametrize("steps,guidance,truncation", [(16, 2.5, 0.8), (5, 3.0, 0.9), (16, 1.0, 1.0), (3, 0.5, 0.6)])
def test_loop_equals_reference_sampler_given_the_same_noise(tiny_net, monkeypatch, steps, guidance, truncation):
    net, cfg = tiny_net
    K, N = cfg.num_classes, cfg.seq_len
    sched = MaskReplaceSchedule(K, cfg.num_steps)
    cond, null = _conds(3, cfg.cond_dim), _conds(1, cfg.cond_dim, seed=9)[0]
    seeds = [4, 5, 6]
    loop = ReverseLoop(net.logits, sched, N, "cpu")
    with torch.no_grad():
        ours = loop.run(cond, null, seeds, steps=steps, guidance=guidance, truncation=truncation)

    # the reference sampler (cvqd/model/sampling.py) with its uniforms replaced by the same Philox stream
    calls = []

    def philox_uniforms(shape, generator, device, dtype=torch.float32):
        calls.append(shape)
        return gumbel_uniforms(seed_keys(seeds), len(calls) - 1, shape[1], shape[2])

    monkeypatch.setattr(sampling, "uniform_noise", philox_uniforms)
    with torch.no_grad():
        ref = sampling.reverse_diffusion(net.logits, sched, cond, null,
                                         seq_len=N, steps=steps, guidance=guidance, truncation=truncation)
    assert len(calls) == steps
    assert torch.equal(ours, ref)
    assert ours.min() >= 0 and ours.max() < K  # the last step samples x_0: no [MASK] left


def test_image_tokens_do_not_depend_on_the_batch(tiny_net):
    net, cfg = tiny_net
    loop = ReverseLoop(net.logits, MaskReplaceSchedule(cfg.num_classes, cfg.num_steps), cfg.seq_len, "cpu")
    cond, null = _conds(3, cfg.cond_dim), _conds(1, cfg.cond_dim, seed=9)[0]
    with torch.no_grad():
        batch = loop.run(cond, null, [10, 11, 12], steps=8, guidance=2.0, truncation=0.9)
        alone = loop.run(cond[1:2], null, [11], steps=8, guidance=2.0, truncation=0.9)
        other = loop.run(cond[1:2], null, [12], steps=8, guidance=2.0, truncation=0.9)
    assert torch.equal(batch[1:2], alone)
    assert not torch.equal(alone, other)


def test_rows_callbacks_and_guidance_one_skips_the_null_rows(tiny_net):
    net, cfg = tiny_net
    seen = []

    def denoise(x, t, c):
        seen.append((x.shape[0], int(t[0]), bool((t == t[0]).all())))
        return net.logits(x, t, c)

    loop = ReverseLoop(denoise, MaskReplaceSchedule(cfg.num_classes, cfg.num_steps), cfg.seq_len, "cpu")
    cond, null = _conds(2, cfg.cond_dim), _conds(1, cfg.cond_dim)[0]
    ticks = []
    with torch.no_grad():
        loop.run(cond, null, [0, 1], steps=4, guidance=3.0, truncation=1.0, callback=lambda i, n: ticks.append((i, n)))
    assert [r for r, _, _ in seen] == [4] * 4 and all(same for *_, same in seen)
    assert [t for _, t, _ in seen] == [15, 10, 5, 0]  # the strided timesteps, T-1 down to 0
    assert ticks == [(1, 4), (2, 4), (3, 4), (4, 4)]
    seen.clear()
    with torch.no_grad():
        loop.run(cond, null, [0, 1], steps=4, guidance=1.0, truncation=1.0)
    assert [r for r, _, _ in seen] == [2] * 4


def test_kernels_are_off_on_cpu():
    assert load_kernels(32, torch.device("cpu"), "auto") is None
    with pytest.raises(Exception, match="CUDA"):
        load_kernels(32, torch.device("cpu"), "on")


def test_auto_never_picks_tensorrt(monkeypatch):
    """Even with TensorRT importable and a GPU visible, `auto` offers only backends this repository's tests run."""
    import cvqd.runtime.backend as backend

    monkeypatch.setattr(backend, "have_module", lambda name: True)
    monkeypatch.setattr(backend, "ort_cuda_usable", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    picks = backend.auto_candidates(have_plan=True, have_ckpt=True, device=None)
    assert picks == [("torch", "cuda"), ("onnxruntime", "cuda"), ("onnxruntime", "cpu"), ("torch", "cpu")]
    assert all(name != "tensorrt" for name, _ in backend.auto_candidates(have_plan=True, have_ckpt=False,
                                                                          device="cuda"))
