"""configs/train/llava15_7b.yaml: loads, and its student builds on the meta device (no download)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from tpkit.training.config import load_train_config
from tpkit.training.lora import apply_lora

ROOT = Path(__file__).resolve().parents[2]


def llava15_7b_config() -> LlavaConfig:
    """llava-hf/llava-1.5-7b-hf's config.json, by hand: CLIP ViT-L/14-336 + Vicuna-7B (Llama)."""
    vision = CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        projection_dim=768,
        hidden_act="quick_gelu",
    )
    text = LlamaConfig(
        vocab_size=32064,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        pad_token_id=32001,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=32000,
        image_seq_length=576,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )


def test_7b_recipe_loads_and_builds_on_meta():
    cfg = load_train_config(ROOT / "configs" / "train" / "llava15_7b.yaml")
    assert cfg.model.path == "llava-hf/llava-1.5-7b-hf"
    assert (cfg.trainer.strategy, cfg.trainer.devices, cfg.trainer.precision) == ("ddp", 8, "bf16-mixed")
    with torch.device("meta"):
        base = LlavaForConditionalGeneration(llava15_7b_config())
    n_base = sum(p.numel() for p in base.parameters())
    assert 7.0e9 < n_base < 7.2e9
    model = apply_lora(base, cfg.lora)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("language_model" in n and "lora_" in n for n in trainable)
    assert not any("vision_tower" in n for n, _ in model.named_modules() if "lora_" in n)
    n_lora = sum(p.numel() for p in trainable.values())
    # r * (in + out) per projection; 32 layers of q, k, v, o (4096 -> 4096), gate, up (4096 -> 11008), down
    r = cfg.lora.r
    per_layer = 4 * r * (4096 + 4096) + 3 * r * (4096 + 11008)
    assert n_lora == 32 * per_layer == 39_976_960
    # checkpoint: fp32 LoRA weights + AdamW exp_avg + exp_avg_sq = 12 bytes per trainable parameter
    ckpt_gb = n_lora * 12 / 1e9
    assert ckpt_gb < 0.5  # vs ~14 GB for the bf16 base alone
