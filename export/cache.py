"""The plan cache: a checkpoint's plan, exported once and reused (what `cvqd-run --ckpt` and the bundled model use).

Plan-based backends need a plan: for a checkpoint it is exported once into the cache,
`$CVQD_CACHE/plans/<sha256 of the checkpoint>-<precision>/` (default ~/.cache/cvqd), and reused while the
checkpoint's bytes stay the same. The export is atomic (a temporary directory renamed into place), so an
interrupted first run leaves nothing half-written and two processes racing both end up with a complete plan.
A cached plan that is damaged (a file missing, truncated or changed) is exported again, with a note; plans up to
VERIFY_BYTES are hashed in full on every use, larger ones on first use of each file (their errors name the
command that rebuilds them).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from cvqd.errors import CvqdError
from cvqd.io import file_sha256
from cvqd.model.plan import Plan, PlanError, load_plan
from cvqd.paths import cache_root


VERIFY_BYTES = 256 << 20  # hashing 256 MB takes about half a second


def plan_cache_dir() -> Path:
    return cache_root() / "plans"


def rebuild_command(ckpt: Path, target: Path, precision: str) -> str:
    return f"rebuild it with cvqd-export --ckpt {ckpt} --out {target} --precision {precision} --force"


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
                if sum(f.size for f in plan.files()) <= VERIFY_BYTES:
                    plan.verify()
                plan.rebuild_hint = rebuild_command(ckpt, target, precision)
                return plan
        except PlanError as exc:  # a stale or damaged cache entry: export again below (atomically replacing it)
            if notify is not None:
                notify(f"the cached plan {target} is damaged ({str(exc).split(';')[0][:160]}); exporting it again")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CvqdError(f"cannot create the plan cache {target.parent}: {exc.strerror or exc}; set CVQD_CACHE to a "
                        f"writable directory") from None
    from cvqd.export.plan_writer import export_plan

    if notify is not None:
        notify(f"exporting {ckpt.name} to an ONNX plan in {target} (once; later runs reuse it)")
    plan = export_plan(ckpt, target, precision=precision, force=True)
    plan.rebuild_hint = rebuild_command(ckpt, target, precision)
    return plan
