"""Configs of InternVL (``InternVLForConditionalGeneration``) from size keywords: tiny models for tests
and CPU runs, and the full-size ``internvl3-8b`` shape that ``--random-init`` names (:data:`ARCHITECTURES`).

InternVL3 is InternViT (a ViT with a CLS token, layer scale, 448 px tiles of 14 px patches) whose
last-layer patch features are pixel-shuffled (2 x 2 patches -> one token of 4x the width at
``downsample_ratio`` 0.5), projected by an MLP and read by a Qwen2 (Qwen2.5) language model.
"""

from __future__ import annotations

import torch
from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig

from tpkit.models.tiny import set_attn, text_config

__all__ = ["ARCHITECTURES", "MARKERS_ATTR", "tiny_internvl_config", "build_tiny_internvl", "tokens_per_tile"]

# config attribute holding the ids of ``<img>`` and ``</img>`` (the processor's markers around each
# image): a tpkit attribute of the configs built here, read by the family's random prompts; stock
# checkpoints do not carry it (their tokenizer does)
MARKERS_ATTR = "tpkit_image_markers"


def tokens_per_tile(config: InternVLConfig) -> int:
    """LM tokens one tile becomes: its patch grid shrunk by ``downsample_ratio`` on each side."""
    vc = config.vision_config
    side = vc.image_size[0] // vc.patch_size[0]
    return round(side * config.downsample_ratio) ** 2


def tiny_internvl_config(
    text_backbone: str = "qwen2",
    *,
    vocab_size: int = 128,
    image_token_id: int = 7,
    start_image_token_id: int = 5,
    end_image_token_id: int = 6,
    pad_token_id: int = 0,
    image_size: int = 32,
    patch_size: int = 4,
    downsample_ratio: float = 0.5,
    vision_hidden: int = 32,
    vision_layers: int = 2,
    vision_heads: int = 2,
    vision_intermediate: int | None = None,
    attention_bias: bool = True,
    hidden_size: int = 64,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 4096,
    attn_implementation: str = "sdpa",
) -> InternVLConfig:
    """An InternVL config: InternViT tiles of ``image_size`` (patches of ``patch_size``, CLS token),
    pixel shuffle at ``downsample_ratio``, a Qwen2 (or Llama) LM. The default ids are those of a small
    tokenizer with ``<img>``, ``</img>``, ``<IMG_CONTEXT>`` after five specials (5, 6, 7); the tiny
    default tile is 8 x 8 patches -> 16 tokens."""
    side = image_size // patch_size
    group = round(1 / downsample_ratio)
    if image_size % patch_size or side % group:
        raise ValueError(
            f"image_size = {image_size} must be a multiple of patch_size = {patch_size}, and its {side} patches a "
            f"side a multiple of 1 / downsample_ratio = {group} (the pixel shuffle merges {group} x {group} patches)"
        )
    vision = InternVLVisionConfig(
        hidden_size=vision_hidden,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        intermediate_size=vision_intermediate or 4 * vision_hidden,
        attention_bias=attention_bias,
        image_size=image_size,
        patch_size=patch_size,
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
    cfg = InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=image_token_id,
        image_seq_length=(side // group) ** 2,
        downsample_ratio=downsample_ratio,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )
    cfg.pad_token_id = pad_token_id
    setattr(cfg, MARKERS_ATTR, [start_image_token_id, end_image_token_id])
    return set_attn(cfg, attn_implementation)


def build_tiny_internvl(*, seed: int = 0, **kwargs) -> InternVLForConditionalGeneration:
    """A randomly initialised tiny InternVL in eval mode (fp32, CPU). ``kwargs`` go to the config.

    InternViT initialises its CLS token and position embeddings to zeros (pretrained weights replace
    them); here they are drawn at random too, so that CLS-based scores differ between patches."""
    cfg = tiny_internvl_config(**kwargs)
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(cfg)
    emb = model.model.vision_tower.embeddings
    with torch.no_grad():
        emb.cls_token.normal_(std=1.0)
        if emb.position_embeddings is not None:
            emb.position_embeddings.normal_(std=0.5)
    return model.eval()


# --random-init name -> the config builder (a key of the family's builders) and its keywords at full size
ARCHITECTURES: dict[str, dict] = {
    # InternVL3-8B: InternViT-300M-448px-V2.5 (24 layers, 1024-d, 16 heads, qkv bias, CLS token; 448 px tiles
    # of 14 px patches = 32 x 32, pixel-shuffled to 16 x 16 = 256 tokens a tile) + Qwen2.5-7B (3584-d, 28
    # layers, 28 heads, 4 kv heads); ids as its tokenizer places them (<img> 151665, </img> 151666,
    # <IMG_CONTEXT> 151667). random prompts carry an 896 x 896 image: 2 x 2 tiles + the thumbnail = 1,280 tokens
    "internvl3-8b": dict(
        builder="internvl",
        text_backbone="qwen2",
        vocab_size=151674,
        image_token_id=151667,
        start_image_token_id=151665,
        end_image_token_id=151666,
        pad_token_id=151643,
        image_size=448,
        patch_size=14,
        vision_hidden=1024,
        vision_layers=24,
        vision_heads=16,
        vision_intermediate=4096,
        hidden_size=3584,
        num_layers=28,
        num_heads=28,
        num_kv_heads=4,
        intermediate_size=18944,
        max_position_embeddings=32768,
    ),
}
