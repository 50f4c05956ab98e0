"""A prompt set into a folder: the same images for any number of processes, resumable, one manifest."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from cvqd.errors import CvqdError
from cvqd.runtime.pipeline import load_pipeline
from cvqd.runtime.shard import MANIFEST, Ranks, folder_jobs, generate_folder, read_manifest

PROMPTS = ["a red circle", "a small blue square on the left", "a green triangle"]


def _pixels(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _pipe(tiny_plan):
    from cvqd.model.plan import load_plan

    return load_pipeline(plan=load_plan(tiny_plan), backend="onnxruntime", device="cpu")


def test_jobs_cover_the_set_and_shares_are_disjoint(tmp_path):
    jobs = folder_jobs(PROMPTS, tmp_path, num_images=3, seed=10, best_of=2)
    assert [j.index for j in jobs] == list(range(9))
    assert [(j.prompt_index, j.image_index, j.seed) for j in jobs[3:6]] == [(1, 0, 10), (1, 1, 12), (1, 2, 14)]
    shares = [jobs[r::4] for r in range(4)]
    assert sorted(j.index for s in shares for j in s) == list(range(9))


def test_folder_then_rerun_keeps_everything(tiny_plan, tmp_path):
    pipe = _pipe(tiny_plan)
    out = tmp_path / "set"
    first = generate_folder(pipe, PROMPTS, out, num_images=2, seed=3, batch_size=4, steps=4)
    assert (first["total"], first["made"], first["kept"]) == (6, 6, 0) and len(first["records"]) == 6
    recs = read_manifest(out)
    assert [r["index"] for r in recs] == list(range(6)) and {r["status"] for r in recs} == {"made"}
    assert [r["seed"] for r in recs] == [3, 4] * 3 and recs[2]["prompt"] == PROMPTS[1]
    stamp = {r["file"]: os.stat(out / r["file"]).st_mtime_ns for r in recs}
    again = generate_folder(pipe, PROMPTS, out, num_images=2, seed=3, batch_size=4, steps=4)
    assert (again["made"], again["kept"]) == (0, 6)
    assert {r["file"]: os.stat(out / r["file"]).st_mtime_ns for r in read_manifest(out)} == stamp
    # other settings: the same names hold other images, so they are made again
    other = generate_folder(pipe, PROMPTS, out, num_images=2, seed=3, batch_size=4, steps=5)
    assert other["made"] == 6


def test_a_missing_image_is_the_only_one_made(tiny_plan, tmp_path):
    pipe = _pipe(tiny_plan)
    out = tmp_path / "set"
    generate_folder(pipe, PROMPTS, out, num_images=2, batch_size=3, steps=4)
    recs = read_manifest(out)
    lost = out / recs[3]["file"]
    before = _pixels(lost)
    lost.unlink()
    s = generate_folder(pipe, PROMPTS, out, num_images=2, batch_size=3, steps=4)
    assert (s["made"], s["kept"]) == (1, 5)
    np.testing.assert_array_equal(_pixels(lost), before)  # batch composition does not change an image
    assert [r["status"] for r in read_manifest(out)].count("made") == 1


def _torchrun(args, cwd, nproc=2):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           "-m", "cvqd.runtime.cli", *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=300)


def test_two_gloo_processes_make_the_same_set_as_one(tiny_plan, tmp_path):
    pipe = _pipe(tiny_plan)
    one = tmp_path / "one"
    generate_folder(pipe, PROMPTS, one, num_images=2, seed=5, batch_size=2, steps=4)
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS) + "\n")
    args = ["--engine", str(tiny_plan), "--backend", "onnxruntime", "--prompt-file", "p.txt", "--num-images", "2",
            "--seed", "5", "--batch-size", "2", "--steps", "4", "--out", "two/", "--json"]
    proc = _torchrun(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout)  # rank 0 alone prints
    assert (summary["processes"], summary["made"], summary["total"], len(summary["images"])) == (2, 6, 6, 6)
    recs = read_manifest(tmp_path / "two")
    assert [r["index"] for r in recs] == list(range(6))  # every image exactly once
    assert {r["rank"] for r in recs} == {0, 1}
    for r in read_manifest(one):
        np.testing.assert_array_equal(_pixels(tmp_path / "two" / r["file"]), _pixels(one / r["file"]))
    again = _torchrun(args, tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads(again.stdout)["made"] == 0
    assert {r["status"] for r in read_manifest(tmp_path / "two")} == {"kept"}


def test_several_processes_need_a_folder(tiny_plan, tmp_path):
    proc = _torchrun(["--engine", str(tiny_plan), "--prompt", "a red circle", "--num-images", "2", "--grid",
                      "--out", "g.png"], tmp_path)
    assert proc.returncode != 0  # torchrun reports the children's exit status 2 with its own traceback
    assert "cvqd-run: error: several processes (2, torchrun) share a prompt set" in proc.stderr
    assert "cvqd/runtime" not in proc.stderr  # no traceback through cvqd's code
    assert not (tmp_path / "g.png").exists()


def test_cli_resumes_and_says_so(tiny_plan, tmp_path):
    from click.testing import CliRunner

    from cvqd.runtime.cli import cli

    out = tmp_path / "o"
    args = ["--engine", str(tiny_plan), "--prompt", "a red circle", "--num-images", "3", "--steps", "3", "--out",
            f"{out}/"]
    r1 = CliRunner().invoke(cli, args)
    assert r1.exit_code == 0, r1.output
    assert (out / MANIFEST).is_file() and len(read_manifest(out)) == 3
    r2 = CliRunner().invoke(cli, args)
    assert r2.exit_code == 0 and "made 0 of 3" in r2.output and "kept 3" in r2.output
    r3 = CliRunner().invoke(cli, args + ["--overwrite"])
    assert r3.exit_code == 0 and "made 3 of 3" in r3.output


def test_bad_environment_and_manifest(tmp_path):
    with pytest.raises(CvqdError, match="RANK=2 and WORLD_SIZE=2"):
        Ranks.from_env({"WORLD_SIZE": "2", "RANK": "2"})
    with pytest.raises(CvqdError, match="not an integer"):
        Ranks.from_env({"WORLD_SIZE": "two"})
    bad = tmp_path / "m.jsonl"
    bad.write_text('{"file": "a.png", "prompt": "x"}\nnot json\n')
    with pytest.raises(CvqdError, match="line 2 is not JSON"):
        read_manifest(bad)
