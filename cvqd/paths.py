"""Where cvqd keeps things: the cache root and the bundled demo model.

    cache_root()          $CVQD_CACHE or ~/.cache/cvqd: plans exported on first run (plans/), compiled CUDA
                          kernels (kernels/), cached training features (features/), TensorRT timing caches (trt/)
    bundled_model()       cvqd/assets/demo.pt inside the installed package: the demo checkpoint, for training,
                          export and the torch backend
    bundled_plan()        cvqd/assets/demo-plan/ inside the installed package: the same model exported to a plan,
                          what `cvqd-run` and `Pipeline.from_pretrained()` run by default (no export, no torch);
                          bundled_plan("demo-ar"): the autoregressive (CLIP-GEN) demo's plan, demo-ar-plan/
    default_checkpoint()  what `cvqd-eval` (and `cvqd-run --backend torch`) use without --ckpt/--engine:
                          $CVQD_DEFAULT_MODEL (tests point it at a tiny checkpoint) or the bundled checkpoint
"""

from __future__ import annotations

import os
from pathlib import Path

from cvqd.errors import CvqdError

CACHE_ENV = "CVQD_CACHE"
DEFAULT_MODEL_ENV = "CVQD_DEFAULT_MODEL"


def cache_root() -> Path:
    """`$CVQD_CACHE` or ~/.cache/cvqd."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cvqd"


BUNDLED = ("demo", "demo-ar")  # the bundled models: the diffusion demo and the autoregressive (CLIP-GEN) demo


def _bundled_name(name: str) -> str:
    if name not in BUNDLED:
        raise CvqdError(f"unknown bundled model {name!r}; expected one of {list(BUNDLED)}")
    return name


def bundled_model(name: str = "demo") -> Path:
    """A demo checkpoint shipped inside the package (it may be absent from a stripped install)."""
    return Path(__file__).resolve().parent / "assets" / f"{_bundled_name(name)}.pt"


def bundled_plan(name: str = "demo") -> Path:
    """A demo model's plan shipped inside the package (made by `python -m cvqd.export.bundle`)."""
    return Path(__file__).resolve().parent / "assets" / f"{_bundled_name(name)}-plan"


def default_model_override() -> Path | None:
    """$CVQD_DEFAULT_MODEL when set (a checkpoint that replaces the bundled model), else None."""
    env = os.environ.get(DEFAULT_MODEL_ENV)
    return Path(env).expanduser() if env else None


def default_checkpoint() -> Path:
    """$CVQD_DEFAULT_MODEL or the bundled demo model; CvqdError when that file is missing."""
    env = os.environ.get(DEFAULT_MODEL_ENV)
    path = Path(env).expanduser() if env else bundled_model()
    if not path.is_file():
        where = f"${DEFAULT_MODEL_ENV}={env}" if env else f"the bundled demo model {path}"
        raise CvqdError(f"no model given and {where} is missing; pass --ckpt MODEL.pt or --engine PLAN_DIR")
    return path
