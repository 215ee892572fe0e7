"""The full-size Qwen shapes: random_prompt lays out one 1036 x 1036 image as Qwen's processor does, and
the scaled-down Qwen2.5-VL-7B runs a pruned prefill on it."""

import time

import pytest
import torch

from tpkit.evaluation.speed import model_inputs, random_prompt_batch
from tpkit.models import attach_pruner, last_stats
from tpkit.models.qwen2_vl.tiny import mrope_section, tiny_config
from tpkit.models.registry import architecture_kwargs, build_random_init
from tpkit.pruning import PruningConfig, Stage1Config, Stage2Config


def test_architectures_and_their_scale_down():
    full = architecture_kwargs("qwen2.5-vl-7b")
    assert (full["hidden_size"], full["num_layers"], full["num_heads"], full["num_kv_heads"]) == (
        3584,
        28,
        28,
        4,
    )
    assert (full["vision_hidden"], full["vision_layers"], full["fullatt_block_indexes"]) == (
        1280,
        32,
        (7, 15, 23, 31),
    )
    cfg = tiny_config("qwen2.5-vl", **{k: v for k, v in full.items() if k != "builder"})
    assert cfg.text_config.rope_parameters["mrope_section"] == [16, 24, 24]  # head dim 128, as shipped
    assert cfg.vision_config.out_hidden_size == 3584 and cfg.vision_config.window_size == 112
    small = architecture_kwargs("qwen2.5-vl-7b", scale_down=16)
    cfg = tiny_config("qwen2.5-vl", **{k: v for k, v in small.items() if k != "builder"})
    assert cfg.text_config.hidden_size == 224 and cfg.text_config.rope_parameters["mrope_section"] == [
        28,
        42,
        42,
    ]
    assert mrope_section(64) == [8, 12, 12]
    with pytest.raises(ValueError, match="hidden size 448 is not divisible by 3 heads"):
        tiny_config(
            "qwen2.5-vl",
            **{k: v for k, v in architecture_kwargs("qwen2.5-vl-7b", 8).items() if k != "builder"},
        )
    cfg = tiny_config(
        "qwen2-vl", **{k: v for k, v in architecture_kwargs("qwen2-vl-7b", 16).items() if k != "builder"}
    )
    assert cfg.vision_config.embed_dim == 80 and cfg.vision_config.mlp_ratio == 4


def test_random_prompt_and_a_pruned_prefill_of_the_scaled_down_7b():
    model = build_random_init("qwen2.5-vl-7b", "cpu", "float32", scale_down=16)
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration" and not model.training
    assert torch.get_default_dtype() == torch.float32
    batch = random_prompt_batch(model, 1, text_before=35, text_after=29)
    ids = batch["input_ids"]
    cfg = model.config
    assert ids.shape == (1, 35 + 1 + 1369 + 1 + 29)
    assert int((ids == cfg.image_token_id).sum()) == 1369  # 37 x 37 merged units
    assert ids[0, 35] == cfg.vision_start_token_id and ids[0, 35 + 1370] == cfg.vision_end_token_id
    assert batch["pixel_values"].shape == (74 * 74, 3 * 2 * 14 * 14)
    assert batch["image_grid_thw"].tolist() == [[1, 74, 74]]
    assert torch.equal(batch["mm_token_type_ids"], (ids == cfg.image_token_id).int())
    assert set(model_inputs(model, batch)) == {"input_ids", "attention_mask", "pixel_values", "image_grid_thw",
                                               "mm_token_type_ids"}  # fmt: skip
    attach_pruner(
        model, PruningConfig(stage1=Stage1Config(selector="budget", budget=300), stage2=Stage2Config(layer=2))
    )
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model(**model_inputs(model, batch), use_cache=False, logits_to_keep=1)
    stats = last_stats(model)
    assert stats["n_visual"].tolist() == [1369] and stats["k1"].tolist() == [300]
    assert stats["n_prompt"].tolist() == [35 + 2 + 29 + 300] and stats["k2"] < stats["n_prompt"]
    assert out.logits.shape == (1, 1, 152064) and torch.isfinite(out.logits).all()
    assert time.perf_counter() - t0 < 60
