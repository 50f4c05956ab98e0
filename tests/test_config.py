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
