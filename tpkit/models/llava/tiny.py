"""LLaVA-1.5 configs from size keywords: tiny models for tests and CPU runs, and the full-size shapes
that ``--random-init`` names (:data:`ARCHITECTURES`)."""

from __future__ import annotations

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration

from tpkit.models.tiny import clip_config, set_attn, text_config

__all__ = ["ARCHITECTURES", "tiny_llava_config", "build_tiny_llava"]


def tiny_llava_config(
    text_backbone: str = "llama",
    *,
    vocab_size: int = 128,
    image_token_id: int = 3,
    pad_token_id: int = 0,
    image_size: int = 32,
    patch_size: int = 8,
    vision_hidden: int = 32,
    vision_layers: int = 2,
    vision_heads: int = 2,
    hidden_size: int = 64,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 2048,
    attn_implementation: str = "sdpa",
) -> LlavaConfig:
    """A LLaVA-1.5-shaped config: CLIP tower, 2-layer MLP projector, Llama/Mistral/Qwen2 LM.

    ``num_kv_heads < num_heads`` so that GQA paths are exercised.
    """
    vision = clip_config(image_size, patch_size, vision_hidden, vision_layers, vision_heads)
    text = text_config(
        text_backbone,
        vocab_size=vocab_size,
        pad_token_id=pad_token_id,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
    )
    n_patches = (image_size // patch_size) ** 2
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=image_token_id,
        image_seq_length=n_patches,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        pad_token_id=pad_token_id,
    )
    return set_attn(cfg, attn_implementation)


def build_tiny_llava(
    text_backbone: str = "llama", *, seed: int = 0, **kwargs
) -> LlavaForConditionalGeneration:
    """A randomly initialised tiny LLaVA in eval mode (fp32, CPU). ``kwargs`` go to the config."""
    cfg = tiny_llava_config(text_backbone, **kwargs)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg)
    return model.eval()


# --random-init name -> the config builder (a key of the family's builders) and its keywords at full size
ARCHITECTURES: dict[str, dict] = {
    # CLIP ViT-L/14-336 (24 layers, 1024-d, 576 patches) + Vicuna-7B (Llama, 4096-d, 32 layers)
    "llava-1.5-7b": dict(
        builder="llava",
        text_backbone="llama",
        vocab_size=32064,
        image_token_id=32000,
        pad_token_id=32001,
        image_size=336,
        patch_size=14,
        vision_hidden=1024,
        vision_layers=24,
        vision_heads=16,
        hidden_size=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=32,
        intermediate_size=11008,
        max_position_embeddings=4096,
    ),
    # same tower + Vicuna-13B (5120-d, 40 layers)
    "llava-1.5-13b": dict(
        builder="llava",
        text_backbone="llama",
        vocab_size=32064,
        image_token_id=32000,
        pad_token_id=32001,
        image_size=336,
        patch_size=14,
        vision_hidden=1024,
        vision_layers=24,
        vision_heads=16,
        hidden_size=5120,
        num_layers=40,
        num_heads=40,
        num_kv_heads=40,
        intermediate_size=13824,
        max_position_embeddings=4096,
    ),
    # benchmarks/prefill_speed.py: LLaVA-1.5's token counts (576 patches) with a small tower and an
    # LM large enough (512-d, 8 layers, batch 8) that compute, not overhead, dominates on a CPU
    "cpu-bench": dict(
        builder="llava",
        text_backbone="llama",
        vocab_size=1024,
        image_token_id=3,
        pad_token_id=0,
        image_size=336,
        patch_size=14,
        vision_hidden=64,
        vision_layers=2,
        vision_heads=2,
        hidden_size=512,
        num_layers=8,
        num_heads=8,
        num_kv_heads=8,
        intermediate_size=1376,
        max_position_embeddings=2048,
    ),
}
