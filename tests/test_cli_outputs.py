"""`cvqd-run` / `cvqd-export` behaviour a user meets first: output names and formats, seeds, Ctrl-C, progress and
messages, damaged cached plans, --version, export --verify (in-process through the real entry point)."""

import contextlib
import io
import json
import shutil

import pytest
from PIL import Image

from cvqd.images import read_image_params


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CVQD_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("CVQD_DEFAULT_MODEL", raising=False)


def invoke(*args, cmd="run"):
    from cvqd.cli_util import run_command

    if cmd == "run":
        from cvqd.runtime.cli import FLAGS, cli

        prog, flags = "cvqd-run", FLAGS
    else:
        from cvqd.export.cli import cli

        prog, flags = "cvqd-export", None
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exc:
        run_command(cli, prog, [str(a) for a in args], flags=flags)
    return exc.value.code, out.getvalue(), err.getvalue()


def test_out_jpeg_and_png_files_and_unknown_extensions(tiny_plan, tmp_path):
    base = ["--engine", tiny_plan, "--prompt", "a red circle", "--steps", 3, "-q"]
    code, _, err = invoke(*base, "--out", tmp_path / "result.jpg")
    assert code == 0, err
    assert (tmp_path / "result.jpg").is_file() and Image.open(tmp_path / "result.jpg").format == "JPEG"
    assert read_image_params(tmp_path / "result.jpg")["prompt"] == "a red circle"
    code, _, err = invoke(*base, "--out", tmp_path / "result.JPEG", "--num-images", 2)
    assert code == 0 and sorted(p.name for p in tmp_path.glob("result-*")) == ["result-000.JPEG", "result-001.JPEG"]
    code, _, err = invoke(*base, "--out", tmp_path / "result.gif")
    assert code == 2 and "unknown image extension '.gif'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "result.gif").exists()


def test_directory_names_sort_with_padded_index_and_seed(tiny_plan, tmp_path):
    out = tmp_path / "set.v2"  # an extension-like name, made a directory by the trailing slash
    code, _, err = invoke("--engine", tiny_plan, "--prompt", "a red circle", "--steps", 2, "--num-images", 12,
                          "--seed", 5, "--out", f"{out}/", "-q", "--batch-size", 6)
    assert code == 0, err
    names = [p.name for p in sorted(out.glob("*.png"))]
    assert (out / "manifest.jsonl").is_file() and len(list(out.iterdir())) == 13  # the images + the manifest
    assert names[0] == "000-a-red-circle-s05.png" and names[-1] == "011-a-red-circle-s16.png"
    assert [read_image_params(out / n)["seed"] for n in names] == list(range(5, 17))  # sorted == generated order


@pytest.mark.parametrize("seed", [-1, 2**64, 2**64 - 1])
def test_seed_outside_64_bits_is_an_error(tiny_plan, tmp_path, seed):
    args = ["--engine", tiny_plan, "--prompt", "a red circle", "--out", tmp_path / "x.png", "--seed", seed]
    code, _, err = invoke(*args, "--num-images", 2)  # seed + 1 must fit too
    assert code == 2 and "--seed must be an integer in [0, 18446744073709551614]" in err
    assert not (tmp_path / "x.png").exists()


def test_top_seed_works_in_the_api(tiny_plan):
    from cvqd.errors import CvqdError
    from cvqd.runtime.pipeline import Pipeline

    pipe = Pipeline.from_plan(tiny_plan)
    (g,) = pipe.generate(["a red circle"], seed=2**64 - 1, steps=2)
    assert g.params["seed"] == 2**64 - 1
    with pytest.raises(CvqdError, match=r"^seed must") as exc:
        pipe.generate(["a red circle"], seed=2**64)
    assert "--" not in str(exc.value)  # Python errors name Python parameters, not CLI flags
    with pytest.raises(CvqdError) as exc:
        pipe.generate(["a red circle"], batch_size=10**6)
    assert "batch_size" in str(exc.value) and "--" not in str(exc.value)


def test_ctrl_c_keeps_the_finished_images(tiny_plan, tmp_path, monkeypatch):
    from cvqd.runtime.pipeline import Pipeline

    real = Pipeline.generate_from  # the one batch loop behind every request

    def interrupted(self, *a, **k):
        for i, g in enumerate(real(self, *a, **k)):
            if i == 2:
                raise KeyboardInterrupt
            yield g

    monkeypatch.setattr(Pipeline, "generate_from", interrupted)
    out = tmp_path / "run"
    code, _, err = invoke("--engine", tiny_plan, "--prompt", "a red circle", "--steps", 2, "--num-images", 5,
                          "--batch-size", 1, "--out", out, "-q")
    assert code == 130 and "interrupted; 2 of 5 image(s) written" in err
    assert sorted(p.name for p in out.glob("*.png")) == ["000-a-red-circle-s0.png", "001-a-red-circle-s1.png"]


