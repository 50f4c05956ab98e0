"""The runtime without torch: `cvqd-run` on a plan in a process where `import torch` (and open_clip) fails.

The blocker below makes every import of torch, torchvision and open_clip raise ModuleNotFoundError, as on a
`pip install cvqd` machine; the command must still generate the image, and must not have loaded them.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from cvqd.images import read_image_params

BLOCK = textwrap.dedent('''
    import sys

    class NoTorch:
        """Import hook: torch, torchvision and open_clip are not installed."""
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "torchvision", "open_clip"):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, NoTorch())
''')


def run_without_torch(*args, env=None, cwd=None):
    """cvqd-run (its real entry point) with torch unimportable; -> CompletedProcess, stdout ends with a JSON line
    listing the heavy modules that got loaded."""
    code = BLOCK + textwrap.dedent(f'''
        import atexit, json
        atexit.register(lambda: print(json.dumps({{"loaded": sorted(m for m in sys.modules
                                                   if m.split(".")[0] in ("torch", "open_clip", "torchvision"))}})))
        sys.argv = ["cvqd-run", *{[str(a) for a in args]!r}]
        from cvqd.runtime.cli import main
        main()
    ''')
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **(env or {})})


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CVQD_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("CVQD_DEFAULT_MODEL", raising=False)


def test_cvqd_run_on_a_plan_without_torch(tiny_plan, tmp_path):
    out = tmp_path / "slim.png"
    proc = run_without_torch("--engine", tiny_plan, "--prompt", "a red circle", "--seed", 5, "--steps", 6,
                             "--guidance", 2.0, "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"loaded": []}
    assert "step: numpy" in proc.stderr
    params = read_image_params(out)
    assert params["prompt"] == "a red circle" and params["seed"] == 5 and params["backend"] == "onnxruntime"

    # the same image as the same command with torch importable (the default environment of the tests)
    ref = tmp_path / "ref.png"
    proc = subprocess.run([sys.executable, "-m", "cvqd.runtime.cli", "--engine", str(tiny_plan), "--prompt",
                           "a red circle", "--seed", "5", "--steps", "6", "--guidance", "2.0", "--out", str(ref), "-q"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(ref)))


def test_bundled_model_without_torch_and_best_of(tmp_path):
    """The default model is the bundled plan: no export, no torch, best-of-N reranking with numpy preprocessing."""
    out = tmp_path / "demo.jpg"
    proc = run_without_torch("--prompt", "a small red circle on the left", "--best-of", 2, "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"loaded": []}
    assert "export" not in proc.stderr and not (tmp_path / "cache").exists()  # nothing was exported
    params = read_image_params(out)
    assert params["preset"] == "demo" and params["best_of"] == 2 and 0 < params["clip_score"] <= 1
    assert Image.open(out).format == "JPEG" and Image.open(out).size == (64, 64)


@pytest.mark.parametrize("args,needle", [
    (["--backend", "torch"], "pip install 'cvqd[train]'"),
    (["--device", "cuda"], "'cvqd[gpu]'"),
])
def test_what_needs_torch_says_which_install(tmp_path, args, needle):
    (tmp_path / "model.pt").write_bytes(b"")
    proc = run_without_torch("--prompt", "a red circle", "--out", tmp_path / "x.png", *args, cwd=tmp_path)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and "Traceback" not in proc.stderr, proc.stderr


def test_checkpoint_on_a_plan_backend_without_the_export_extra(tiny_ckpt, tmp_path):
    proc = run_without_torch("--ckpt", tiny_ckpt, "--prompt", "a red circle", "--out", tmp_path / "x.png")
    assert proc.returncode == 2
    assert "pip install 'cvqd[train]'" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_python_api_from_pretrained_tags_images():
    """One call loads the bundled model; images carry their parameters in .info and keep them through save()."""
    from cvqd.runtime.pipeline import Pipeline

    pipe = Pipeline.from_pretrained()
    assert pipe.describe()["backend"] == "onnxruntime" and pipe.describe()["step"] == "numpy"
    (image,) = pipe("a large blue square in the center", seed=4)
    assert image.info["cvqd"]["seed"] == 4 and image.info["prompt"] == "a large blue square in the center"
    import io

    for fmt in ("PNG", "JPEG"):
        buf = io.BytesIO()
        image.save(buf, format=fmt)
        buf.seek(0)
        tmp = Image.open(buf)
        if fmt == "PNG":
            assert json.loads(tmp.text["cvqd"])["seed"] == 4
        else:
            assert json.loads(tmp.getexif()[0x010E])["cvqd"]["seed"] == 4


def test_bundled_ar_model_without_torch(tmp_path):
    """The CLIP-GEN demo runs torch-free too: ONNX Runtime's prefill/decode graphs, the numpy token loop."""
    out = tmp_path / "ar.png"
    proc = run_without_torch("--bundled", "demo-ar", "--prompt", "a blue square", "--num-images", 2, "--top-k", 20,
                             "--grid", "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"loaded": []}
    assert "autoregressive, KV cache" in proc.stderr
    params = read_image_params(out)
    assert params["preset"] == "demo-ar" and params["top_k"] == 20 and "steps" not in params
