import os

import pytest
import torch

# Keep CPU tests from oversubscribing the two cores of the CI machine.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """A randomly initialised `tiny` checkpoint (with its tiny CLIP inside)."""
    from cvqd.training.init import init_checkpoint

    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    init_checkpoint("tiny", path, seed=0)
    return path


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (run on a lent device)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_plan(tiny_ckpt, tmp_path_factory):
    """An fp32 plan directory exported from `tiny_ckpt` (treat as read-only: copy it before changing files)."""
    from cvqd.export import export_plan

    return export_plan(tiny_ckpt, tmp_path_factory.mktemp("plan") / "tiny.plan").root


# ----------------------------------------------------------------------------- training (issue 3) fixtures

@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory):
    """48 captioned shapes images (all colour/shape pairs), for the tiny training stages."""
    from cvqd.training.shapes import render_folder

    return render_folder(tmp_path_factory.mktemp("shapes") / "data", 48, seed=0, split="all", captions=True,
                         progress=False)


@pytest.fixture(scope="session")
def tiny_trained(tmp_path_factory, shapes_data):
    """A `tiny` model through every stage (a few steps each): {"clip", "vqgan", "diffusion", "cfg": ckpt path}."""
    from cvqd.training.train_clip import ClipTrainConfig, train_clip
    from cvqd.training.train_diffusion import DiffusionTrainConfig, train_diffusion
    from cvqd.training.train_vqgan import VQGANTrainConfig, train_vqgan

    root = tmp_path_factory.mktemp("tiny-runs")
    common = dict(quiet=True, log_every=2)
    out = {"clip": train_clip(shapes_data, root / "clip", preset="tiny", device="cpu",
                              cfg=ClipTrainConfig(steps=4, batch_size=16, **common))}
    out["vqgan"] = train_vqgan(shapes_data, root / "vqgan", init=out["clip"], device="cpu",
                               cfg=VQGANTrainConfig(steps=4, batch_size=8, sample_every=0, **common))
    dcfg = DiffusionTrainConfig(steps=4, batch_size=8, sample_every=0, warmup=2, cache_dir=str(root / "cache"), **common)
    out["diffusion"] = train_diffusion(shapes_data, root / "diffusion", init=out["vqgan"], device="cpu", cfg=dcfg)
    out["cfg"] = train_diffusion(shapes_data, root / "cfg", init=out["diffusion"], stage="cfg", device="cpu", cfg=dcfg)
    out["cache"] = root / "cache"
    return out
