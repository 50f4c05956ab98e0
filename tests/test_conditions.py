"""Variations, interpolation and text diffs (Pipeline.generate_from and the cvqd-run options over it)."""

import contextlib
import io

import numpy as np
import pytest
from PIL import Image

from cvqd.images import read_image_params
from cvqd.runtime.pipeline import slerp


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CVQD_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("CVQD_DEFAULT_MODEL", raising=False)


@pytest.fixture(scope="module")
def ref_image(tmp_path_factory):
    from cvqd.training.shapes import Attributes, render_attributes

    path = tmp_path_factory.mktemp("img") / "ref.png"
    render_attributes(Attributes("red", "circle", "large", "center", "white")).save(path)
    return path


def invoke(*args):
    from cvqd.cli_util import run_command
    from cvqd.runtime.cli import FLAGS, cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exc:
        run_command(cli, "cvqd-run", [str(a) for a in args], flags=FLAGS)
    return exc.value.code, err.getvalue()


def test_slerp_ends_and_unit_length():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal(16), rng.standard_normal(16)
    a, b = a / np.linalg.norm(a), b / np.linalg.norm(b)
    assert np.allclose(slerp(a, b, 0.0), a, atol=1e-6) and np.allclose(slerp(a, b, 1.0), b, atol=1e-6)
    mid = slerp(a, b, 0.5)
    assert abs(np.linalg.norm(mid) - 1) < 1e-6 and abs(mid @ a - mid @ b) < 1e-6  # halfway on the circle


def test_interpolation_frames_start_and_end_at_the_conditions(tiny_plan, ref_image):
    from cvqd.runtime.pipeline import Pipeline

    pipe = Pipeline.from_plan(tiny_plan)
    jobs = pipe.interpolation_jobs("a red square", ref_image, frames=5, seed=9)
    assert np.allclose(jobs["conditions"][0], pipe.condition("a red square"), atol=1e-6)
    assert np.allclose(jobs["conditions"][-1], pipe.condition(ref_image), atol=1e-6)
    assert jobs["seed"] == 9 and jobs["index"] == [0] * 5  # one seed through the sequence
    assert [e["t"] for e in jobs["extra"]] == [0.0, 0.25, 0.5, 0.75, 1.0]
    frames = pipe.interpolate("a red square", ref_image, frames=3, seed=9, steps=4)
    assert [g.params["t"] for g in frames] == [0.0, 0.5, 1.0] and frames[0].image.info["cvqd"]["seed"] == 9


def test_variations_same_tokens_on_onnxruntime_and_torch(tiny_plan, tiny_ckpt, ref_image):
    from cvqd.runtime.pipeline import Pipeline

    ort, pt = Pipeline.from_plan(tiny_plan), Pipeline.from_checkpoint(tiny_ckpt, device="cpu")
    a, b = ort.condition(ref_image), pt.condition(ref_image)
    assert np.abs(a - b).max() < 1e-5  # the plan's CLIP image graph + numpy preprocessing vs torch
    jobs = ort.variation_jobs(ref_image, num_images=3, seed=4)
    ta = ort.sample_tokens(jobs["conditions"], [jobs["seed"] + i for i in jobs["index"]], 8, 2.0, 0.9)
    tb = pt.sample_tokens(pt._to_backend(jobs["conditions"]), [jobs["seed"] + i for i in jobs["index"]], 8, 2.0, 0.9).numpy()
    assert np.array_equal(ta, tb)
    out = ort.variations(ref_image, num_images=2, seed=4, steps=8)
    assert [g.seed for g in out] == [4, 5] and out[0].params["mode"] == "variation"
    # best-of: image j's candidates are seed + j*N + c, never shared with image j + 1 (as for prompts)
    out = ort.variations(ref_image, num_images=2, seed=4, steps=4, best_of=3)
    assert out[0].seed in (4, 5, 6) and out[1].seed in (7, 8, 9)


def test_text_diff_moves_toward_the_target(tiny_plan, ref_image):
    from cvqd.errors import CvqdError
    from cvqd.runtime.pipeline import Pipeline

    pipe = Pipeline.from_plan(tiny_plan)
    img = pipe.condition(ref_image)
    d = pipe.condition("a blue circle") - pipe.condition("a red circle")
    d /= np.linalg.norm(d)
    near = pipe.text_diff_jobs(ref_image, "a red circle", "a blue circle", strength=0.0)["conditions"][0]
    far = pipe.text_diff_jobs(ref_image, "a red circle", "a blue circle", strength=0.8)["conditions"][0]
    assert np.allclose(near, img, atol=1e-6) and far @ d > near @ d
    with pytest.raises(CvqdError, match="strength"):
        pipe.text_diff_jobs(ref_image, "a", "b", strength=1.5)
    with pytest.raises(CvqdError, match="same CLIP embedding"):
        pipe.text_diff_jobs(ref_image, "a red circle", "a red circle")


