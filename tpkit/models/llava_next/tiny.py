"""Configs of LLaVA-NeXT and LLaVA-OneVision from size keywords (tiny for tests, full size for speed
runs): :data:`tpkit.models.tiny.CONFIG_BUILDERS` lists them."""

from __future__ import annotations

from transformers import LlavaNextConfig, LlavaOnevisionConfig, SiglipVisionConfig

from tpkit.models.tiny import clip_config, set_attn, text_config

__all__ = ["tiny_next_config", "tiny_onevision_config", "grid_pinpoints"]


def grid_pinpoints(side: int, max_tiles: int) -> list[list[int]]:
    """Every (rows x cols) tiling of ``side``-pixel crops with rows, cols <= ``max_tiles``, as
    [height, width] pairs (OneVision's anyres grid)."""
    return [[side * i, side * j] for i in range(1, max_tiles + 1) for j in range(1, max_tiles + 1)]


def tiny_next_config(
    text_backbone: str = "llama",
    *,
    vocab_size: int = 128,
    image_token_id: int = 3,
    pad_token_id: int = 0,
    image_size: int = 32,
    patch_size: int = 8,
    pinpoints: list[list[int]] | None = None,
    vision_hidden: int = 32,
    vision_layers: int = 2,
    vision_heads: int = 2,
    vision_intermediate: int | None = None,
    hidden_size: int = 64,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 4096,
    attn_implementation: str = "sdpa",
) -> LlavaNextConfig:
    """LLaVA-NeXT (v1.6): a CLIP tower with CLS, any-res crops (``pinpoints``, default 1x2, 2x1, 2x2
    crops of ``image_size``), ``image_newline`` at each canvas row, a Llama/Mistral LM."""
    s = image_size
    vision = clip_config(
        image_size, patch_size, vision_hidden, vision_layers, vision_heads, vision_intermediate
    )
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
    cfg = LlavaNextConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=image_token_id,
        image_grid_pinpoints=pinpoints or [[s, 2 * s], [2 * s, s], [2 * s, 2 * s]],
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=(image_size // patch_size) ** 2,
        pad_token_id=pad_token_id,
    )
    return set_attn(cfg, attn_implementation)


def tiny_onevision_config(
    text_backbone: str = "qwen2",
    *,
    vocab_size: int = 128,
    image_token_id: int = 3,
    video_token_id: int = 5,
    pad_token_id: int = 0,
    image_size: int = 32,
    patch_size: int = 8,
    max_tiles: int = 3,
    vision_aspect_ratio: str = "anyres_max_9",
    vision_hidden: int = 32,
    vision_layers: int = 2,
    vision_heads: int = 2,
    vision_intermediate: int | None = None,
    hidden_size: int = 64,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 4096,
    attn_implementation: str = "sdpa",
) -> LlavaOnevisionConfig:
    """LLaVA-OneVision: a SigLIP tower (no CLS; every patch is a feature), any-res crops up to
    ``max_tiles`` x ``max_tiles`` downsampled to ``vision_aspect_ratio``'s budget, newline tokens,
    video frames pooled 2x2, a Qwen2 LM."""
    vision = SiglipVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=vision_intermediate or vision_hidden * 4,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        image_size=image_size,
        patch_size=patch_size,
        vision_use_head=False,
    )
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
    cfg = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=image_token_id,
        video_token_id=video_token_id,
        image_grid_pinpoints=grid_pinpoints(image_size, max_tiles),
        vision_aspect_ratio=vision_aspect_ratio,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        pad_token_id=pad_token_id,
    )
    return set_attn(cfg, attn_implementation)
