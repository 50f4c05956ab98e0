"""Rebuild the demo plan that ships inside the package: `python -m cvqd.export.bundle`.

The bundled checkpoint (cvqd/assets/demo.pt) is exported to cvqd/assets/demo-plan/ (fp32, max 8 images per
batch), validated like any plan, so that `cvqd-run` and `Pipeline.from_pretrained()` run it with ONNX Runtime
alone: no export on the first run and no torch. Run this after changing the demo checkpoint or the exporter;
tests/test_bundled_plan.py checks that the shipped plan came from the shipped checkpoint and generates the same
images as the torch backend.
"""

from __future__ import annotations

import sys

from cvqd.paths import bundled_model, bundled_plan


def main() -> None:
    from cvqd.export.plan_writer import export_plan

    plan = export_plan(bundled_model(), bundled_plan(), precision="fp32", force=True, progress=sys.stderr.isatty())
    size = sum(f.size for f in plan.files())
    print(f"{plan.root}: {len(plan.files())} files, {size / 1e6:.1f} MB, model {plan.model_id}", file=sys.stderr)


if __name__ == "__main__":
    main()
