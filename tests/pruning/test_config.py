import pytest

from tpkit.config import ConfigError, from_dict
from tpkit.pruning import PruningConfig, Stage1Config, Stage2Config


def test_defaults_validate_and_disabled():
    PruningConfig().validate()
    off = PruningConfig.disabled()
    assert not off.stage1.enabled and not off.stage2.enabled and not off.enabled


@pytest.mark.parametrize(
    "cfg, words",
    [
        (Stage1Config(min_keep=10, max_keep=5), "min_keep = 10 > max_keep = 5"),
        (Stage1Config(ratio=0.0), "ratio"),
        (Stage1Config(min_keep=0), "min_keep"),
        (Stage1Config(score="nope"), "score"),
        (Stage1Config(positions="packed"), "positions"),
        (Stage2Config(layer=-1), "layer"),
        (Stage2Config(selector="budget"), "budget"),
        (Stage2Config(selector="iqr"), "selector"),
        (Stage2Config(reduce="sum"), "reduce"),
        (Stage2Config(min_keep=3, max_keep=2), "min_keep = 3 > max_keep = 2"),
    ],
)
def test_impossible_values_raise(cfg, words):
    with pytest.raises(ValueError, match=words):
        cfg.validate()
    with pytest.raises(ValueError, match=words):
        if isinstance(cfg, Stage1Config):
            PruningConfig(stage1=cfg).validate()
        else:
            PruningConfig(stage2=cfg).validate()


def test_loads_from_dict_with_location():
    cfg = from_dict(PruningConfig, {"stage1": {"selector": "iqr", "max_keep": 100}, "stage2": {"layer": 3}})
    assert cfg.stage1.selector == "iqr" and cfg.stage1.max_keep == 100 and cfg.stage2.layer == 3
    with pytest.raises(ConfigError, match="stage1"):
        from_dict(PruningConfig, {"stage1": {"min_keep": 9, "max_keep": 2}})
    with pytest.raises(ConfigError, match="selector"):
        from_dict(PruningConfig, {"stage1": {"selector": "elbow"}})
    assert from_dict(PruningConfig, {"stage1": {"positions": "original"}}).stage1.positions == "original"
