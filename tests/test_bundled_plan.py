"""The demo plan shipped in the package (cvqd/assets/demo-plan, rebuilt by `python -m cvqd.export.bundle`)."""

import numpy as np
import pytest

from cvqd.io import file_sha256
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
