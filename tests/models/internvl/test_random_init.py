"""The full-size InternVL3-8B shape: its config (448 px tiles, patch 14, 256 tokens a tile), the random
prompt (an 896 x 896 image: 2 x 2 tiles + the thumbnail), and a pruned prefill of it scaled down."""

import time

import torch

from tpkit.evaluation.speed import model_inputs, random_prompt_batch
from tpkit.models import attach_pruner, last_stats
from tpkit.models.internvl.tiny import MARKERS_ATTR, tiny_internvl_config, tokens_per_tile
from tpkit.models.registry import architecture_kwargs, build_random_init
from tpkit.pruning import PruningConfig, Stage1Config, Stage2Config


def test_internvl3_8b_config():
    kw = {k: v for k, v in architecture_kwargs("internvl3-8b").items() if k != "builder"}
    cfg = tiny_internvl_config(**kw)
    vc, tc = cfg.vision_config, cfg.text_config
    assert (tuple(vc.image_size), tuple(vc.patch_size), vc.hidden_size, vc.num_hidden_layers) == (
        (448, 448),
        (14, 14),
        1024,
        24,
    )
    assert (tc.hidden_size, tc.num_hidden_layers, tc.num_attention_heads, tc.num_key_value_heads) == (
        3584,
        28,
        28,
        4,
    )
    assert tokens_per_tile(cfg) == 256 and cfg.image_seq_length == 256 and tc.model_type == "qwen2"
    assert (cfg.image_token_id, getattr(cfg, MARKERS_ATTR)) == (151667, [151665, 151666])


def test_random_prompt_and_a_pruned_prefill_of_the_scaled_down_8b():
    model = build_random_init("internvl3-8b", "cpu", "float32", scale_down=64)
    assert type(model).__name__ == "InternVLForConditionalGeneration" and not model.training
    batch = random_prompt_batch(model, 1, text_before=35, text_after=29)
    ids = batch["input_ids"]
    assert ids.shape == (1, 35 + 1 + 1280 + 1 + 29)
    assert int((ids == model.config.image_token_id).sum()) == 5 * 256
    assert ids[0, 35].item() == 151665 and ids[0, 35 + 1281].item() == 151666
    assert batch["pixel_values"].shape == (5, 3, 448, 448)
    assert set(model_inputs(model, batch)) == {"input_ids", "attention_mask", "pixel_values"}
    attach_pruner(
        model, PruningConfig(stage1=Stage1Config(selector="budget", budget=300), stage2=Stage2Config(layer=2))
    )
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model(**model_inputs(model, batch), use_cache=False, logits_to_keep=1)
    stats = last_stats(model)
    assert stats["n_visual"].tolist() == [1280] and stats["k1"].tolist() == [300]
    assert stats["n_prompt"].tolist() == [35 + 2 + 29 + 300] and stats["k2"] < stats["n_prompt"]
    assert out.logits.shape == (1, 1, 151674) and torch.isfinite(out.logits).all()
    assert time.perf_counter() - t0 < 60


def test_random_init_speed_run_hits_the_budget(tmp_path):
    """internvl3-8b at a CPU scale through the speed run scripts/gpu_families.sh makes: ours at a 22%
    token-layer fraction of the 1,346-token prompt, the visual encoder (5 tiles) timed apart, FLOPs."""
    from tpkit.evaluation.config import EvalConfig
    from tpkit.evaluation.random_init import evaluate_speed_only

    cfg = EvalConfig()
    cfg.random_init.name, cfg.random_init.scale_down, cfg.random_init.dtype = "internvl3-8b", 64, "float32"
    cfg.speed.batch_size, cfg.speed.repeats, cfg.speed.warmup, cfg.speed.generation = 1, 1, 0, False
    cfg.out_dir, cfg.device, cfg.eval.progress = str(tmp_path), "cpu", False
    res = evaluate_speed_only(cfg)
    assert res["prompt"] == {"n_dense": 1346, "n_visual": 1280, "n_text": 66}
    assert abs(res["achieved"]["token_layer_fraction"]["mean"] - 0.22) < 2 / 1346
    flops = res["flops_gflops_per_sample"]
    assert res["vision_ms"] > 0 and flops["dense"] > 4 * flops["ours@0.22"]
