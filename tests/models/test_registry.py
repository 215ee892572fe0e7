"""The family registry: every folder that defines FAMILIES is found, and each family's declarations
(config builders, --random-init shapes, LoRA defaults, FSDP units) fit the models it builds."""

import re

import pytest
import torch

from tpkit.models.registry import (
    architecture_kwargs,
    architectures,
    build_tiny,
    config_builder,
    families,
    family_modules,
    family_of,
)
from tpkit.training.lora import lora_target_names

BUILDERS = sorted(k for f in families() for k in f.builders)


def test_every_family_folder_registers_itself():
    assert [m.rsplit(".", 2)[1] for m in family_modules()] == sorted(
        {f.__module__.split(".")[2] for f in families()}
    )
    assert {"llava", "llava_next", "llava_onevision", "qwen2_vl"} <= {f.name for f in families()}
    assert {"llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl"} <= set(BUILDERS)
    with pytest.raises(ValueError, match="no config builder 'nope'; known: (.*, )?llava, "):
        config_builder("nope")


@pytest.mark.parametrize("name", sorted(architectures()))
def test_every_named_shape_builds_a_config_of_its_family(name):
    kw = architecture_kwargs(name, scale_down=64)
    build, model_class = config_builder(kw.pop("builder"))
    cfg = build(**kw)
    with torch.device("meta"):
        model = model_class(cfg)
    assert family_of(model).architectures[name]["builder"] in family_of(model).builders


@pytest.mark.parametrize("key", BUILDERS)
def test_lora_defaults_and_fsdp_units_fit_the_model(key):
    model = build_tiny(key)
    family = family_of(model)
    targets = lora_target_names(model, family.lora_target)
    assert targets and all("language_model" in n for n in targets)
    assert not any(re.search(family.tower_pattern, n) for n in targets)
    names = [n for n, _ in model.named_modules()]
    assert any(re.search(family.tower_pattern, n + ".") for n in names)  # the pattern names the tower
    for projector in family.projector_modules:
        assert any(n == projector or n.endswith("." + projector) for n in names), projector
    # one FSDP unit per decoder layer and per vision block, nothing else
    blocks = family.fsdp_blocks(model)
    units = [m for m in model.modules() if type(m) in blocks]
    lm = family.language_model(model)
    vision_blocks = len(units) - len(lm.layers)
    assert set(map(type, lm.layers)) <= blocks and vision_blocks > 0
    tower = family.vision_tower(model)
    assert sum(type(m) in blocks for m in tower.modules()) == vision_blocks