def test_messages_stay_off_the_progress_bar_and_it_counts_from_zero(tiny_plan, tmp_path, monkeypatch):
    """A warning raised while sampling is printed on its own line, not glued to the bar."""
    from cvqd.runtime.pipeline import Pipeline

    seen = []
    real = Pipeline.generate_from

    def spy(self, *a, callback=None, **k):
        def cb(done, total):
            seen.append((done, total))
            if done == 3:
                self.warn("something to say mid-run")
            callback(done, total)
        yield from real(self, *a, callback=cb, **k)

    monkeypatch.setattr(Pipeline, "generate_from", spy)
    code, _, err = invoke("--engine", tiny_plan, "--prompt", "a red circle", "--steps", 4, "--num-images", 2,
                          "--batch-size", 1, "--out", tmp_path / "o")
    assert code == 0, err
    assert seen[0] == (0, 8) and seen[-1] == (8, 8)  # the whole request's steps, known from the start
    lines = err.replace("\r", "\n").splitlines()
    assert any(ln.startswith("cvqd-run: warning: something to say mid-run") for ln in lines), err


def test_damaged_cached_plan_is_rebuilt(tiny_ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("CVQD_DEFAULT_MODEL", str(tiny_ckpt))
    args = ["--prompt", "a red circle", "--device", "cpu", "--steps", 2, "--out", tmp_path / "a.png"]
    assert invoke(*args)[0] == 0
    (plan_dir,) = (tmp_path / "cache" / "plans").iterdir()
    onnx = plan_dir / "transformer.onnx"
    data = bytearray(onnx.read_bytes())
    data[-10] ^= 0xFF  # same size, different bytes
    onnx.write_bytes(bytes(data))
    code, _, err = invoke(*args)
    assert code == 0, err
    assert "is damaged" in err and "exporting" in err and "picked onnxruntime" in err
    assert read_image_params(tmp_path / "a.png")["backend"] == "onnxruntime"  # never a silent torch fall back


def test_damaged_plan_names_the_command_and_is_not_skipped_by_auto(tiny_plan, tiny_ckpt, tmp_path):
    plan = tmp_path / "p"
    shutil.copytree(tiny_plan, plan)
    data = bytearray((plan / "vq_decoder.onnx").read_bytes())
    data[-10] ^= 0xFF
    (plan / "vq_decoder.onnx").write_bytes(bytes(data))
    code, _, err = invoke("--engine", plan, "--ckpt", tiny_ckpt, "--prompt", "a red circle", "--device", "cpu",
                          "--out", tmp_path / "x.png")
    assert code == 2 and "does not match the plan manifest" in err and "cvqd-export" in err


@pytest.mark.parametrize("module", ["cvqd.runtime.cli", "cvqd.export.cli", "cvqd.training.cli", "cvqd.eval_cli"])
def test_version_on_every_command(module):
    import importlib
    import subprocess
    import sys

    import cvqd

    importlib.import_module(module)
    proc = subprocess.run([sys.executable, "-m", module, "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and cvqd.__version__ in proc.stdout, proc.stderr


def test_export_verify_says_so_and_quiet_hides_only_progress(tiny_plan):
    code, _, err = invoke("--plan", tiny_plan, "--verify", "-q", cmd="export")
    assert code == 0 and err.strip().splitlines()[-1].startswith(f"cvqd-export: plan {tiny_plan} verified: all ")
    code, out, _ = invoke("--plan", tiny_plan, "--verify", "--json", cmd="export")
    assert code == 0 and json.loads(out)["verified"] is True


@pytest.mark.parametrize("damage,needle", [
    ("empty", "is empty (0 bytes)"),
    ("truncated", "damaged or truncated PyTorch file"),
    ("flipped", "damaged or truncated PyTorch file"),
    ("text", "not a cvqd checkpoint"),
])
def test_bad_checkpoints_are_described_not_passed_through(tiny_ckpt, tmp_path, damage, needle):
    data = tiny_ckpt.read_bytes()
    bad = tmp_path / "bad.pt"
    bad.write_bytes({"empty": b"", "truncated": data[: len(data) // 2], "text": b"hello, not a model\n",
                     "flipped": data[:-200] + bytes(200)}[damage])
    code, _, err = invoke("--ckpt", bad, "--backend", "torch", "--prompt", "x", "--out", tmp_path / "x.png")
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    for internal in ("miniz", "EOFError", "PytorchStreamReader", "Ran out of input", "zip archive", "central directory"):
        assert internal not in err, err


def test_bad_manifest_json_is_described(tiny_plan, tmp_path):
    plan = tmp_path / "p"
    shutil.copytree(tiny_plan, plan)
    (plan / "manifest.json").write_text('{"format": "cvqd-plan", ', encoding="utf-8")
    code, _, err = invoke("--engine", plan, "--prompt", "x", "--out", tmp_path / "x.png")
    assert code == 2 and "invalid JSON at line 1" in err and "JSONDecodeError" not in err, err
