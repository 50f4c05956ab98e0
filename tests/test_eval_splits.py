"""The shapes benchmark's validation and test splits, and the guidance-range warning."""

import pytest

from cvqd.errors import CvqdError
from cvqd.evaluation import PROMPT_KINDS, SPLIT_SEEDS, _seed_spread, load_prompts, split_prompts
from cvqd.errors import ConfigError
from cvqd.model.config import SamplingConfig
from cvqd.training.shapes import HELD_OUT, parse_prompt


def test_splits_share_no_prompt_except_the_short_ones_and_no_seed():
    val, test = split_prompts("validation"), split_prompts("test")
    for kind in PROMPT_KINDS:
        v = {p.prompt for p in val if p.kind == kind}
        t = {p.prompt for p in test if p.kind == kind}
        assert v and t
        assert (v == t) if kind == "short" else not (v & t), kind
        assert any(p.held_out for p in val if p.kind == kind) and any(p.held_out for p in test if p.kind == kind)
    assert sum(p.kind == "full" for p in val) == sum(p.kind == "full" for p in test) == 90
    seeds = {s: set(range(SPLIT_SEEDS[s], SPLIT_SEEDS[s] + 16)) for s in SPLIT_SEEDS}
    assert not (seeds["validation"] & seeds["test"])


def test_split_prompts_name_what_the_analyzer_checks():
    for spec in split_prompts("test"):
        assert parse_prompt(spec.prompt) == spec.wanted, spec.prompt
        assert spec.held_out == ((spec.wanted["colour"], spec.wanted["shape"]) in HELD_OUT)
    assert [p.prompt for p in load_prompts("shapes:validation")] == [p.prompt for p in split_prompts("validation")]
    with pytest.raises(CvqdError, match="unknown benchmark split 'train'"):
        load_prompts("shapes:train")


def test_seed_spread_is_over_seeds():
    rows = [{"per_seed": [True, False, True, True]}, {"per_seed": [True, True, False, True]}]
    out = _seed_spread(rows)
    assert out["colour+shape_seeds"] == [1.0, 0.5, 0.5, 1.0]
    assert out["colour+shape_seed_se"] == pytest.approx((0.25 / 3) ** 0.5 / 2, rel=1e-6)  # std over the 4 seeds / sqrt(4)


def test_guidance_range_is_validated_and_warned_outside(tiny_plan):
    from cvqd.model.plan import load_plan
    from cvqd.runtime.pipeline import load_pipeline

    assert SamplingConfig(guidance_range=(1.0, 2.0)).guidance_range == (1.0, 2.0)
    with pytest.raises(ConfigError, match="guidance_range"):
        SamplingConfig(guidance_range=(2.0, 1.0))
    warned = []
    pipe = load_pipeline(plan=load_plan(tiny_plan), backend="onnxruntime", device="cpu", warn=warned.append)
    pipe.config = pipe.config.replace(sampling=pipe.config.sampling.replace(guidance_range=(1.0, 2.0)))
    assert pipe.guidance_note(1.5) is None
    pipe.generate(["a red circle"], steps=2, guidance=1.5)
    assert warned == []
    pipe.generate(["a red circle"], steps=2, guidance=5.0)
    pipe.generate(["a red circle"], steps=2, guidance=5.0)
    assert len(warned) == 1 and "guidance 5 is outside 1-2" in warned[0]
