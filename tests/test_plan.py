"""The plan reader (cvqd/model/plan.py): manifest round trip, integrity checks, TensorRT engine checks."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from cvqd.model.checkpoint import load_checkpoint
from cvqd.model.contracts import COMPONENTS, EXPORTED, contracts
from cvqd.model.plan import (MANIFEST, EngineEntry, PlanError, PlanFile, check_engines, current_trt_gpu,
                               engine_mismatch, file_sha256, load_plan)


@pytest.fixture
def plan_copy(tiny_plan, tmp_path):
    """A private copy of the tiny plan, free to damage."""
    dst = tmp_path / "copy.plan"
    shutil.copytree(tiny_plan, dst)
    return dst


def edit_manifest(root, fn):
    m = json.loads((root / MANIFEST).read_text())
    fn(m)
    (root / MANIFEST).write_text(json.dumps(m))


def one_line_error(fn, *match):
    with pytest.raises(PlanError) as exc:
        fn()
    msg = str(exc.value)
    assert "\n" not in msg
    for m in match:
        assert m in msg, msg
    return msg


def test_manifest_round_trip(tiny_plan, tiny_ckpt):
    from cvqd.model.clipvqd import load_model

    plan = load_plan(tiny_plan, verify=True)
    ckpt = load_checkpoint(tiny_ckpt)
    assert plan.config.to_dict() == ckpt.config.to_dict()
    assert plan.contracts == contracts(ckpt.config, max_images=8)
    assert set(plan.components) == set(EXPORTED) and plan.precision == "fp32"
    model = load_model(tiny_ckpt)
    # exact float32 round trip via JSON
    assert torch.equal(torch.from_numpy(plan.null_embedding), model.null_condition().detach())
    assert abs(float(np.linalg.norm(plan.null_embedding)) - 1) < 1e-6
    assert (plan.tokenizer.name, plan.tokenizer.context_length) == ("ViT-B-32", 77)
    assert plan.sampling == ckpt.config.sampling
    assert plan.source["sha256"] == file_sha256(tiny_ckpt) and plan.model_id == plan.source["sha256"][:12]
    assert plan.source["stage"] == ckpt.stage and plan.source["step"] == ckpt.step
    m = plan.manifest
    assert m["schedule"]["num_steps"] == ckpt.config.diffusion.num_steps and m["schedule"]["att_1"] == 0.99999
    for key in ("cvqd", "torch", "onnx", "onnxruntime", "onnxslim"):
        assert m["versions"][key]
    assert m["exporter"]["opset"] == 18 and "dynamo" in m["exporter"]["name"]
    for name, c in plan.components.items():
        assert plan.onnx_path(name) == tiny_plan / f"{name}.onnx"
        assert c.parity["passed"] and len(c.parity["batches"]) == 2
    assert plan.engines == {}


def test_missing_or_foreign_plans(tmp_path, plan_copy):
    one_line_error(lambda: load_plan(tmp_path / "nope"), "not found")
    (tmp_path / "file").write_text("x")
    one_line_error(lambda: load_plan(tmp_path / "file"), "not a plan directory")
    (tmp_path / "empty").mkdir()
    one_line_error(lambda: load_plan(tmp_path / "empty"), "no manifest.json")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / MANIFEST).write_text("{not json")
    one_line_error(lambda: load_plan(tmp_path / "bad"), "invalid JSON at line 1")
    (tmp_path / "bad" / MANIFEST).write_bytes(b"\xff\xfe")
    one_line_error(lambda: load_plan(tmp_path / "bad"), "not UTF-8 text")
    (tmp_path / "bad" / MANIFEST).write_text(json.dumps({"format": "something-else", "version": 1}))
    one_line_error(lambda: load_plan(tmp_path / "bad"), "not a cvqd plan manifest")

    edit_manifest(plan_copy, lambda m: m.update(version=99))
    one_line_error(lambda: load_plan(plan_copy), "version 99", "newer")
    edit_manifest(plan_copy, lambda m: m.update(version=1))
    edit_manifest(plan_copy, lambda m: m["components"].pop("vq_decoder"))
    one_line_error(lambda: load_plan(plan_copy), "lacks components", "vq_decoder")


def test_malformed_manifest_fields(plan_copy):
    edit_manifest(plan_copy, lambda m: m.pop("null_embedding"))
    one_line_error(lambda: load_plan(plan_copy), "malformed", "null_embedding")
    edit_manifest(plan_copy, lambda m: m.update(null_embedding={"values": [0.0, 1.0]}))
    one_line_error(lambda: load_plan(plan_copy), "null embedding has 2 values")
    edit_manifest(plan_copy, lambda m: m.update(null_embedding={"values": [0.0] * 32}, precision="int3"))
    one_line_error(lambda: load_plan(plan_copy), "unknown precision")


def test_unsafe_file_names_are_refused(plan_copy):
    edit_manifest(plan_copy, lambda m: m["components"]["transformer"]["onnx"].update(file="../outside.onnx"))
    one_line_error(lambda: load_plan(plan_copy), "not a name inside the plan directory")


def test_missing_truncated_and_corrupt_files(plan_copy):
    path = plan_copy / "transformer.onnx"
    data = path.read_bytes()
    path.unlink()
    one_line_error(lambda: load_plan(plan_copy), "incomplete", "transformer.onnx is missing")
    path.write_bytes(data[:-10])
    one_line_error(lambda: load_plan(plan_copy), "truncated", "transformer.onnx")
    corrupt = bytearray(data)
    corrupt[len(corrupt) // 2] ^= 0xFF  # same size: only the sha256 can tell
    path.write_bytes(bytes(corrupt))
    plan = load_plan(plan_copy)  # lazy: loads, other components still usable
    plan.onnx_path("vq_decoder")
    one_line_error(lambda: plan.onnx_path("transformer"), "does not match the plan manifest", "sha256")
    one_line_error(lambda: load_plan(plan_copy, verify=True), "transformer.onnx", "sha256")
    path.write_bytes(data)
    load_plan(plan_copy, verify=True)


def _engine(cc="9.0", version="10.8.0"):
    return EngineEntry("transformer", PlanFile("t.engine", "0" * 64, 1), version, cc, "NVIDIA H100", "fp16",
                       {"min": 1, "opt": 2, "max": 16})


def test_engine_checks(tiny_plan):
    assert engine_mismatch(_engine(), "10.8.0", "9.0") is None
    why = engine_mismatch(_engine(), "10.9.0", "8.9")
    assert "TensorRT 10.8.0" in why and "compute capability 9.0 on NVIDIA H100" in why and "8.9" in why
    assert _engine().sm == "sm_90"

    plan = load_plan(tiny_plan)
    one_line_error(lambda: check_engines(plan, trt_version="10.8.0", compute_capability="9.0"),
                   "no TensorRT engines", f"cvqd-export --plan {tiny_plan} --trt")
    one_line_error(lambda: plan.engine_path("transformer"), "no TensorRT engine")
    plan.engines = {c: _engine() for c in COMPONENTS}
    check_engines(plan, trt_version="10.8.0", compute_capability="9.0")
    one_line_error(lambda: check_engines(plan, trt_version="10.8.0", compute_capability="8.6"),
                   "compute capability 9.0", f"cvqd-export --plan {tiny_plan} --trt --force")
    one_line_error(lambda: check_engines(plan, ["transformer"], trt_version="11.0.0", compute_capability="9.0"),
                   "TensorRT 10.8.0", "--trt --force")


def test_engine_check_without_tensorrt():
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        one_line_error(current_trt_gpu, "TensorRT is not installed")
    else:
        if not torch.cuda.is_available():
            one_line_error(current_trt_gpu, "no CUDA GPU")


def test_reading_a_plan_needs_no_training_or_export_code(tiny_plan):
    code = ("import sys; from cvqd.model.plan import load_plan; p = load_plan(sys.argv[1], verify=True); "
            "p.onnx_path('transformer'); "
            "bad = [m for m in sys.modules if m.startswith(('cvqd.training', 'cvqd.export', 'open_clip'))]; "
            "assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code, str(tiny_plan)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
