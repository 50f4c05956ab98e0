"""TensorRT engine building: what is testable without TensorRT, and a GPU test for lent machines.

The builder itself (export/trt_build.py) cannot run here: TensorRT is not installable in this workplace.
"""

import contextlib
import importlib.util
import io

import pytest

from cvqd.model.config import preset
from cvqd.model.contracts import contracts

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None


def test_profile_shapes_come_from_the_contracts():
    from cvqd.export.trt_build import profile_shapes

    cfg = preset("paper")
    c = contracts(cfg, max_images=4)
    tr = profile_shapes(c["transformer"])
    assert tr["tokens"] == ((1, 256), (2, 256), (8, 256))  # 2 rows per image with guidance
    assert tr["timestep"] == ((1,), (2,), (8,)) and tr["cond"] == ((1, 512), (2, 512), (8, 512))
    assert profile_shapes(c["vq_decoder"]) == {"tokens": ((1, 256), (1, 256), (4, 256))}
    assert profile_shapes(c["clip_text"]) == {"input_ids": ((1, 77), (1, 77), (4, 77))}
    assert profile_shapes(c["clip_image"])["pixel_values"][2] == (16, 3, 224, 224)


def test_engine_names_and_timing_cache_carry_version_and_gpu(monkeypatch, tmp_path):
    from cvqd.export.trt_build import TrtOptions, default_timing_cache, engine_file_name
    from cvqd.errors import CvqdError

    assert engine_file_name("transformer", "fp16", "10.8.0.43", "9.0") == "transformer.fp16.trt10.8.0.43.sm90.engine"
    monkeypatch.setenv("CVQD_CACHE", str(tmp_path))
    assert default_timing_cache("10.8.0", "8.9") == tmp_path / "trt" / "timing-trt10.8.0-sm89.cache"
    with pytest.raises(CvqdError, match="optimisation level"):
        TrtOptions(opt_level=7)
    with pytest.raises(CvqdError, match="workspace"):
        TrtOptions(workspace_gib=0)


@pytest.mark.skipif(HAVE_TRT, reason="TensorRT is installed: the missing-TensorRT error cannot occur")
def test_trt_without_tensorrt_is_a_one_line_error(tiny_ckpt, tiny_plan, tmp_path):
    from cvqd.cli_util import run_command
    from cvqd.export.cli import cli

    for args in (["--ckpt", tiny_ckpt, "--out", tmp_path / "p.plan", "--trt"], ["--plan", tiny_plan, "--trt"]):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exc:
            run_command(cli, "cvqd-export", [str(a) for a in args])
        msg = err.getvalue()
        assert exc.value.code == 2 and msg.count("\n") == 1 and "Traceback" not in msg
        assert "--trt needs TensorRT" in msg
    assert list(tmp_path.iterdir()) == []  # failed before any export work


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_TRT, reason="needs TensorRT (not installable in this workplace)")
def test_engines_build_run_and_match_onnxruntime(tiny_plan, tmp_path):
    import shutil

    from cvqd.export.trt_build import TrtOptions, add_engines
    from cvqd.model.plan import check_engines

    plan_dir = tmp_path / "tiny.plan"
    shutil.copytree(tiny_plan, plan_dir)
    cache = tmp_path / "timing.cache"
    plan = add_engines(plan_dir, options=TrtOptions(workspace_gib=2, timing_cache=cache))
    check_engines(plan)
    assert cache.is_file() and cache.stat().st_size > 0
    for name, e in plan.engines.items():
        assert e.engine.file.startswith(name + ".") and e.trt_version in e.engine.file
        assert plan.manifest["engines"][name]["parity"]["passed"]
        plan.engine_path(name)
