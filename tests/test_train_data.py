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
    one_line_error(*invoke("demo", "--work", tmp_path / "w", "--set", "sweep_candidates=0"), "sweep_candidates")
    one_line_error(*invoke("demo", "--work", tmp_path / "w", "--set", "diffusion_aux_weight=-1"), "diffusion_aux_weight")
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
    with pytest.raises(CvqdError, match="not a CLIP weight file"):
        clip_state_from_file(tmp_path / "bad.pt")
    torch.save({"visual.nothing": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CvqdError, match="do not fit"):
        load_clip_weights(build_clip(cfg), clip_state_from_file(tmp_path / "other.pt"), "other.pt")


def test_cli_resume_keeps_the_recorded_settings(shapes_data, tmp_path):
    """`--resume` alone continues with the run's own settings, not the command's defaults."""
    from cvqd.model.checkpoint import load_checkpoint

    run = tmp_path / "run"
    args = ("vqgan", "--preset", "tiny", "--data", shapes_data, "--out", run, "--steps", "4", "--batch-size", "3",
            "--base-lr", "2e-4", "--straight-through", "--disc-start", "100", "--log-every", "1", "-q")
    code, err = invoke(*args, "--stop-after", "2")
    assert code == 0, err
    code, err = invoke("vqgan", "--data", shapes_data, "--out", run, "--resume", "-q")
    assert code == 0, err
    ckpt = load_checkpoint(run / "model.pt")
    cfg = ckpt.training["config"]
    assert ckpt.step == 4 and cfg["steps"] == 4 and cfg["batch_size"] == 3 and cfg["base_lr"] == 2e-4
    assert cfg["straight_through"] is True and cfg["stop_after"] is None
    # an option given with --resume overrides the recorded one
    code, err = invoke("vqgan", "--data", shapes_data, "--out", run, "--resume", "--steps", "5", "-q")
    assert code == 0, err
    assert load_checkpoint(run / "model.pt").step == 5


def test_demo_stage_runner_chains_and_stops_on_failure(tmp_path):
    """The demo's stage runner: side by side, a chained command starts only after its predecessor, a failure
    stops the rest with a one-line error naming the stage and its log."""
    import sys
    import time

    from cvqd.errors import CvqdError
    from cvqd.training.demo import _run_parallel

    def cmd(name, sleep, code=0):
        return [sys.executable, "-c", f"import time, sys; t = time.time(); time.sleep({sleep}); "
                f"open({str(tmp_path / name)!r}, 'w').write(f'{{t}} {{time.time()}}'); sys.exit({code})"]

    times = _run_parallel({"a": cmd("a", 0.5), "b": cmd("b", 0.1), "c": cmd("c", 0.1)}, tmp_path, {},
                          after={"c": "a", "x": "b"})
    span = {k: tuple(map(float, (tmp_path / k).read_text().split())) for k in "abc"}
    assert span["c"][0] >= span["a"][1]  # chained: starts after a ended
    assert span["b"][0] < span["a"][1]  # independent: ran beside a
    assert set(times) == {"a", "b", "c"} and all(v > 0 for v in times.values())
    # the predecessor is not in this run (finished earlier): the chained command starts at once
    _run_parallel({"c": cmd("c2", 0.0)}, tmp_path, {}, after={"c": "a"})
    assert (tmp_path / "c2").is_file()
    # with cores: a chained command that starts beside another keeps its threads, one that starts alone gets them all
    ran = {}
    _run_parallel({"a": cmd("a", 0.2) + ["--threads", "1"], "b": cmd("b", 3.5) + ["--threads", "1"],
                   "c": cmd("c", 0.0) + ["--threads", "1"], "d": cmd("d", 0.0) + ["--threads", "1"]},
                  tmp_path, {}, after={"c": "a", "d": "b"}, cores=2, ran=ran)
    assert [ran[k][-1] for k in "abcd"] == ["1", "1", "1", "2"]
    # a command left running alone is told (through the file $CVQD_THREADS_FILE names) to take every core
    watch = [sys.executable, "-c", "import os, sys, time, pathlib\n"
             "f = pathlib.Path(os.environ['CVQD_THREADS_FILE'])\n"
             "for _ in range(100):\n"
             "    if f.is_file(): break\n"
             "    time.sleep(0.05)\n"
             f"pathlib.Path({str(tmp_path / 'seen')!r}).write_text(f.read_text() if f.is_file() else 'none')"]
    (tmp_path / "long.threads").write_text("7\n")  # stale, from an earlier run: removed before the start
    widened = {}
    _run_parallel({"short": cmd("s", 0.5), "long": watch + ["--threads", "1"]}, tmp_path, {}, cores=2,
                  widened=widened)
    assert (tmp_path / "seen").read_text().strip() == "2" and set(widened) == {"long"} and widened["long"] > 0
    # one core: no file; a command without --threads (not a trainer): no file
    _run_parallel({"short": cmd("s", 0.0), "long": watch + ["--threads", "1"]}, tmp_path, {}, cores=1)
    assert (tmp_path / "seen").read_text() == "none"
    _run_parallel({"short": cmd("s", 0.0), "long": watch}, tmp_path, {}, cores=2)  # no --threads: not a trainer
    assert (tmp_path / "seen").read_text() == "none"

    t0 = time.time()
    with pytest.raises(CvqdError, match=r"demo stage bad failed \(exit 3\); see .*bad\.log"):
        _run_parallel({"slow": cmd("slow", 30), "bad": cmd("bad", 0.0, code=3), "next": cmd("next", 0.0)},
                      tmp_path, {}, after={"next": "bad"})
    assert time.time() - t0 < 20 and not (tmp_path / "next").exists() and not (tmp_path / "slow").exists()



def test_demo_rerun_times_kept_stages_from_the_previous_record(tmp_path):
    """A rerun that keeps finished stages reports them with the times their record measured, and a phase as it
    would run from scratch: the longest chain of its side-by-side lanes."""
    import json

    from cvqd.training.demo import _chain_seconds, _previous_times

    cmds = {"clip": [], "vqgan": [], "vqgan-restart": [], "vqgan-decoder": []}
    after = {"vqgan-restart": "vqgan", "vqgan-decoder": "vqgan-restart"}
    secs = {"clip": 1111.0, "vqgan": 1041.0, "vqgan-restart": 280.0, "vqgan-decoder": 150.0}
    assert _chain_seconds(cmds, after, secs) == 1471.0
    assert _chain_seconds(cmds, after, {**secs, "clip": 2000.0}) == 2000.0
    assert _chain_seconds({"clip": [], "vqgan": []}, after, secs) == 1111.0  # a chain link not in this phase
    (tmp_path / "demo.json").write_text(json.dumps({"wall_seconds": {"clip": 1111.3, "eval": 192}}))
    assert _previous_times(tmp_path / "demo.json") == {"clip": 1111.3, "eval": 192.0}
    (tmp_path / "bad.json").write_text("{not json")
    assert _previous_times(tmp_path / "bad.json") == {} == _previous_times(tmp_path / "none.json") == _previous_times(None)


def test_demo_journal_keeps_finished_stage_times_when_another_stage_fails(tmp_path):
    """A first attempt that fails writes no record; the work folder's journal still has the times of the stages
    that finished (the one beside the failure included), for the rerun that keeps them."""
    import sys

    from cvqd.errors import CvqdError
    from cvqd.training.demo import _journal_time, _previous_times, _run_parallel

    journal = tmp_path / "stage_times.json"
    ok = [sys.executable, "-c", "pass"]
    bad = [sys.executable, "-c", "import time, sys; time.sleep(1.5); sys.exit(2)"]
    with pytest.raises(CvqdError, match="demo stage bad failed"):
        _run_parallel({"good": ok, "bad": bad, "next": ok}, tmp_path, {}, after={"next": "bad"},
                      on_done=lambda k, v: _journal_time(journal, k, v))
    times = _previous_times(journal)
    assert set(times) == {"good"} and times["good"] > 0  # the failed stage and the one never started: no time
    _journal_time(journal, "vqgan", 12.34)  # later stages add to it
    assert _previous_times(journal) == {"good": times["good"], "vqgan": 12.3}


def test_demo_sweep_choice_prefers_one_row_per_step_within_one_standard_error():
    from cvqd.training.demo import choose_setting

    def row(g, t, cin, cheld, se=0.03):
        return {"guidance": g, "truncation": t, "in_distribution/colour+shape": cin, "held_out/colour+shape": cheld,
                "in_distribution/colour+shape_se": se, "held_out/colour+shape_se": se, "all/all": cin}

    rows = [row(1.0, 0.85, 0.92, 0.40), row(1.0, 1.0, 0.88, 0.35), row(1.5, 0.85, 0.93, 0.43)]
    chosen, why = choose_setting(rows)  # +0.04 for guidance 1.5, one standard error 0.042: guidance 1
    assert (chosen["guidance"], chosen["truncation"]) == (1.0, 0.85) and "within one standard error" in why
    rows.append(row(2.0, 0.85, 0.95, 0.50))  # +0.13: the guided row is worth its second row
    chosen, why = choose_setting(rows)
    assert (chosen["guidance"], chosen["truncation"]) == (2.0, 0.85) and why.startswith("best score")
    assert choose_setting([row(2.0, 1.0, 0.9, 0.4, se=None)])[0]["guidance"] == 2.0  # no unguided row, no se


def test_demo_overrides_round_trip_through_the_record():
    """The `--set` pairs a record prints (its Reproduce line) give back the recipe it ran, None fields included."""
    from dataclasses import asdict

    from cvqd.training.demo import DemoRecipe, recipe_overrides, recipe_with

    ran = recipe_with(["diffusion_lr=0.002", "cfg_lr=5e-4", "diffusion_final_lr_ratio=none", "sweep_guidance=1,1.5",
                       "vqgan_straight_through=false", "vqgan_steps=4000", "transformer_depth=4"])
    assert ran.cfg_lr == 5e-4 and ran.diffusion_final_lr_ratio is None and ran.sweep_guidance == (1.0, 1.5)
    assert ran.vqgan_straight_through is False and ran.vqgan_steps == 4000
    # an `int | None` field that is None by default parses as an int (it reaches `--depth`, which takes integers)
    assert ran.transformer_depth == 4 and isinstance(ran.transformer_depth, int)
    pairs = recipe_overrides(asdict(ran))
    assert pairs["diffusion_final_lr_ratio"] == "None" and "seed" not in pairs
    assert recipe_with(f"{k}={v}" for k, v in pairs.items()) == ran
    assert recipe_with([]) == DemoRecipe()
    with pytest.raises(CvqdError, match="cfg_lr must be > 0"):
        recipe_with(["cfg_lr=0"])
    with pytest.raises(CvqdError, match="transformer_depth: expected int"):
        recipe_with(["transformer_depth=4.5"])
    with pytest.raises(CvqdError, match="vqgan_straight_through: expected true or false"):
        recipe_with(["vqgan_straight_through=maybe"])


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
