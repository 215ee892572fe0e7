"""The full-size shapes: ``qwen3-vl-8b`` and ``qwen3.5-27b`` build the shipped configs, random_prompt lays
out one 1024 x 1024 image as Qwen3-VL's processor does, the scaled-down models run a pruned prefill on
it, and the scaled-down Qwen3-VL-8B the speed path scripts/gpu_families.sh takes."""

import pytest
import torch

from tpkit.evaluation.config import EvalConfig
from tpkit.evaluation.random_init import evaluate_speed_only
from tpkit.evaluation.speed import model_inputs, random_prompt_batch
from tpkit.models import attach_pruner, last_stats
from tpkit.models.qwen3_vl.tiny import mrope_section, tiny_config
from tpkit.models.registry import architecture_kwargs, build_random_init
from tpkit.pruning import PruningConfig, Stage1Config, Stage2Config


def _config(name: str, scale_down: int = 1):
    kw = architecture_kwargs(name, scale_down)
    variant = {"qwen3_vl": "qwen3-vl", "qwen3_5": "qwen3.5"}[kw.pop("builder")]
    return tiny_config(variant, **kw)


def test_the_shipped_configs_and_their_scale_down():
    cfg = _config("qwen3-vl-8b")
    text, vision = cfg.text_config, cfg.vision_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads) == (
        4096,
        36,
        32,
        8,
    )
    assert text.head_dim == 128 and text.rope_parameters["mrope_section"] == [24, 20, 20]
    assert text.rope_parameters["mrope_interleaved"] and text.rope_parameters["rope_theta"] == 5e6
    assert (vision.depth, vision.hidden_size, vision.patch_size, vision.num_position_embeddings) == (
        27,
        1152,
        16,
        2304,
    )
    assert vision.deepstack_visual_indexes == [8, 16, 24] and vision.out_hidden_size == 4096

    cfg = _config("qwen3.5-27b")
    text = cfg.text_config
    assert (text.hidden_size, text.num_hidden_layers, text.head_dim, text.intermediate_size) == (
        5120,
        64,
        256,
        17408,
    )
    assert text.layer_types[:4] == ["linear_attention"] * 3 + ["full_attention"]
    assert text.layer_types.count("full_attention") == 16
    assert (text.linear_num_key_heads, text.linear_num_value_heads, text.linear_key_head_dim) == (16, 48, 128)
    assert text.rope_parameters["mrope_section"] == [11, 11, 10]  # of a quarter of the head: 64 dims
    assert text.rope_parameters["partial_rotary_factor"] == 0.25 and text.rope_parameters["rope_theta"] == 1e7
    assert getattr(cfg.vision_config, "deepstack_visual_indexes", None) is None  # no DeepStack

    small = _config("qwen3-vl-8b", 16)
    assert small.text_config.hidden_size == 256 and small.text_config.head_dim == 128
    assert small.vision_config.hidden_size == 72
    assert _config("qwen3-vl-8b", 64).vision_config.hidden_size == 16  # 18 rounds down to the rotary's 4
    small = _config("qwen3.5-27b", 64).text_config
    assert small.head_dim == 8  # 256 / 64 = 4 rounds up: two rotary dims
    assert (small.linear_num_key_heads, small.linear_num_value_heads, small.linear_key_head_dim) == (1, 1, 2)
    assert mrope_section(128) == [24, 20, 20] and mrope_section(16) == [4, 2, 2]
    assert mrope_section(64, "qwen3.5") == [11, 11, 10] and mrope_section(8, "qwen3.5") == [2, 1, 1]


@pytest.mark.parametrize("name, layer", [("qwen3-vl-8b", 2), ("qwen3.5-27b", 3)])
def test_random_prompt_and_a_pruned_prefill_of_the_scaled_down_shape(name, layer):
    """One 1024 x 1024 image as the processor lays it out; Qwen3.5's stage 2 at layer 3, its first
    full-attention layer (0..2 are Gated DeltaNet)."""
    model = build_random_init(name, "cpu", "float32", scale_down=64)
    batch = random_prompt_batch(model, 1, text_before=35, text_after=29)
    ids, cfg = batch["input_ids"], model.config
    assert ids.shape == (1, 35 + 1 + 1024 + 1 + 29)
    assert int((ids == cfg.image_token_id).sum()) == 1024  # 32 x 32 merged units
    assert ids[0, 35] == cfg.vision_start_token_id and ids[0, 35 + 1025] == cfg.vision_end_token_id
    assert batch["pixel_values"].shape == (64 * 64, 3 * 2 * 16 * 16)
    assert batch["image_grid_thw"].tolist() == [[1, 64, 64]]
    assert set(model_inputs(model, batch)) == {"input_ids", "attention_mask", "pixel_values", "image_grid_thw",
                                               "mm_token_type_ids"}  # fmt: skip
    attach_pruner(
        model,
        PruningConfig(stage1=Stage1Config(selector="budget", budget=300), stage2=Stage2Config(layer=layer)),
    )
    with torch.no_grad():
        out = model(**model_inputs(model, batch), use_cache=False, logits_to_keep=1)
    stats = last_stats(model)
    assert stats["n_visual"].tolist() == [1024] and stats["k1"].tolist() == [300]
    assert stats["n_prompt"].tolist() == [35 + 2 + 29 + 300] and stats["k2"] < stats["n_prompt"]
    assert out.logits.shape == (1, 1, cfg.text_config.vocab_size) and torch.isfinite(out.logits).all()


def test_random_init_speed_run_hits_the_budget(tmp_path):
    """qwen3-vl-8b at a CPU scale through the speed run scripts/gpu_families.sh makes: ours at a 22%
    token-layer fraction of the 1,090-token prompt, the visual encoder timed apart, FLOPs."""
    run = EvalConfig()
    run.random_init.name, run.random_init.scale_down, run.random_init.dtype = "qwen3-vl-8b", 64, "float32"
    run.speed.batch_size, run.speed.repeats, run.speed.warmup, run.speed.generation = 1, 1, 0, False
    run.out_dir, run.device, run.eval.progress = str(tmp_path), "cpu", False
    res = evaluate_speed_only(run)
    assert res["prompt"] == {"n_dense": 1090, "n_visual": 1024, "n_text": 66}
    assert res["counts"]["stage2_layer"] == 2
    assert abs(res["achieved"]["token_layer_fraction"]["mean"] - 0.22) < 2 / 1090
    flops = res["flops_gflops_per_sample"]
    assert res["vision_ms"] > 0 and flops["dense"] > 4 * flops["ours@0.22"]