def test_cli_variations_interpolation_and_text_diff(tiny_plan, ref_image, tmp_path):
    code, err = invoke("--engine", tiny_plan, "--image", ref_image, "--num-images", 2, "--steps", 3,
                       "--out", tmp_path / "var")
    assert code == 0, err
    names = sorted(p.name for p in (tmp_path / "var").iterdir())
    assert names == ["000-variation-of-ref-png-s0.png", "001-variation-of-ref-png-s1.png"]
    assert read_image_params(tmp_path / "var" / names[1])["mode"] == "variation"
    code, err = invoke("--engine", tiny_plan, "--interpolate", "a red square", ref_image, "--frames", 4, "--steps", 3,
                       "--out", tmp_path / "interp", "--seed", 3)
    assert code == 0, err
    params = [read_image_params(p) for p in sorted((tmp_path / "interp").iterdir())]
    assert [p["t"] for p in params] == [0.0, 0.333333, 0.666667, 1.0] and {p["seed"] for p in params} == {3}
    code, err = invoke("--engine", tiny_plan, "--image", ref_image, "--edit-from", "a red circle", "--edit-to",
                       "a blue circle", "--strength", 0.6, "--steps", 3, "--out", tmp_path / "diff.png")
    assert code == 0, err
    assert read_image_params(tmp_path / "diff.png")["strength"] == 0.6


@pytest.mark.parametrize("args,needle", [
    (["--image", "missing.png"], "image not found"),
    (["--image", "text.png"], "is not a readable image"),
    (["--interpolate", "a red square", "--out"], "needs two ends"),
    (["--edit-from", "a red circle", "--image", "ref"], "needs both --edit-from and --edit-to"),
    (["--image", "ref", "--edit-from", "a", "--edit-to", "b", "--strength", "2"], "--strength must be in [0, 1]"),
    (["--image", "ref", "--prompt", "a red circle"], "two kinds of request"),
])
def test_bad_condition_inputs_one_line_nothing_written(tiny_plan, ref_image, tmp_path, args, needle):
    (tmp_path / "text.png").write_text("not an image")
    args = [str(ref_image) if a == "ref" else (str(tmp_path / a) if a.endswith(".png") else a) for a in args]
    out = tmp_path / "out"
    code, err = invoke("--engine", tiny_plan, *args, *([] if "--out" in args else ["--out", out]))
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists() or not any(out.iterdir())


# ------------------------------------------------------------------------------------------- token editing

def test_token_regions():
    from cvqd.errors import CvqdError
    from cvqd.runtime.pipeline import token_region

    left = token_region("left", 16, (4, 4)).reshape(4, 4)
    assert left[:, :2].all() and not left[:, 2:].any()
    box = token_region("0,0,5,4", 16, (4, 4)).reshape(4, 4)  # touches cells (0,0) and (0,1)
    assert box.sum() == 2 and box[0, 0] and box[0, 1]
    for bad, needle in (("1,2,3", "not a region"), ("0,0,17,4", "outside"), ("4,4,4,8", "empty")):
        with pytest.raises(CvqdError, match=needle):
            token_region(bad, 16, (4, 4))


def test_edit_keeps_every_token_outside_the_mask(tiny_ckpt, ref_image):
    from cvqd.runtime.pipeline import Pipeline, token_region

    pipe = Pipeline.from_checkpoint(tiny_ckpt, device="cpu")
    jobs = pipe.edit_jobs(ref_image, "right", "a blue square", num_images=3, seed=2)
    x0, keep = jobs["fixed"]
    R, grid = pipe.config.vqgan.resolution, tuple(pipe.config.transformer.grid)
    assert np.array_equal(~keep[0], token_region("right", R, grid))
    tokens = pipe.sample_tokens(pipe._to_backend(jobs["conditions"]), [jobs["seed"] + i for i in jobs["index"]], 8, 2.0, 0.9,
                                fixed=jobs["fixed"]).numpy()
    assert np.array_equal(tokens[keep], x0[keep])  # exactly the input's tokens outside the mask
    assert (tokens[~keep] < pipe.config.transformer.num_classes).all()  # generated inside: no [MASK] left
    out = pipe.edit(ref_image, "right", "a blue square", num_images=2, seed=2, steps=8)
    assert out[0].params["mode"] == "edit" and out[0].params["regenerated_tokens"] == int((~keep[0]).sum())


