import json

import pytest

from cvqd.model.config import ModelConfig, preset
from cvqd.errors import ConfigError


@pytest.mark.parametrize("name", ["paper", "demo", "tiny"])
def test_round_trip_through_json(name):
    cfg = preset(name)
    again = ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg


def test_bad_configs_are_rejected():
    d = preset("tiny").to_dict()
    d["transformer"]["bogus"] = 1
    with pytest.raises(ConfigError, match="unknown keys"):
        ModelConfig.from_dict(d)
    d = preset("tiny").to_dict()
    d["transformer"]["num_classes"] = 99
    with pytest.raises(ConfigError, match="num_classes"):
        ModelConfig.from_dict(d)
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("huge")
    with pytest.raises(ConfigError, match="heads"):
        preset("tiny").transformer.replace(heads=5)


def test_demo_preset_is_the_bundled_models_config():
    """preset("demo") builds exactly the shipped model: depth, tokenizer scope, loss weights and sampling defaults."""
    from cvqd.model.checkpoint import load_checkpoint
    from cvqd.paths import bundled_model

    shipped = load_checkpoint(bundled_model()).config
    assert shipped.to_dict() == preset("demo").to_dict()
    assert (shipped.transformer.depth, shipped.sampling.guidance, shipped.sampling.truncation) == (4, 2.0, 0.85)
