"""ONNX Runtime's CUDA execution provider (GPU with onnxruntime-gpu only; skipped elsewhere).

Expected: every session really runs on CUDAExecutionProvider (no silent CPU fallback); the transformer's logits
match the torch CPU reference (bound: 5e-3 of the largest logit; ONNX Runtime's CUDA provider may use TF32 matrix
products, ~1e-3 relative); the IOBinding path fills the preallocated torch outputs;
tokens per seed agree with the CPU loop except where a float difference flips a Gumbel-max decision.
"""

import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def pipes(tiny_plan, tiny_ckpt):
    from cvqd.runtime.backend import ort_cuda_usable
    from cvqd.runtime.pipeline import Pipeline

    if not ort_cuda_usable():
        pytest.skip("onnxruntime-gpu (CUDAExecutionProvider) is not installed here")
    return (Pipeline.from_plan(tiny_plan, backend="onnxruntime", device="cuda"),
            Pipeline.from_checkpoint(tiny_ckpt, device="cpu", kernels="off", graphs="off"))


def test_every_session_runs_on_the_cuda_provider(pipes):
    gpu, _ = pipes
    d = gpu.describe()
    assert d["backend"] == "onnxruntime" and d["device"].startswith("cuda")
    assert d["execution_provider"] == "CUDAExecutionProvider", d


def test_cuda_provider_matches_torch(pipes):
    gpu, cpu = pipes
    prompts = ["a red circle", "a blue square on the left", "a green triangle"]
    c_gpu, c_cpu = gpu.encode_prompts(prompts), cpu.encode_prompts(prompts)
    text_err = float((c_gpu.cpu() - c_cpu).abs().max())  # unit vectors: absolute error
    assert c_gpu.is_cuda and text_err <= 5e-3, text_err
    g = torch.Generator().manual_seed(0)
    for trial in range(3):  # fresh random inputs each time
        x = torch.randint(0, 33, (6, 16), generator=g)
        t = torch.randint(0, 16, (6,), generator=g)
        cond = torch.randn(6, c_cpu.shape[1], generator=g)
        cond = cond / cond.norm(dim=1, keepdim=True)
        ref = cpu.backend.denoise(x, t, cond)
        out = gpu.backend.denoise(x.cuda(), t.cuda(), cond.cuda())
        assert out.is_cuda and out.shape == ref.shape and torch.isfinite(out).all()
        err = (out.cpu() - ref).abs().max() / ref.abs().max()
        assert err <= 5e-3, (trial, float(err))
    imgs_gpu = gpu.backend.decode(torch.randint(0, 32, (2, 16), generator=g).cuda())
    assert imgs_gpu.is_cuda and torch.isfinite(imgs_gpu).all()


def test_cuda_provider_tokens_agree_with_cpu(pipes):
    gpu, cpu = pipes
    prompts = ["a red circle", "a blue square", "a green triangle", "a small yellow circle"]
    c = cpu.encode_prompts(prompts)
    seeds = list(range(8))  # 8 images x (conditional + null) rows = the tiny plan's maximum batch of 16
    cc = c[torch.arange(8) % 4]
    ref = cpu.sample_tokens(cc, seeds, 16, 2.0, 0.9)
    out = gpu.sample_tokens(cc.cuda(), seeds, 16, 2.0, 0.9).cpu()
    assert (out == ref).all(1).float().mean() >= 0.9
    images = gpu(prompts[:2], seed=3, steps=8)
    assert len(images) == 2 and images[0].size == (16, 16)
