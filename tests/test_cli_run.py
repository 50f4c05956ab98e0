"""End-to-end: `cvqd-run --ckpt` on CPU, through the real command-line entry point."""

import contextlib
import io
import subprocess
import sys

import pytest
from PIL import Image

from cvqd.runtime.images import read_png_params


def run(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "cvqd.runtime.cli", *map(str, args)], capture_output=True, text=True)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def invoke(*args):
    """In-process run of the same entry point (fast); -> (exit code, stderr)."""
    from cvqd.cli_util import run_command
    from cvqd.runtime.cli import cli

    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exc:
        run_command(cli, "cvqd-run", [str(a) for a in args])
    return exc.value.code, err.getvalue()


def test_generate_is_deterministic_and_records_params(tiny_ckpt, tmp_path):
    a, b, c = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    run("--ckpt", tiny_ckpt, "--prompt", "a red circle", "--seed", "0", "--out", a, "-q")
    run("--ckpt", tiny_ckpt, "--prompt", "a red circle", "--seed", "0", "--out", b, "-q")
    run("--ckpt", tiny_ckpt, "--prompt", "a red circle", "--seed", "1", "--out", c, "-q")
    assert a.read_bytes() == b.read_bytes()
    assert Image.open(a).tobytes() != Image.open(c).tobytes()
    im = Image.open(a)
    assert im.size == (16, 16) and im.mode == "RGB"
    params = read_png_params(a)
    assert params["prompt"] == "a red circle" and params["seed"] == 0 and params["backend"] == "torch"
    assert params["steps"] == 16 and params["preset"] == "tiny"


def test_options_and_multiple_images(tiny_ckpt, tmp_path):
    out = tmp_path / "many"
    proc = run("--ckpt", tiny_ckpt, "--prompt", "a red circle", "--prompt", "a blue square", "--num-images", "3",
               "--steps", "4", "--guidance", "1.5", "--truncation", "0.8", "--batch-size", "4", "--out", out, "--json")
    files = sorted(out.iterdir())
    assert len(files) == 6 and "images" in proc.stdout
    p = read_png_params(files[0])
    assert p["steps"] == 4 and p["guidance"] == 1.5 and p["truncation"] == 0.8
    # image j of a prompt is the same whatever the batching
    single = tmp_path / "single.png"
    run("--ckpt", tiny_ckpt, "--prompt", "a blue square", "--seed", "2", "--steps", "4", "--guidance", "1.5",
        "--truncation", "0.8", "--out", single, "-q")
    match = [f for f in files if "blue-square-s2" in f.name]
    assert len(match) == 1 and Image.open(match[0]).tobytes() == Image.open(single).tobytes()


@pytest.mark.parametrize("args,needle", [
    (["--prompt", ""], "empty prompt"),
    (["--prompt", "x", "--steps", "0"], "steps"),
    (["--prompt", "x", "--steps", "17"], "steps"),
    (["--prompt", "x", "--truncation", "1.5"], "truncation"),
    (["--prompt", "x", "--guidance", "-1"], "guidance"),
    (["--prompt", "x", "--num-images", "0"], "num-images"),
    (["--prompt", "x", "--out", "/nonexistent/dir/x.png"], "does not exist"),
    ([], "no prompt"),
])
def test_bad_input_one_line_exit_2(tiny_ckpt, args, needle):
    code, err = invoke("--ckpt", tiny_ckpt, *args)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("cvqd-run: error:") and needle in lines[0], err


def test_bad_checkpoint_one_line(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_text("not a checkpoint")
    proc = run("--ckpt", bad, "--prompt", "x", check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "not a cvqd checkpoint" in proc.stderr
