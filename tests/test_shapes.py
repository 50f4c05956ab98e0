"""The shapes benchmark: deterministic rendering, splits, captions, and the analyzer's accuracy."""

import numpy as np
import pytest
from PIL import Image

from cvqd.errors import CvqdError
from cvqd.training.shapes import (
    COLOURS, HELD_OUT, Attributes, analyze, benchmark_prompts, iter_samples, parse_prompt, render, render_attributes,
    render_folder, sample_spec,
)


def test_analyzer_reads_rendered_images_at_least_99_percent():
    n, hits = 400, {k: 0 for k in ("colour", "shape", "size", "position", "background")}
    for _, spec in iter_samples(n, seed=123):
        v = analyze(render(spec))
        for k in hits:
            hits[k] += getattr(v, k) == getattr(spec.attrs, k)
    acc = {k: h / n for k, h in hits.items()}
    assert all(a >= 0.99 for a in acc.values()), acc


def test_analyzer_on_canonical_images_of_every_combination():
    for _, a in benchmark_prompts()[::7]:
        for bg in ("white", "black"):
            attrs = Attributes(a.colour, a.shape, a.size, a.position, bg)
            v = analyze(render_attributes(attrs))
            assert (v.colour, v.shape, v.size, v.position, v.background) == \
                (a.colour, a.shape, a.size, a.position, bg)


def test_analyzer_sees_nothing_on_a_blank_image_and_rejects_non_rgb():
    v = analyze(Image.new("RGB", (64, 64), "white"))
    assert v.colour is None and v.shape is None and v.background == "white"
    with pytest.raises(CvqdError):
        analyze(np.zeros((64, 64)))


def test_analyzer_ignores_small_specks():
    im = render_attributes(Attributes("blue", "square", "large", "left", "white"))
    arr = np.asarray(im).copy()
    arr[60:62, 60:62] = COLOURS["red"]  # a 4-pixel speck of another colour
    v = analyze(Image.fromarray(arr))
    assert (v.colour, v.shape, v.position) == ("blue", "square", "left")


def test_rendering_is_deterministic_and_splits_hold_out_combinations():
    a, b = sample_spec(7, 42), sample_spec(7, 42)
    assert a == b and render(a).tobytes() == render(b).tobytes()
    assert sample_spec(8, 42) != a
    train = [s.attrs for _, s in iter_samples(300, seed=1, split="train")]
    held = [s.attrs for _, s in iter_samples(60, seed=1, split="heldout")]
    assert not any(x.held_out for x in train) and all(x.held_out for x in held)
    assert {(x.colour, x.shape) for x in held} == set(HELD_OUT)
    with pytest.raises(CvqdError):
        sample_spec(0, 0, split="nope")


def test_captions_and_prompt_parsing():
    a = Attributes("red", "circle", "small", "left", "black")
    assert a.caption() == "a small red circle on the left"
    assert a.caption(background=True) == "a small red circle on the left on a black background"
    assert all("red" in c and "circle" in c for c in a.captions())
    assert parse_prompt("A Large orange triangle at the top") == \
        {"colour": "orange", "shape": "triangle", "size": "large", "position": "top"}
    assert parse_prompt("a blue square") == {"colour": "blue", "shape": "square"}
    prompts = benchmark_prompts()
    assert len(prompts) == 180 and sum(a.held_out for _, a in prompts) == 30


def test_render_folder_is_atomic_and_writes_captions(tmp_path):
    out = render_folder(tmp_path / "ds", 12, seed=3, split="all", captions=True, progress=False)
    pngs = sorted(out.rglob("*.png"))
    assert len(pngs) == 12 and len(sorted(out.rglob("*.txt"))) == 12
    assert Image.open(pngs[0]).size == (64, 64)
    lines = pngs[0].with_suffix(".txt").read_text().splitlines()
    assert lines[0] == sample_spec(3, 0, "all").attrs.caption()
    with pytest.raises(CvqdError, match="already exists"):
        render_folder(out, 2, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]  # no temporary folder left behind
