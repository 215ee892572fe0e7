"""Tiny LLaVA models built from configs (random weights): test fixtures and CPU benchmarks.

They are stock ``LlavaForConditionalGeneration`` instances, so everything that works on them
works on a checkpoint loaded with ``from_pretrained``.
"""

from __future__ import annotations

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    MistralConfig,
    Qwen2Config,
)

TEXT_CONFIGS = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}


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
    if text_backbone not in TEXT_CONFIGS:
        raise ValueError(f"text_backbone must be one of {sorted(TEXT_CONFIGS)}, got {text_backbone!r}")
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=vision_hidden * 4,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=vision_hidden,
    )
    text_kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=pad_token_id,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    if text_backbone == "mistral":
        text_kwargs["sliding_window"] = None
    text = TEXT_CONFIGS[text_backbone](**text_kwargs)
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
    cfg._attn_implementation = attn_implementation
    cfg.text_config._attn_implementation = attn_implementation
    cfg.vision_config._attn_implementation = attn_implementation
    return cfg


def build_tiny_llava(
    text_backbone: str = "llama", *, seed: int = 0, **kwargs
) -> LlavaForConditionalGeneration:
    """A randomly initialised tiny LLaVA in eval mode (fp32, CPU). ``kwargs`` go to the config."""
    cfg = tiny_llava_config(text_backbone, **kwargs)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg)
    return model.eval()
