"""The full-size Gemma 3 shapes: their config numbers, random_prompt laid out as Gemma's processor lays
out one 896 x 896 image, and a speed-only run of the scaled-down 4B (the path scripts/gpu_families.sh
takes, its tower run once and shared) landing on the 22% budget."""

import pytest
import torch

from tpkit.evaluation.speed import model_inputs, random_prompt_batch
from tpkit.models.gemma3.tiny import tiny_gemma3_config
from tpkit.models.registry import architecture_kwargs, build_random_init


def _config(name: str, scale_down: int = 1):
    return tiny_gemma3_config(
        **{k: v for k, v in architecture_kwargs(name, scale_down).items() if k != "builder"}
    )


def test_architectures_and_their_scale_down():
    cfg = _config("gemma-3-4b")
    text, vision = cfg.text_config, cfg.vision_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads) == (
        2560,
        34,
        8,
        4,
    )
    assert (text.head_dim, text.intermediate_size, text.query_pre_attn_scalar, text.sliding_window) == (
        256,
        10240,
        256,
        1024,
    )
    assert text.layer_types[:6] == ["sliding_attention"] * 5 + ["full_attention"]
    assert text.layer_types.count("full_attention") == 5  # layers 5, 11, 17, 23, 29
    assert text.rope_parameters["full_attention"] == {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}
    assert text.rope_parameters["sliding_attention"]["rope_theta"] == 1e4
    assert (vision.hidden_size, vision.num_hidden_layers, vision.image_size, vision.patch_size) == (
        1152,
        27,
        896,
        14,
    )
    assert cfg.mm_tokens_per_image == 256 and (cfg.image_token_id, cfg.boi_token_id, cfg.eoi_token_id) == (
        262144,
        255999,
        256000,
    )
    big = _config("gemma-3-12b").text_config
    assert (big.hidden_size, big.num_hidden_layers, big.num_attention_heads, big.num_key_value_heads) == (
        3840,
        48,
        16,
        8,
    )
    small = _config("gemma-3-4b", 16).text_config
    assert (small.hidden_size, small.head_dim, small.num_attention_heads, small.sliding_window) == (
        160,
        16,
        1,
        1024,
    )
    with pytest.raises(ValueError, match="must pool evenly to mm_tokens_per_image = 256"):
        tiny_gemma3_config(image_size=900, patch_size=14, mm_tokens_per_image=256)


def test_random_prompt_and_a_speed_run_of_the_scaled_down_4b(tmp_path):
    model = build_random_init("gemma-3-4b", "cpu", "float32", scale_down=64)
    assert type(model).__name__ == "Gemma3ForConditionalGeneration" and not model.training
    batch = random_prompt_batch(model, 1, text_before=35, text_after=29)
    ids, cfg = batch["input_ids"], model.config
    assert ids.shape == (1, 35 + 1 + 256 + 1 + 29) and ids[0, 0] == cfg.text_config.bos_token_id
    assert ids[0, 35] == cfg.boi_token_id and ids[0, 35 + 257] == cfg.eoi_token_id
    assert int((ids == cfg.image_token_id).sum()) == 256
    assert torch.equal(batch["token_type_ids"], (ids == cfg.image_token_id).long())
    assert batch["pixel_values"].shape == (1, 3, 896, 896)
    assert set(model_inputs(model, batch)) == {
        "input_ids",
        "attention_mask",
        "pixel_values",
        "token_type_ids",
    }

    from tpkit.evaluation.config import EvalConfig
    from tpkit.evaluation.random_init import evaluate_speed_only
    from tpkit.models.registry import family_of
    from tpkit.training.module import reuse_tower_output

    run = EvalConfig()
    run.random_init.name, run.random_init.scale_down, run.random_init.dtype = "gemma-3-4b", 64, "float32"
    run.speed.batch_size, run.speed.repeats, run.speed.warmup, run.speed.generation = 1, 1, 0, False
    run.out_dir, run.device, run.eval.progress = str(tmp_path), "cpu", False
    family = family_of(model)
    runs = []
    hook = model.model.vision_tower.post_layernorm.register_forward_hook(lambda *a: runs.append(1))
    with reuse_tower_output(family.vision_tower(model), family.tower_call_key):  # one tower run for all calls
        res = evaluate_speed_only(run, model)
    hook.remove()
    assert len(runs) == 1  # stage 1's tower call is stock's: dense, ours and the encoder timing share it
    assert res["prompt"] == {"n_dense": 322, "n_visual": 256, "n_text": 66}
    assert abs(res["achieved"]["token_layer_fraction"]["mean"] - 0.22) < 2 / 322
    assert res["vision_ms"] > 0 and res["counts"]["stage2_layer"] == 2
