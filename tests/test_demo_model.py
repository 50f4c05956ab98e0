"""The bundled demo model: a normal cvqd checkpoint within budget that follows prompts far above chance.

A quality test, not a snapshot: images generated with fixed seeds at the model's recorded defaults are read back
by the shapes analyzer (no learned model), and colour and shape must match the prompt. A model that ignored the
prompt would get colour+shape right 1 time in 18 and colour 1 in 6; the thresholds sit well above that and a
few images below what the bundled model scores here (its full evaluation: docs/results/demo_quality.json).
"""

from importlib.resources import files
from pathlib import Path

import torch

from cvqd.model.checkpoint import load_checkpoint
from cvqd.training.shapes import analyze, benchmark_prompts

DEMO = Path(str(files("cvqd") / "assets" / "demo.pt"))
# measured on the bundled model (its default guidance 2) with these prompts and seeds: 18 of 25, 18 of 30, colour 48
# of 55, position 48 of 55; short prompts 35 of 36, held-out pairs 5 of 6
SEEN_MIN, HELD_MIN, COLOUR_MIN, POSITION_MIN = 15, 14, 43, 43
SHORT_MIN, SHORT_HELD_MIN = 31, 3


def test_bundled_checkpoint_is_a_small_complete_cvqd_model():
    assert DEMO.is_file(), f"bundled demo model missing: {DEMO}"
    assert DEMO.stat().st_size <= 25 * 1024 * 1024
    ckpt = load_checkpoint(DEMO)
    assert ckpt.config.preset == "demo" and ckpt.stage == "cfg" and ckpt.training is None
    assert ckpt.meta["weights_dtype"] == "float16" and ckpt.state["clip"] is not None
    for stage in ("clip_training", "vqgan_training", "vqgan_decoder_training", "diffusion_training", "cfg_training"):
        assert stage in ckpt.meta, stage


def test_bundled_model_draws_the_colour_and_shape_asked_for():
    from cvqd.runtime.pipeline import Pipeline

    torch.set_num_threads(2)
    prompts = benchmark_prompts()
    seen = [(p, a) for p, a in prompts if not a.held_out][::6]  # 25 in-distribution prompts, every colour/shape
    held = [(p, a) for p, a in prompts if a.held_out]  # all 30 held-out prompts
    pipe = Pipeline.from_checkpoint(DEMO)
    out = pipe.generate([p for p, _ in seen + held], seed=0, batch_size=55)
    verdicts = [analyze(g.image) for g in out]
    both = [(v.colour, v.shape) == (a.colour, a.shape) for (_, a), v in zip(seen + held, verdicts)]
    colour = [v.colour == a.colour for (_, a), v in zip(seen + held, verdicts)]
    position = [v.position == a.position for (_, a), v in zip(seen + held, verdicts)]
    detail = [(p, v.colour, v.shape, v.size, v.position) for (p, _), v in zip(seen + held, verdicts)]
    n = len(seen)
    assert sum(both[:n]) >= SEEN_MIN, detail  # in-distribution: chance would be ~1.4 of 25
    assert sum(both[n:]) >= HELD_MIN, detail  # pairs the generator never saw: chance ~1.7 of 30
    assert sum(colour) >= COLOUR_MIN, detail  # chance ~9 of 55
    assert sum(position) >= POSITION_MIN, detail  # chance 11 of 55 (five positions)


def test_bundled_model_draws_short_prompts():
    """'a red circle' names colour and shape only; the model must still draw both (chance: 1 in 18)."""
    from cvqd.runtime.pipeline import Pipeline
    from cvqd.training.shapes import COLOURS, HELD_OUT, SHAPES

    torch.set_num_threads(2)
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    pipe = Pipeline.from_checkpoint(DEMO)
    out = pipe.generate([f"a {c} {s}" for c, s in pairs], seed=0, num_images=2, batch_size=36)
    right = [(analyze(g.image).colour, analyze(g.image).shape) == pair
             for g, pair in zip(out, [p for p in pairs for _ in range(2)])]
    held = [r for r, pair in zip(right, [p for p in pairs for _ in range(2)]) if pair in HELD_OUT]
    assert sum(right) >= SHORT_MIN, [(g.prompt, g.seed, ok) for g, ok in zip(out, right)]
    assert sum(held) >= SHORT_HELD_MIN
