"""The demo plan shipped in the package (cvqd/assets/demo-plan, rebuilt by `python -m cvqd.export.bundle`)."""

import numpy as np
import pytest

from cvqd.io import file_sha256
from cvqd.model.config import preset
from cvqd.model.plan import load_plan
from cvqd.paths import bundled_model, bundled_plan

MAX_BYTES = 25_000_000


def test_bundled_plan_is_the_bundled_checkpoint_verified_and_small():
    plan = load_plan(bundled_plan(), verify=True)  # every file's sha256 against the manifest
    assert plan.source["sha256"] == file_sha256(bundled_model()), (
        "the shipped plan was not exported from the shipped checkpoint: run python -m cvqd.export.bundle")
    assert plan.precision == "fp32" and plan.config.preset == "demo"
    assert plan.tokenizer_path() is not None  # the runtime needs no open_clip
    assert sum(f.size for f in plan.files()) + (plan.root / "manifest.json").stat().st_size <= MAX_BYTES


@pytest.mark.slow
def test_bundled_plan_and_checkpoint_give_the_same_tokens():
    """Same prompts and seeds through the plan (ONNX Runtime, numpy step) and the checkpoint (torch backend)."""
    from cvqd.runtime.pipeline import Pipeline

    plan = Pipeline.from_pretrained()
    ckpt = Pipeline.from_checkpoint(bundled_model(), device="cpu")
    prompts = ["a small red circle on the left", "a large blue square in the center", "a green triangle"]
    settings = plan.resolve(None, 3.0, None)  # with guidance: the null rows too
    cond_p, cond_t = plan.encode_prompts(prompts), ckpt.encode_prompts(prompts).numpy()
    assert np.abs(cond_p - cond_t).max() < 1e-5
    seeds = [0, 1, 2**40 + 7]
    a = plan.sample_tokens(cond_p, seeds, **settings)
    b = ckpt.sample_tokens(ckpt.encode_prompts(prompts), seeds, **settings).numpy()
    assert (a == b).mean() >= 0.99  # the denoisers differ by float rounding; a rare near-tie may flip a token


def test_bundled_ar_plan_is_the_bundled_ar_checkpoint_on_the_same_tokenizer_and_clip():
    """The CLIP-GEN demo (cvqd/assets/demo-ar-plan, `python -m cvqd.export.bundle demo-ar`) is its checkpoint's
    export, and shares the diffusion demo's VQGAN and CLIP (the comparison isolates the generator)."""
    import torch

    from cvqd.model.checkpoint import load_checkpoint

    plan = load_plan(bundled_plan("demo-ar"), verify=True)
    assert plan.source["sha256"] == file_sha256(bundled_model("demo-ar")), (
        "the shipped AR plan was not exported from the shipped AR checkpoint: run python -m cvqd.export.bundle demo-ar")
    assert plan.config.generator == "ar" and plan.config.preset == "demo-ar" and plan.tokenizer_path() is not None
    assert plan.config.ar == preset("demo-ar").ar and plan.config.sampling == preset("demo-ar").sampling
    ar, base = load_checkpoint(bundled_model("demo-ar")), load_checkpoint(bundled_model())
    assert ar.config.vqgan == base.config.vqgan and ar.config.clip.model_cfg == base.config.clip.model_cfg
    for part in ("vqgan", "clip"):
        for k, v in base.state[part].items():
            assert torch.equal(ar.state[part][k], v), f"{part}.{k} differs from the diffusion demo's"


@pytest.mark.slow
def test_bundled_ar_plan_and_checkpoint_give_the_same_tokens():
    from cvqd.runtime.pipeline import Pipeline

    plan = Pipeline.from_pretrained(name="demo-ar")
    ckpt = Pipeline.from_checkpoint(bundled_model("demo-ar"), device="cpu")
    prompts = ["a small red circle on the left", "a blue square", "a green triangle at the top"]
    settings = plan.resolve()
    seeds = [0, 1, 2**40 + 7]
    a = plan.sample_tokens(plan.encode_prompts(prompts), seeds, **settings)
    b = ckpt.sample_tokens(ckpt.encode_prompts(prompts), seeds, **settings).numpy()
    assert (a == b).mean() >= 0.99  # float rounding of the two networks may flip a rare near-tie
