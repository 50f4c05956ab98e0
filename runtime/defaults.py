"""The bundled demo model and the plan cache: what `cvqd-run --prompt ...` runs when given nothing else.

The default checkpoint is cvqd/assets/demo.pt (the training issue's bundled model), or the file named by
`$CVQD_DEFAULT_MODEL` (tests point it at a tiny checkpoint). Plan-based backends need a plan: it is exported
once into the cache, `$CVQD_CACHE/plans/<sha256 of the checkpoint>-<precision>/` (default ~/.cache/cvqd), and
reused while the checkpoint's bytes stay the same. The export is atomic (a temporary directory renamed into
place), so an interrupted first run leaves nothing half-written and two processes racing both end up with a
complete plan.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import cvqd
from cvqd.errors import CvqdError
from cvqd.kernels.nvrtc import cache_root
from cvqd.runtime.plan import Plan, PlanError, load_plan

DEFAULT_MODEL_ENV = "CVQD_DEFAULT_MODEL"
BUNDLED_MODEL = Path(cvqd.__file__).resolve().parent / "assets" / "demo.pt"


def default_checkpoint() -> Path:
    """The checkpoint `cvqd-run` uses without --ckpt/--engine: $CVQD_DEFAULT_MODEL or the bundled demo model."""
    env = os.environ.get(DEFAULT_MODEL_ENV)
    path = Path(env).expanduser() if env else BUNDLED_MODEL
    if not path.is_file():
        where = f"${DEFAULT_MODEL_ENV}={env}" if env else f"the bundled demo model {path}"
        raise CvqdError(f"no model given and {where} is missing; pass --ckpt MODEL.pt or --engine PLAN_DIR")
    return path


def plan_cache_dir() -> Path:
    return cache_root() / "plans"


def cached_plan(ckpt: str | os.PathLike, precision: str = "fp32", digest: str | None = None,
                notify: Callable[[str], None] | None = None, progress: bool = False) -> Plan:
    """The plan of `ckpt` from the cache, exported into it first if needed (keyed by the checkpoint's sha256)."""
    from cvqd.runtime.pipeline import file_digest

    ckpt = Path(ckpt)
    digest = digest or file_digest(ckpt)
    target = plan_cache_dir() / f"{digest[:24]}-{precision}"
    if target.is_dir():
        try:
            plan = load_plan(target)
            if plan.source.get("sha256") == digest and plan.precision == precision:
                return plan
        except PlanError:
            pass  # a stale or damaged cache entry: export again below (atomically replacing it)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CvqdError(f"cannot create the plan cache {target.parent}: {exc.strerror or exc}; set CVQD_CACHE to a "
                        f"writable directory") from None
    try:
        from cvqd.export import export_plan
    except ImportError as exc:
        raise CvqdError(f"exporting a plan needs cvqd.export ({exc}); pass --engine PLAN_DIR or --backend torch") from None
    if notify is not None:
        notify(f"exporting {ckpt.name} to an ONNX plan in {target} (once; later runs reuse it)")
    return export_plan(ckpt, target, precision=precision, force=True, progress=progress)
