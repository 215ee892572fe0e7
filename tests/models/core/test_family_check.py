"""Each family's ``check`` names the first part a model lacks (the shared ``first_missing`` walk)."""

import pytest
import torch
import transformers

from tpkit.models.core.family import first_missing
from tpkit.models.internvl.tiny import build_tiny_internvl
from tpkit.models.llava.tiny import build_tiny_llava
from tpkit.models.llava_next.tiny import tiny_next_config
from tpkit.models.qwen2_vl.tiny import build_tiny_qwen
from tpkit.models.registry import family_of


def test_first_missing_walks_dotted_paths():
    model = build_tiny_llava()
    assert first_missing(model, ["model.language_model.norm", "config.image_token_id"]) is None
    assert first_missing(model, ["lm_head", "model.no_such.norm", "also_missing"]) == "model.no_such.norm"
    model.config.image_token_id = None  # held as None counts as missing
    assert first_missing(model, ["config.image_token_id"]) == "config.image_token_id"


@pytest.mark.parametrize(
    ("make", "drop", "message"),
    [
        (
            build_tiny_llava,
            "model.multi_modal_projector",
            "is not LLaVA-like: it has no 'model.multi_modal_projector'",
        ),
        (
            lambda: transformers.LlavaNextForConditionalGeneration(tiny_next_config()),
            "model.image_newline",
            "has no 'model.image_newline': expected a stock LlavaNextForConditionalGeneration",
        ),
        (
            lambda: build_tiny_qwen("qwen2.5-vl"),
            "model.visual.merger",
            "is not Qwen2-VL-like: it has no 'model.visual.merger'",
        ),
        (
            build_tiny_internvl,
            "model.multi_modal_projector",
            "has no 'model.multi_modal_projector': expected a stock InternVLForConditionalGeneration",
        ),
    ],
)
def test_family_check_names_the_missing_part(make, drop, message):
    torch.manual_seed(0)
    model = make()
    family = family_of(model)
    family.check(model)
    owner, _, name = drop.rpartition(".")
    parent = model
    for part in owner.split("."):
        parent = getattr(parent, part)
    setattr(parent, name, None)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        family.check(model)
