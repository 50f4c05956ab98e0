"""Data folders: recursive scanning, resizing, corrupt files skipped and counted, one-line errors for bad
folders (through the real CLI entry point), CLIP weight files in open_clip and OpenAI formats."""

import contextlib
import io

import pytest
import torch
from PIL import Image

from cvqd.errors import CvqdError
from cvqd.training.data import ImageSet, load_image, scan_images


def invoke(*args):
    """In-process run of `cvqd-train`; -> (exit code, stderr)."""
    from cvqd.cli_util import run_command
    from cvqd.training.cli import cli

    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exc:
        run_command(cli, "cvqd-train", [str(a) for a in args])
    return exc.value.code, err.getvalue()


def one_line_error(code, err, *needles):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cvqd-train: error:") and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]


def make_folder(root, n=6, size=(40, 24)):
    (root / "sub" / "deeper").mkdir(parents=True)
    for i in range(n):
        d = root if i % 3 == 0 else root / "sub" if i % 3 == 1 else root / "sub" / "deeper"
        ext = ".png" if i % 2 == 0 else ".jpg"
        Image.new("RGB", size, (i * 40 % 255, 100, 200)).save(d / f"im{i}{ext}")
    return root


def test_scan_is_recursive_and_resizes_both_ways(tmp_path):
    root = make_folder(tmp_path / "data")
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden.png").write_bytes(b"")
    files = scan_images(root)
    assert len(files) == 6 and all(f.suffix in (".png", ".jpg") for f in files)
    sq = load_image(files[0], 16, "squeeze")
    cc = load_image(files[0], 16, "center-crop")
    assert sq.shape == cc.shape == (3, 16, 16) and sq.dtype == torch.uint8


def test_corrupt_files_are_skipped_and_counted(tmp_path):
    root = make_folder(tmp_path / "data")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    good = root / "im0.png"
    (root / "truncated.png").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    ims = ImageSet.scan(root, 16)
    assert len(ims) == 8
    ims.preload()
    assert len(ims) == 6 and len(ims.skipped) == 2 and ims.images.shape == (6, 3, 16, 16)
    lazy = ImageSet.scan(root, 16)
    batch = lazy.batch(list(range(len(lazy))))
    assert batch.shape == (8, 3, 16, 16) and len(lazy.skipped) == 2  # replaced by the next good file


def test_bad_folders_give_clear_errors(tmp_path):
    with pytest.raises(CvqdError, match="not found"):
        scan_images(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CvqdError, match="is empty"):
        scan_images(tmp_path / "empty")
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.txt").write_text("x")
    with pytest.raises(CvqdError, match="holds no image files"):
        scan_images(tmp_path / "text")
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(CvqdError, match="not a folder"):
        scan_images(tmp_path / "file.png")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.png").write_bytes(b"garbage")
    with pytest.raises(CvqdError, match="could be read"):
        ImageSet.scan(tmp_path / "junk", 16).preload()


def test_cli_bad_data_one_line_exit_2(tmp_path):
    one_line_error(*invoke("vqgan", "--preset", "tiny", "--data", tmp_path / "missing", "--out", tmp_path / "r1"),
                   "data folder not found")
    (tmp_path / "empty").mkdir()
    one_line_error(*invoke("vqgan", "--preset", "tiny", "--data", tmp_path / "empty", "--out", tmp_path / "r2"),
                   "is empty")
    make_folder(tmp_path / "nocaps")
    one_line_error(*invoke("clip", "--preset", "tiny", "--data", tmp_path / "nocaps", "--out", tmp_path / "r3"),
                   "no captions")
    one_line_error(*invoke("vqgan", "--data", tmp_path / "nocaps", "--out", tmp_path / "r4"), "--init")
    one_line_error(*invoke("diffusion", "--init", tmp_path / "nope.pt", "--data", tmp_path / "nocaps",
                           "--out", tmp_path / "r5"), "checkpoint not found")
    one_line_error(*invoke("demo", "--work", tmp_path / "w", "--set", "vqgan_steps=abc"), "expected int")
    one_line_error(*invoke("demo", "--work", tmp_path / "w", "--set", "vqgan_steps=none"), "expected int")
    one_line_error(*invoke("demo", "--work", tmp_path / "w", "--set", "noise_shaped=2"), "noise_shaped", "[0, 1]")
    one_line_error(*invoke("diffusion", "--init", tmp_path / "nope.pt", "--data", tmp_path / "nocaps",
                           "--out", tmp_path / "r7", "--aux-weight", "-0.5"), "--aux-weight")
    one_line_error(*invoke("diffusion", "--init", tmp_path / "nope.pt", "--data", tmp_path / "nocaps",
                           "--out", tmp_path / "r8", "--final-lr-ratio", "0"), "--final-lr-ratio")
    one_line_error(*invoke("demo", "--work", tmp_path / "w", "--set", "diffusion_final_lr_ratio=1.5"),
                   "diffusion_final_lr_ratio")
    one_line_error(*invoke("demo", "--work", tmp_path / "w", "--set", "device=tpu"), "device", "'cpu' or 'cuda'")
    if not torch.cuda.is_available():
        one_line_error(*invoke("demo", "--work", tmp_path / "w", "--set", "device=cuda"), "no CUDA GPU")
    one_line_error(*invoke("vqgan", "--data", tmp_path / "nocaps", "--out", tmp_path / "r6", "--resume"),
                   "no run to resume")


