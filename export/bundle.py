"""Rebuild a demo plan that ships inside the package: `python -m cvqd.export.bundle [demo | demo-ar]`.

The bundled checkpoint (cvqd/assets/demo.pt) is exported to cvqd/assets/demo-plan/ (fp32, max 8 images per
batch), validated like any plan, so that `cvqd-run` and `Pipeline.from_pretrained()` run it with ONNX Runtime
alone: no export on the first run and no torch. Run this after changing the demo checkpoint or the exporter;
tests/test_bundled_plan.py checks that the shipped plan came from the shipped checkpoint and generates the same
images as the torch backend. `demo-ar` (the CLIP-GEN demo) shares its CLIP, VQ and tokenizer files with the
diffusion demo's plan: they are stored once, as symlinks into demo-plan/.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from cvqd.paths import bundled_model, bundled_plan


def share_files(plan_dir: Path, other: Path) -> list[str]:
    """Replace each file of `plan_dir` that is byte-identical (sha256) to the same-named file of plan `other` by a
    relative symlink to it: the AR demo's CLIP, VQ and tokenizer files are the diffusion demo's, so the repository
    stores them once (a wheel copies the targets). The plan's manifest is unchanged; its hashes still hold."""
    from cvqd.io import file_sha256
    from cvqd.model.plan import load_plan

    theirs = {f.file: f.sha256 for f in load_plan(other).files()}
    shared = []
    for f in load_plan(plan_dir).files():
        if theirs.get(f.file) == f.sha256 and not (plan_dir / f.file).is_symlink():
            target = os.path.relpath(other / f.file, plan_dir)
            (plan_dir / f.file).unlink()
            (plan_dir / f.file).symlink_to(target)
            assert file_sha256(plan_dir / f.file) == f.sha256
            shared.append(f.file)
    return shared


def main(argv: list[str] | None = None) -> None:
    from cvqd.export.plan_writer import export_plan

    argv = sys.argv[1:] if argv is None else argv
    name = argv[0] if argv else "demo"  # "demo-ar": the autoregressive demo (cvqd/assets/demo-ar.pt)
    plan = export_plan(bundled_model(name), bundled_plan(name), precision="fp32", force=True,
                       progress=sys.stderr.isatty())
    if name != "demo":
        shared = share_files(plan.root, bundled_plan("demo"))
        if shared:
            print(f"{plan.root}: {', '.join(shared)} are the demo plan's (same sha256): linked, stored once",
                  file=sys.stderr)
    size = sum(f.size for f in plan.files())
    print(f"{plan.root}: {len(plan.files())} files, {size / 1e6:.1f} MB, model {plan.model_id}", file=sys.stderr)


if __name__ == "__main__":
    main()