def test_edit_on_a_plan_matches_the_checkpoint_and_old_plans_say_what_to_do(tiny_plan, tiny_ckpt, ref_image,
                                                                          tmp_path):
    import json
    import shutil

    from cvqd.runtime.pipeline import Pipeline

    ort, pt = Pipeline.from_plan(tiny_plan), Pipeline.from_checkpoint(tiny_ckpt, device="cpu")
    assert np.array_equal(ort.encode_tokens([ref_image]), pt.encode_tokens([ref_image]))  # the exported encoder
    jobs = ort.edit_jobs(ref_image, "left", "a blue square", num_images=2, seed=1)
    a = ort.sample_tokens(jobs["conditions"], [jobs["seed"] + i for i in jobs["index"]], 8, 2.0, 0.9, fixed=jobs["fixed"])
    b = pt.sample_tokens(pt._to_backend(jobs["conditions"]), [jobs["seed"] + i for i in jobs["index"]], 8, 2.0, 0.9, fixed=jobs["fixed"])
    assert np.array_equal(a, b.numpy())
    code, err = invoke("--engine", tiny_plan, "--image", ref_image, "--mask", "left", "--prompt", "a blue square",
                       "--steps", 3, "--out", tmp_path / "e.png")
    assert code == 0, err
    old = tmp_path / "old.plan"  # a plan exported before plans carried the VQ encoder
    shutil.copytree(tiny_plan, old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["components"]["vq_encoder"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    code, err = invoke("--engine", old, "--image", ref_image, "--mask", "left", "--prompt", "a blue square",
                       "--out", tmp_path / "o.png")
    assert code == 2 and "needs the VQ encoder" in err and "cvqd-export --force" in err
    assert not (tmp_path / "o.png").exists()


def test_cli_edit_and_bad_masks(tiny_ckpt, ref_image, tmp_path):
    base = ["--ckpt", tiny_ckpt, "--backend", "torch", "--device", "cpu", "--image", ref_image, "--prompt",
            "a blue square", "--steps", 3]
    code, err = invoke(*base, "--mask", "left", "--out", tmp_path / "e.png")
    assert code == 0, err
    assert read_image_params(tmp_path / "e.png")["mode"] == "edit"
    for mask, needle in (("1,2", "not a region"), ("0,0,999,4", "outside"), (str(tmp_path / "black.png"),
                                                                             "selects no pixel")):
        Image.new("L", (16, 16), 0).save(tmp_path / "black.png")
        code, err = invoke(*base, "--mask", mask, "--out", tmp_path / "bad.png")
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "bad.png").exists()


# ------------------------------------------------------------------------------------------- global edit

def test_renoised_start_is_the_forward_marginal():
    from cvqd.model.schedule import MaskReplaceSchedule

    sched = MaskReplaceSchedule(16, 100)
    rng = np.random.default_rng(0)
    x0 = rng.integers(0, 16, (1, 20000))
    u = rng.random((1, 2, 20000)).astype(np.float32)
    for t in (10, 50, 90):
        xt = sched.q_sample_host(x0, t, u)
        masked = (xt == 16).mean()
        same = (xt == x0).mean()
        assert abs(masked - sched.gbar[t]) < 0.015
        assert abs(same - (1 - sched.gbar[t] - 16 * sched.bbar[t] + sched.bbar[t])) < 0.015


def test_global_edit_runs_the_later_steps_and_matches_across_backends(tiny_plan, tiny_ckpt, ref_image):
    from cvqd.errors import CvqdError
    from cvqd.runtime.pipeline import Pipeline

    ort, pt = Pipeline.from_plan(tiny_plan), Pipeline.from_checkpoint(tiny_ckpt, device="cpu")
    jobs = ort.renoise_jobs(ref_image, "a blue square", strength=0.5, num_images=2, seed=3)
    T = ort.config.diffusion.num_steps
    assert jobs["renoise"][1] == round(0.5 * (T - 1))
    seen = []

    def count(i, n):
        seen.append((i, n))

    a = ort.sample_tokens(jobs["conditions"], [jobs["seed"] + i for i in jobs["index"]], T, 2.0, 0.9, renoise=jobs["renoise"], callback=count)
    assert seen[-1][1] == jobs["renoise"][1] + 1  # only the steps t <= start_t ran
    b = pt.sample_tokens(pt._to_backend(jobs["conditions"]), [jobs["seed"] + i for i in jobs["index"]], T, 2.0, 0.9, renoise=jobs["renoise"])
    assert np.array_equal(a, b.numpy())
    out = ort.edit_global(ref_image, "a blue square", strength=0.3, steps=8)
    assert out[0].params["mode"] == "global_edit"
    with pytest.raises(CvqdError, match="strength"):
        ort.renoise_jobs(ref_image, "a blue square", strength=0)


def test_cli_global_edit(tiny_plan, ref_image, tmp_path):
    code, err = invoke("--engine", tiny_plan, "--image", ref_image, "--prompt", "a blue square", "--renoise", 0.5,
                       "--steps", 8, "--out", tmp_path / "g.png")
    assert code == 0, err
    assert read_image_params(tmp_path / "g.png")["start_t"] == round(0.5 * 15)
    code, err = invoke("--engine", tiny_plan, "--image", ref_image, "--prompt", "a blue square", "--renoise", 1.5,
                       "--out", tmp_path / "bad.png")
    assert code == 2 and "--renoise must be in (0, 1]" in err and not (tmp_path / "bad.png").exists()