def test_clip_weights_from_open_clip_and_openai_files(tmp_path):
    from cvqd.model.config import preset
    from cvqd.model.clip import build_clip, clip_state_from_file, load_clip_weights

    cfg = preset("tiny").clip
    torch.manual_seed(0)
    src = build_clip(cfg)
    sd = src.state_dict()
    # open_clip training checkpoint: {"state_dict": {"module.<key>": ...}, "epoch": ...}
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "oc.pt")
    # OpenAI release: a TorchScript archive whose state dict uses the same names plus three int buffers
    holder = torch.nn.Module()
    for name, child in src.named_children():
        holder.add_module(name, child)
    for name, p in src.named_parameters(recurse=False):
        holder.register_parameter(name, p)
    for name, b in src.named_buffers(recurse=False):
        holder.register_buffer(name, b, persistent=name in sd)
    for extra in ("input_resolution", "context_length", "vocab_size"):
        holder.register_buffer(extra, torch.tensor(7))

    class Traceable(torch.nn.Module):
        def __init__(self, h):
            super().__init__()
            for name, child in h.named_children():
                self.add_module(name, child)
            for name, p in h.named_parameters(recurse=False):
                self.register_parameter(name, p)
            for name, b in h.named_buffers(recurse=False):
                if name in h.state_dict():  # TorchScript would save non-persistent buffers too
                    self.register_buffer(name, b)

        def forward(self, x):
            return x * self.logit_scale

    traced = torch.jit.trace(Traceable(holder), torch.randn(2), check_trace=False)
    torch.jit.save(traced, str(tmp_path / "openai.pt"))
    for f in ("oc.pt", "openai.pt"):
        dst = build_clip(cfg)
        load_clip_weights(dst, clip_state_from_file(tmp_path / f), f)
        for k, v in sd.items():
            assert torch.equal(dst.state_dict()[k], v), (f, k)
    (tmp_path / "bad.pt").write_bytes(b"nope")
    with pytest.raises(CvqdError, match="not a readable CLIP weights file"):
        clip_state_from_file(tmp_path / "bad.pt")
    torch.save({"visual.nothing": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CvqdError, match="do not fit"):
        load_clip_weights(build_clip(cfg), clip_state_from_file(tmp_path / "other.pt"), "other.pt")


def test_cli_resume_keeps_the_recorded_settings(shapes_data, tmp_path, monkeypatch):
    """`--out DIR --resume` alone continues with the run's own settings and data folder (recorded as an absolute
    path, so the resume may start elsewhere), not the command's defaults."""
    from cvqd.model.checkpoint import load_checkpoint

    run = tmp_path / "run"
    monkeypatch.chdir(shapes_data.parent)
    args = ("vqgan", "--preset", "tiny", "--data", shapes_data.name, "--out", run, "--steps", "4", "--batch-size",
            "3", "--base-lr", "2e-4", "--straight-through", "--disc-start", "100", "--log-every", "1", "-q")
    code, err = invoke(*args, "--stop-after", "2")
    assert code == 0, err
    monkeypatch.chdir(tmp_path)
    code, err = invoke("vqgan", "--out", run, "--resume", "-q")
    assert code == 0, err
    ckpt = load_checkpoint(run / "model.pt")
    cfg = ckpt.training["config"]
    assert ckpt.step == 4 and cfg["steps"] == 4 and cfg["batch_size"] == 3 and cfg["base_lr"] == 2e-4
    assert cfg["straight_through"] is True and cfg["stop_after"] is None
    # an option given with --resume overrides the recorded one
    code, err = invoke("vqgan", "--data", shapes_data, "--out", run, "--resume", "--steps", "5", "-q")
    assert code == 0, err
    assert load_checkpoint(run / "model.pt").step == 5
    one_line_error(*invoke("clip", "--out", run, "--resume"), "holds a 'vqgan' run, not a 'clip' one")


def test_cli_diffusion_and_cfg_resume_from_the_run_folder_alone(shapes_data, tiny_trained, tmp_path):
    import json

    from cvqd.model.checkpoint import load_checkpoint

    common = ("--data", shapes_data, "--steps", 4, "--batch-size", 8, "--log-every", 1, "--sample-every", 0,
              "--cache-dir", tiny_trained["cache"], "--stop-after", 2, "-q")
    for stage, init in (("diffusion", tiny_trained["vqgan"]), ("cfg", tiny_trained["diffusion"])):
        run = tmp_path / stage
        code, err = invoke(stage, "--init", init, "--out", run, *common)
        assert code == 0, err
        assert load_checkpoint(run / "model.pt").step == 2
        code, err = invoke(stage, "--out", run, "--resume", "-q")
        assert code == 0, err
        ckpt = load_checkpoint(run / "model.pt")
        assert ckpt.step == 4 and ckpt.stage == stage and ckpt.training["config"]["cache_dir"] == str(tiny_trained["cache"])
        steps = [json.loads(ln)["step"] for ln in (run / "log.jsonl").read_text().splitlines()]
        assert steps == [1, 2, 3, 4]


def test_a_failed_start_leaves_no_run_folder(shapes_data, tiny_trained, tmp_path):
    """Every training command checks its inputs (data folder, --init, enough images for a batch) before it makes
    the --out folder: a start that fails says why on one line and leaves nothing behind."""
    empty = tmp_path / "empty"
    empty.mkdir()
    image = tmp_path / "image.png"
    Image.new("RGB", (16, 16)).save(image)
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    few = make_folder(tmp_path / "few", n=3)
    for f in few.rglob("*.*g"):
        f.with_suffix(".txt").write_text("a shape\n")  # captioned, for the CLIP stage
    starts = {"clip": ("--preset", "tiny"), "vqgan": ("--preset", "tiny"),
              "diffusion": ("--init", tiny_trained["vqgan"], "--cache-dir", tmp_path / "cache"),
              "cfg": ("--init", tiny_trained["diffusion"], "--cache-dir", tmp_path / "cache")}
    runs = tmp_path / "runs"
    for stage, start in starts.items():
        extra = start[2:]
        cases = [((*start, "--data", tmp_path / "missing"), "data folder not found"),
                 ((*start, "--data", empty), "is empty"),
                 ((*start, "--data", image), "not a folder"),
                 ((*start, "--data", few, "--batch-size", 4), "too few for batch size 4"),
                 (("--init", tmp_path / "nope.pt", *extra, "--data", shapes_data), "checkpoint not found"),
                 (("--init", junk, *extra, "--data", shapes_data), "is not a cvqd checkpoint")]
        for i, (args, needle) in enumerate(cases):
            out = runs / f"{stage}-{i}"
            one_line_error(*invoke(stage, *args, "--out", out, "--steps", 1, "-q"), needle)
            assert not out.exists(), (stage, args)
    assert not runs.exists()
    assert not (tmp_path / "cache").exists()  # the too-few check comes before any feature is computed


def test_skipped_files_are_named_in_one_warning_line(tmp_path):
    from cvqd.training.data import skipped_warning

    root = make_folder(tmp_path / "data")
    for i in range(5):
        (root / "sub" / f"broken{i}.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    code, err = invoke("vqgan", "--preset", "tiny", "--data", root, "--out", tmp_path / "run", "--steps", 1,
                       "--batch-size", 2, "--sample-every", 0, "-q")
    assert code == 0, err
    lines = [ln for ln in err.splitlines() if "warning:" in ln]
    assert len(lines) == 1, err
    assert lines[0].startswith("cvqd-train vqgan: warning: skipped 5 file(s) under ")
    assert "5 unreadable (sub/broken0.png, sub/broken1.png, sub/broken2.png, and 2 more)" in lines[0]
    # the CLIP stage's kinds, each with its count; nothing skipped: no line
    line = skipped_warning("cvqd-train clip", root, {"unreadable": [root / "a.png"],
                                                     "without a caption": [root / "b.png", root / "c.png"]})
    assert line.endswith("skipped 3 file(s) under " + str(root) + ": 1 unreadable (a.png); "
                         "2 without a caption (b.png, c.png)")
    assert skipped_warning("x", root, {"unreadable": []}) is None



def test_output_folders_are_made_with_their_parents(tmp_path):
    # Dataset and run folders are new by design, so missing parents are made (like `mkdir -p`); a parent that is a
    # file is still a one-line error.
    data = tmp_path / "no" / "such" / "data"
    code, err = invoke("shapes", "--out", data, "--count", "2", "-q")
    assert code == 0, err
    assert len(list(data.rglob("*.png"))) == 2
    code, err = invoke("vqgan", "--preset", "tiny", "--data", data, "--out", tmp_path / "runs" / "a" / "vqgan",
                       "--steps", "1", "--batch-size", "2", "-q")
    assert code == 0, err
    assert (tmp_path / "runs" / "a" / "vqgan" / "model.pt").is_file()
    (tmp_path / "file").write_text("x")
    one_line_error(*invoke("shapes", "--out", tmp_path / "file" / "data", "--count", "2", "-q"), "cannot write")
    one_line_error(*invoke("vqgan", "--preset", "tiny", "--data", data, "--out", tmp_path / "file" / "run",
                           "--steps", "1", "-q"), "cannot create")
