"""`cvqd-run` end to end on CPU: every feature and every bad input of issue 5, through the CLI entry point.

Most cases run the entry point in-process (`invoke`, the same `run_command(cli, ...)` that `main()` calls) for
speed; a few run it as a subprocess. The plan cache is redirected to a temporary directory for every test.
"""

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from cvqd.images import read_png_params


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CVQD_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("CVQD_DEFAULT_MODEL", raising=False)


def run(*args, check=True, env=None):
    proc = subprocess.run([sys.executable, "-m", "cvqd.runtime.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def invoke(*args):
    """In-process run of the same entry point (fast); -> (exit code, stdout, stderr)."""
    from cvqd.cli_util import run_command
    from cvqd.runtime.cli import FLAGS, cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exc:
        run_command(cli, "cvqd-run", [str(a) for a in args], flags=FLAGS)
    return exc.value.code, out.getvalue(), err.getvalue()


def ok(*args):
    code, out, err = invoke(*args)
    assert code == 0, err
    return out, err


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


# ------------------------------------------------------------------------------------------------ features

def test_default_model_exports_its_plan_once_and_runs_on_onnxruntime(tiny_ckpt, tmp_path, monkeypatch):
    env = {"CVQD_DEFAULT_MODEL": str(tiny_ckpt)}
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    # --device cpu: this is the CPU default path (on a GPU machine "auto" picks torch on cuda instead)
    first = run("--prompt", "a red circle", "--device", "cpu", "--out", a, env=env)
    assert "exporting" in first.stderr and "picked onnxruntime on cpu" in first.stderr
    monkeypatch.setenv("CVQD_DEFAULT_MODEL", str(tiny_ckpt))
    _, err = ok("--prompt", "a red circle", "--device", "cpu", "--out", b)
    assert "exporting" not in err and "picked onnxruntime" in err  # the cached plan is reused
    assert a.read_bytes() == b.read_bytes()
    params = read_png_params(a)
    assert params["backend"] == "onnxruntime" and params["prompt"] == "a red circle" and params["seed"] == 0
    assert params["steps"] == 16 and params["preset"] == "tiny" and len(params["model"]) == 12
    plans = list((tmp_path / "cache" / "plans").iterdir())
    assert len(plans) == 1 and (plans[0] / "manifest.json").is_file()


def test_plan_run_options_json_and_deterministic_names(tiny_plan, tmp_path):
    out = tmp_path / "many"
    stdout, _ = ok("--engine", tiny_plan, "--prompt", "a red circle", "--prompt", "a blue square", "--num-images", 2,
                   "--steps", 4, "--guidance", 1.5, "--truncation", 0.8, "--batch-size", 3, "--seed", 7, "--out", out,
                   "--json", "-q")
    summary = json.loads(stdout)
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == ["000-a-red-circle-s7.png", "001-a-red-circle-s8.png", "002-a-blue-square-s7.png",
                     "003-a-blue-square-s8.png"]
    assert summary["backend"]["backend"] == "onnxruntime" and len(summary["images"]) == 4
    p = read_png_params(out / "003-a-blue-square-s8.png")
    assert (p["prompt"], p["seed"], p["steps"], p["guidance"], p["truncation"]) == ("a blue square", 8, 4, 1.5, 0.8)
    # image j of a prompt is the same whatever the batching
    single = tmp_path / "single.png"
    ok("--engine", tiny_plan, "--prompt", "a blue square", "--seed", 8, "--steps", 4, "--guidance", 1.5,
       "--truncation", 0.8, "--out", single, "-q")
    assert np.array_equal(pixels(single), pixels(out / "003-a-blue-square-s8.png"))


def test_onnxruntime_and_torch_backends_give_the_same_image(tiny_plan, tiny_ckpt, tmp_path):
    a, b = tmp_path / "ort.png", tmp_path / "torch.png"
    ok("--engine", tiny_plan, "--prompt", "a green triangle", "--seed", 3, "--device", "cpu", "--out", a, "-q")
    _, err = ok("--ckpt", tiny_ckpt, "--backend", "torch", "--prompt", "a green triangle", "--seed", 3, "--device", "cpu",
                "--out", b)
    assert "backend torch on cpu" in err
    assert read_png_params(a)["model"] == read_png_params(b)["model"]  # both name the checkpoint's sha256
    # same tokens; the two decoders may differ by a rounding step on a pixel (float32 graphs vs eager torch)
    assert np.abs(pixels(a) - pixels(b)).max() <= 1


def test_prompt_file_grid_best_of_and_progress(tiny_plan, tmp_path):
    pf = tmp_path / "prompts.txt"
    pf.write_text("# shapes\na red circle\n\n  a blue square  \n", encoding="utf-8")
    sheet = tmp_path / "sheet.png"
    stdout, err = ok("--engine", tiny_plan, "--prompt-file", pf, "--num-images", 2, "--best-of", 3, "--grid",
                     "--out", sheet, "--json")
    assert "sampling" in err  # the progress bar, on stderr
    summary = json.loads(stdout)
    assert summary["grid"] == str(sheet) and [i["prompt"] for i in summary["images"]] == \
        ["a red circle", "a red circle", "a blue square", "a blue square"]
    for i, img in enumerate(summary["images"]):  # image j is the best of seeds j*3 .. j*3+2
        j = i % 2
        assert img["best_of"] == 3 and 3 * j <= img["seed"] < 3 * j + 3 and -1 <= img["clip_score"] <= 1
    im = Image.open(sheet)
    assert im.size == (2 * 16 + 3 * 2, 2 * 16 + 3 * 2)  # a 2x2 contact sheet of 16x16 images, 2px padding
    params = read_png_params(sheet)
    assert params["grid"] is True and params["prompts"][2] == "a blue square"
    assert list(tmp_path.glob("*.png")) == [sheet]


def test_quiet_prints_nothing(tiny_plan, tmp_path):
    code, out, err = invoke("--engine", tiny_plan, "--prompt", "x", "--out", tmp_path / "q.png", "-q")
    assert code == 0 and out == "" and err == ""


def test_help_teaches():
    code, out, _ = invoke("--help")
    assert code == 0
    for word in ("--engine", "--backend", "--best-of", "--grid", "--prompt-file", "Examples", "auto picks"):
        assert word in out


# ------------------------------------------------------------------------------------------- bad input

def _one_line_error(code, err, needle):
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("cvqd-run: error:") and needle in lines[0], err


def _copy_plan(tiny_plan, tmp_path):
    dst = tmp_path / "plan"
    shutil.copytree(tiny_plan, dst)
    return dst


@pytest.mark.parametrize("args,needle", [
    (["--prompt", ""], "empty prompt"),
    (["--prompt", "   "], "empty prompt"),
    ([], "no prompt"),
    (["--prompt", "x", "--steps", "0"], "steps"),
    (["--prompt", "x", "--steps", "17"], "steps"),
    (["--prompt", "x", "--truncation", "1.5"], "truncation"),
    (["--prompt", "x", "--truncation", "0"], "truncation"),
    (["--prompt", "x", "--guidance", "-1"], "guidance"),
    (["--prompt", "x", "--guidance", "nan"], "guidance"),
    (["--prompt", "x", "--guidance", "51"], "guidance"),
    (["--prompt", "x", "--batch-size", "0"], "batch-size"),
    (["--prompt", "x", "--batch-size", "100"], "maximum of 8"),
    (["--prompt", "x", "--num-images", "0"], "num-images"),
    (["--prompt", "x", "--best-of", "0"], "--best-of"),
    (["--prompt", "x", "--out", "/nonexistent/dir/x.png"], "does not exist"),
    (["--prompt", "x", "--precision", "fp16"], "not fp16"),
    (["--prompt", "x", "--precision", "bf16"], "torch backend"),
    (["--prompt", "x", "--backend", "torch"], "--ckpt"),
    (["--prompt", "x", "--backend", "nope"], "--backend"),
    (["--prompt", "x", "--device", "tpu"], "unknown device"),
] + ([] if torch.cuda.is_available() else [(["--prompt", "x", "--device", "cuda"], "no CUDA GPU")]))
def test_bad_input_one_line_exit_2(tiny_plan, tmp_path, args, needle):
    out_dir = tmp_path / "out"
    extra = [] if "--out" in args else ["--out", out_dir]
    code, _, err = invoke("--engine", tiny_plan, *args, *extra)
    _one_line_error(code, err, needle)
    assert not out_dir.exists() or not any(out_dir.iterdir())  # nothing half-written


def test_missing_and_unreadable_plans(tmp_path, tiny_plan):
    code, _, err = invoke("--engine", tmp_path / "nope", "--prompt", "x")
    _one_line_error(code, err, "not found")
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = invoke("--engine", empty, "--prompt", "x")
    _one_line_error(code, err, "no manifest.json")
    plan = _copy_plan(tiny_plan, tmp_path)
    (plan / "manifest.json").write_text("{not json")
    code, _, err = invoke("--engine", plan, "--prompt", "x")
    _one_line_error(code, err, "invalid JSON at line 1")


def test_unknown_manifest_version(tmp_path, tiny_plan):
    plan = _copy_plan(tiny_plan, tmp_path)
    m = json.loads((plan / "manifest.json").read_text())
    m["version"] = 99
    (plan / "manifest.json").write_text(json.dumps(m))
    code, _, err = invoke("--engine", plan, "--prompt", "x")
    _one_line_error(code, err, "version 99")


def test_file_not_matching_the_manifest_sha256(tmp_path, tiny_plan):
    plan = _copy_plan(tiny_plan, tmp_path)
    m = json.loads((plan / "manifest.json").read_text())
    f = plan / m["components"]["transformer"]["onnx"]["file"]
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF  # same size, different bytes
    f.write_bytes(bytes(data))
    code, _, err = invoke("--engine", plan, "--prompt", "x", "--out", tmp_path / "x.png")
    _one_line_error(code, err, "does not match the plan manifest")
    assert not (tmp_path / "x.png").exists()


def _plan_with_engines(tiny_plan, tmp_path, trt_version="10.0.1", cc="8.0"):
    from cvqd.io import file_sha256

    plan = _copy_plan(tiny_plan, tmp_path)
    m = json.loads((plan / "manifest.json").read_text())
    for name in ("clip_text", "clip_image", "transformer", "vq_decoder"):
        f = plan / f"{name}.trt{trt_version}.sm{cc.replace('.', '')}.engine"
        f.write_bytes(b"engine bytes " + name.encode())
        m["engines"][name] = {"engine": {"file": f.name, "sha256": file_sha256(f), "size": f.stat().st_size},
                              "trt_version": trt_version, "compute_capability": cc, "gpu_name": "NVIDIA A100",
                              "precision": "fp32", "profile": {"min": 1, "opt": 1, "max": 8}}
    (plan / "manifest.json").write_text(json.dumps(m))
    return plan


def test_tensorrt_engines_for_another_gpu_or_version_say_how_to_rebuild(tmp_path, tiny_plan, monkeypatch):
    import cvqd.model.plan as planmod

    plan = _plan_with_engines(tiny_plan, tmp_path)
    # this machine has no TensorRT: said plainly
    code, _, err = invoke("--engine", plan, "--backend", "tensorrt", "--prompt", "x")
    _one_line_error(code, err, "TensorRT is not installed")
    # pretend TensorRT 10.3 on an H100: the A100 / 10.0.1 engines are refused with the rebuild command
    monkeypatch.setattr(planmod, "current_trt_gpu", lambda: ("10.3.0", "9.0", "NVIDIA H100"))
    code, _, err = invoke("--engine", plan, "--backend", "tensorrt", "--prompt", "x")
    _one_line_error(code, err, "was built for TensorRT 10.0.1")
    assert "compute capability 8.0" in err and f"cvqd-export --plan {plan} --trt --force" in err


def test_long_prompt_is_truncated_with_a_warning(tiny_plan, tmp_path):
    code, _, err = invoke("--engine", tiny_plan, "--prompt", "a red circle " * 40, "--out", tmp_path / "l.png")
    assert code == 0 and (tmp_path / "l.png").is_file()
    warnings = [ln for ln in err.splitlines() if "warning" in ln]
    assert len(warnings) == 1 and "longer than the CLIP context" in warnings[0] and "truncated" in warnings[0]


def test_prompt_file_not_utf8_or_empty(tiny_plan, tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("un cercle rouge épais\n".encode("latin-1"))
    code, _, err = invoke("--engine", tiny_plan, "--prompt-file", bad)
    _one_line_error(code, err, "not UTF-8")
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n")
    code, _, err = invoke("--engine", tiny_plan, "--prompt-file", empty)
    _one_line_error(code, err, "holds no prompt")
    code, _, err = invoke("--engine", tiny_plan, "--prompt-file", tmp_path / "missing.txt")
    _one_line_error(code, err, "cannot read")


def test_output_path_that_cannot_be_written(tiny_plan, tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    code, _, err = invoke("--engine", tiny_plan, "--prompt", "x", "--out", blocker / "x.png")
    _one_line_error(code, err, "does not exist")
    code, _, err = invoke("--engine", tiny_plan, "--prompt", "x", "--out", f"{blocker}/")  # a dir that is a file
    _one_line_error(code, err, "not a directory")
    code, _, err = invoke("--engine", tiny_plan, "--prompt", "x", "--out", blocker)  # not an image extension
    _one_line_error(code, err, "unknown image extension")
    if os.geteuid() != 0:  # root ignores permission bits
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        code, _, err = invoke("--engine", tiny_plan, "--prompt", "x", "--out", ro / "x.png")
        _one_line_error(code, err, "permission denied")


def test_batch_that_does_not_fit_in_memory(tiny_plan, tmp_path, monkeypatch):
    from cvqd.runtime import backend_ort

    real = backend_ort.OrtComponent.__call__

    def oom(self, *args):
        if self.component == "transformer" and args[0].shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(self, *args)

    monkeypatch.setattr(backend_ort.OrtComponent, "__call__", oom)
    out = tmp_path / "out"
    code, _, err = invoke("--engine", tiny_plan, "--prompt", "x", "--num-images", 4, "--batch-size", 4, "--out", out,
                          "-q")
    _one_line_error(code, err, "does not fit in GPU memory")
    assert "--batch-size" in err and not any(out.iterdir())
    ok("--engine", tiny_plan, "--prompt", "x", "--num-images", 2, "--batch-size", 1, "--out", out, "-q")


def test_checkpoint_that_is_not_the_plans_source(tiny_plan, tmp_path):
    from cvqd.training.init import init_checkpoint

    other = tmp_path / "other.pt"
    init_checkpoint("tiny", other, seed=1)
    code, _, err = invoke("--engine", tiny_plan, "--ckpt", other, "--backend", "torch", "--prompt", "x")
    _one_line_error(code, err, "is not the one plan")


def test_bad_checkpoint_one_line(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_text("not a checkpoint")
    proc = run("--ckpt", bad, "--backend", "torch", "--prompt", "x", check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "not a cvqd checkpoint" in proc.stderr
    code, _, err = invoke("--ckpt", tmp_path / "missing.pt", "--prompt", "x")
    _one_line_error(code, err, "not found")


def test_tensorrt_backend_warns_that_it_is_unverified(tiny_plan, monkeypatch):
    """`--backend tensorrt` (here with the engine runner replaced by ONNX Runtime) says in one line it is unverified."""
    import cvqd.runtime.backend_trt as backend_trt
    from cvqd.model.plan import load_plan
    from cvqd.runtime.backend_ort import ort_backend
    from cvqd.runtime.pipeline import TRT_UNVERIFIED, load_pipeline

    monkeypatch.setattr(backend_trt, "trt_backend", lambda plan, device: ort_backend(plan, "cpu"))
    said = []
    load_pipeline(plan=load_plan(tiny_plan), backend="tensorrt", device="cpu", warn=said.append)
    assert said == [TRT_UNVERIFIED] and "\n" not in TRT_UNVERIFIED
    said.clear()
    load_pipeline(plan=load_plan(tiny_plan), backend="onnxruntime", warn=said.append)
    assert said == []


def test_torch_backend_outputs_carry_no_autograd_graph(tiny_ckpt):
    from cvqd.runtime.backend_torch import torch_backend

    backend, cfg, null, _ = torch_backend(tiny_ckpt, "cpu")
    ids = backend.tokenize(["a red circle"])
    emb = backend.encode_text(ids)
    tokens = torch.zeros(1, cfg.transformer.seq_len, dtype=torch.int64)
    images = backend.decode(tokens)
    logits = backend.denoise(tokens, torch.zeros(1, dtype=torch.int64), emb)
    for t in (emb, images, logits, backend.encode_image(images)):
        assert not t.requires_grad and t.grad_fn is None
