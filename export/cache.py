"""The plan cache: a checkpoint's plan, exported once and reused (what `cvqd-run --ckpt` and the bundled model use).

Plan-based backends need a plan: for a checkpoint it is exported once into the cache,
`$CVQD_CACHE/plans/<sha256 of the checkpoint>-<precision>/` (default ~/.cache/cvqd), and reused while the
checkpoint's bytes stay the same. The export is atomic (a temporary directory renamed into place), so an
interrupted first run leaves nothing half-written and two processes racing both end up with a complete plan.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from cvqd.errors import CvqdError
from cvqd.io import file_sha256
from cvqd.model.plan import Plan, PlanError, load_plan
from cvqd.paths import cache_root


def plan_cache_dir() -> Path:
    return cache_root() / "plans"


def cached_plan(ckpt: str | os.PathLike, precision: str = "fp32",
                notify: Callable[[str], None] | None = None) -> Plan:
    """The plan of `ckpt` from the cache, exported into it first if needed (keyed by the checkpoint's sha256)."""
    ckpt = Path(ckpt)
    digest = file_sha256(ckpt)
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
    from cvqd.export.plan_writer import export_plan

    if notify is not None:
        notify(f"exporting {ckpt.name} to an ONNX plan in {target} (once; later runs reuse it)")
    return export_plan(ckpt, target, precision=precision, force=True)
