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


def test_engine_parity_judgement_can_fail():
    """The parity record is computed from the comparisons: an engine far from ONNX Runtime is not "passed"."""
    import numpy as np

    from cvqd.export.validate import judge_parity
    from cvqd.export.validate import TOLERANCES, compare

    rng = np.random.default_rng(0)
    ref = rng.standard_normal((2, 16, 8)).astype(np.float32)
    close = ref + 1e-5 * rng.standard_normal(ref.shape).astype(np.float32)
    good = judge_parity([{"batch": 2, **compare("transformer", close, ref)}], TOLERANCES["fp16"], "test")
    assert good["passed"] and good["failures"] == []
    far = rng.standard_normal(ref.shape).astype(np.float32)
    bad = judge_parity([{"batch": 1, **compare("transformer", close, ref)},
                        {"batch": 2, **compare("transformer", far, ref)}], TOLERANCES["fp16"], "test")
    assert not bad["passed"] and any("argmax agreement" in f for f in bad["failures"])
    assert bad["worst"]["argmax_agreement"] < 0.5


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
        record = plan.manifest["engines"][name]
        assert record["parity"]["passed"] and record["builder"]["workspace_bytes"] == 2 << 30
        plan.engine_path(name)

    # The backend, eager and graph-replayed, against ONNX Runtime's tokens on the same plan and seeds.
    from cvqd.runtime.pipeline import Pipeline

    cond_prompts, seeds = ["a red circle", "a blue square"], [0, 1]
    ort_pipe = Pipeline.from_plan(plan, backend="onnxruntime", device="cpu")
    want = ort_pipe.sample_tokens(ort_pipe.encode_prompts(cond_prompts), seeds, steps=4, guidance=2.0,
                                  truncation=0.9).cpu()
    for graphs in ("off", "on"):
        pipe = Pipeline.from_plan(plan, backend="tensorrt", device="cuda", graphs=graphs)
        got = pipe.sample_tokens(pipe.encode_prompts(cond_prompts), seeds, steps=4, guidance=2.0,
                                 truncation=0.9).cpu()
        assert (got == want).float().mean() > 0.95, graphs  # engines run in TF32/fp16: rare argmax flips
