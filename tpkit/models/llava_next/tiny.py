"""Configs of LLaVA-NeXT and LLaVA-OneVision from size keywords: tiny models for tests and CPU runs,
and the full-size shapes that ``--random-init`` names (:data:`ARCHITECTURES`)."""

from __future__ import annotations

from transformers import LlavaNextConfig, LlavaOnevisionConfig, SiglipVisionConfig

from tpkit.models.tiny import clip_config, set_attn, text_config

__all__ = ["ARCHITECTURES", "tiny_next_config", "tiny_onevision_config", "grid_pinpoints"]


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


# --random-init name -> the config builder (a key of the family's builders) and its keywords at full size
ARCHITECTURES: dict[str, dict] = {
    # LLaVA-NeXT-7B (llava-v1.6-vicuna-7b): CLIP ViT-L/14-336, any-res crops up to 672 px (1008 x 336),
    # Vicuna-7B. random prompts carry a 672 x 672 image: the base view + 2 x 2 crops = 2,928 tokens
    "llava-next-7b": dict(
        builder="llava_next",
        text_backbone="llama",
        vocab_size=32064,
        image_token_id=32000,
        pad_token_id=32001,
        image_size=336,
        patch_size=14,
        pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
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
    # LLaVA-OneVision-7B (llava-onevision-qwen2-7b-ov): SigLIP so400m/14-384 (26 layers as llava-hf
    # keeps them, 1152-d, no CLS), any-res up to 6 x 6 crops with anyres_max_9, Qwen2-7B. random
    # prompts carry a 768 x 768 image: the base view + 2 x 2 crops = 3,699 tokens
    "llava-onevision-7b": dict(
        builder="llava_onevision",
        text_backbone="qwen2",
        vocab_size=152128,
        image_token_id=151646,
        video_token_id=151647,
        pad_token_id=151643,
        image_size=384,
        patch_size=14,
        max_tiles=6,
        vision_hidden=1152,
        vision_layers=26,
        vision_heads=16,
        vision_intermediate=4304,
        hidden_size=3584,
        num_layers=28,
        num_heads=28,
        num_kv_heads=4,
        intermediate_size=18944,
        max_position_embeddings=32768,
    ),
}
