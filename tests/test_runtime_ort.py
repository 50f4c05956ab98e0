"""The loop on ONNX Runtime vs torch (same tokens per seed), the Python API, and the ORT path's lean imports."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image


@pytest.fixture(scope="module")
def pipes(tiny_plan, tiny_ckpt):
    from cvqd.runtime.pipeline import Pipeline

    return Pipeline.from_plan(tiny_plan, backend="onnxruntime"), Pipeline.from_checkpoint(tiny_ckpt)


def test_onnxruntime_and_torch_loops_give_the_same_tokens(pipes):
    """Both backends draw the same Philox noise, so tokens differ only if the denoisers' float differences flip
    a Gumbel-max decision. Bound: ONNX Runtime's fp32 graphs match torch to ~1e-6 on the logits here, and no
    image of 16 (seeds x prompts, guided and truncated) differs in a single token."""
    ort, pt = pipes
    prompts = ["a red circle", "a blue square on the left", "a green triangle", "two purple shapes"]
    c_ort, c_pt = ort.encode_prompts(prompts), pt.encode_prompts(prompts)
    assert isinstance(c_ort, np.ndarray)  # the CPU plan path works on numpy arrays (no torch)
    assert torch.allclose(torch.from_numpy(c_ort), c_pt, atol=1e-5)
    x = torch.randint(0, 33, (8, 16), generator=torch.Generator().manual_seed(0))
    t = torch.arange(8) * 2
    cond = torch.cat([c_pt, c_pt])
    l_ort = torch.from_numpy(ort.backend.denoise(x.numpy(), t.numpy(), cond.numpy()))
    l_pt = pt.backend.denoise(x, t, cond)
    assert (l_ort - l_pt).abs().max() <= 1e-4 * l_pt.abs().max()
    differing = 0
    for seed in range(4):
        seeds = [100 * seed + i for i in range(4)]
        a = torch.from_numpy(ort.sample_tokens(c_pt.numpy(), seeds, steps=16, guidance=2.5, truncation=0.85))
        b = pt.sample_tokens(c_pt, seeds, steps=16, guidance=2.5, truncation=0.85)
        differing += int((a != b).any(dim=1).sum())
    assert differing == 0


def test_python_api_from_plan(tiny_plan):
    from cvqd.runtime.pipeline import Pipeline

    from cvqd.runtime.backend import ort_cuda_usable

    pipe = Pipeline.from_plan(tiny_plan)  # auto: onnxruntime, on the GPU where onnxruntime-gpu can use one
    provider = "CUDAExecutionProvider" if ort_cuda_usable() else "CPUExecutionProvider"
    assert pipe.backend.name == "onnxruntime" and pipe.describe()["execution_provider"] == provider
    images = pipe(["a red circle", "a blue square"], seed=5, steps=4)
    assert len(images) == 2 and all(isinstance(im, Image.Image) and im.size == (16, 16) for im in images)
    again = pipe("a blue square", seed=5, steps=4)
    assert again[0].tobytes() == images[1].tobytes()
    res = pipe.generate(["a red circle"], seed=0, num_images=2, best_of=2, steps=3)
    assert [g.index for g in res] == [0, 1] and res[0].seed in (0, 1) and res[1].seed in (2, 3)
    assert {"best_of", "clip_score", "model", "backend"} <= set(res[0].params)


def test_running_a_plan_on_onnxruntime_never_imports_training_or_open_clip(tiny_plan, tmp_path):
    code = f"""
import sys
from cvqd.runtime.pipeline import Pipeline
pipe = Pipeline.from_plan({str(tiny_plan)!r}, backend="onnxruntime")
pipe("a red circle", seed=0, steps=2)
bad = sorted(m for m in sys.modules if m.startswith(("cvqd.training", "cvqd.export", "open_clip")))
print("IMPORTED", bad)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "IMPORTED []" in proc.stdout, proc.stdout
