"""Checkpoint -> plan directory (ONNX graphs, TensorRT engines, manifest).

    from cvqd.export import export_plan
    plan = export_plan("model.pt", "model.plan", precision="fp32")   # -> cvqd.model.plan.Plan

The reading side of a plan (`load_plan`) lives in `cvqd.model.plan`, so the runtime never imports this package.
"""

from cvqd.export.plan_writer import export_plan

__all__ = ["export_plan"]
