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
