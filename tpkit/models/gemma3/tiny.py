"""Config builders of Gemma 3 with random weights: tiny models for tests and CPU runs, and the full-size
shapes that ``--random-init`` names (:data:`ARCHITECTURES`: ``gemma-3-4b``, ``gemma-3-12b``).

The same size keywords as the other families' builders; Gemma's own: ``head_dim`` (256 on the real
models, not hidden / heads), ``sliding_window`` and ``sliding_window_pattern`` (every ``pattern``-th
layer global, the rest local), ``query_pre_attn_scalar`` (attention scale ``scalar ** -0.5``), the
local and global rotary bases and the global rotary's linear scaling, ``mm_tokens_per_image`` (the
projector average-pools the ``(image_size / patch_size) ** 2`` patches to that many tokens).
"""

from __future__ import annotations

import math

import torch
from transformers import Gemma3Config, Gemma3ForConditionalGeneration

__all__ = ["ARCHITECTURES", "tiny_gemma3_config", "build_tiny_gemma3", "randomize_projector"]


def tiny_gemma3_config(
    *,
    vocab_size: int = 160,
    image_token_id: int = 150,
    boi_token_id: int = 151,
    eoi_token_id: int = 152,
    pad_token_id: int = 0,
    bos_token_id: int = 2,
    eos_token_id: int = 1,
    image_size: int = 32,
    patch_size: int = 4,
    mm_tokens_per_image: int = 16,
    vision_hidden: int = 32,
    vision_layers: int = 2,
    vision_heads: int = 2,
    vision_intermediate: int = 64,
    hidden_size: int = 64,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int | None = None,
    intermediate_size: int = 128,
    sliding_window: int = 8,
    sliding_window_pattern: int = 3,
    query_pre_attn_scalar: float | None = None,
    attn_logit_softcapping: float | None = None,
    rope_theta: float = 1_000_000.0,
    rope_local_theta: float = 10_000.0,
    rope_scaling_factor: float | None = 8.0,
    max_position_embeddings: int = 4096,
    attn_implementation: str = "sdpa",
) -> Gemma3Config:
    """A Gemma 3 config: SigLIP tower (no CLS, no pooling head), the average-pooling projector,
    Gemma 3 text model.

    The tiny defaults make every rule matter on short prompts: a window of 8 positions, 4 layers of
    which layer 2 is global, 16 tokens per image (8 x 8 patches pooled 2 x 2). Special ids sit at
    the top of the vocabulary (random text never hits them). ``head_dim`` None: hidden / heads;
    ``query_pre_attn_scalar`` None: ``head_dim`` (the real 4B/12B use 256 = their head dim).
    """
    side = image_size // patch_size
    per_side = math.isqrt(mm_tokens_per_image)
    if image_size % patch_size or per_side**2 != mm_tokens_per_image or side % per_side:
        raise ValueError(
            f"image_size {image_size} / patch_size {patch_size} = {side} patches a side must pool evenly to "
            f"mm_tokens_per_image = {mm_tokens_per_image} (a square: sqrt must divide {side})"
        )
    if hidden_size % num_heads and head_dim is None:
        raise ValueError(f"hidden size {hidden_size} is not divisible by {num_heads} heads: pass head_dim")
    if num_heads % max(num_kv_heads, 1):
        raise ValueError(f"num_heads = {num_heads} must be a multiple of num_kv_heads = {num_kv_heads}")
    head_dim = head_dim or hidden_size // num_heads
    global_rope = {"rope_type": "default", "rope_theta": rope_theta}
    if rope_scaling_factor:
        global_rope = {"rope_type": "linear", "factor": float(rope_scaling_factor), "rope_theta": rope_theta}
    text = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=max(num_kv_heads, 1),
        head_dim=head_dim,
        sliding_window=sliding_window,
        sliding_window_pattern=sliding_window_pattern,
        query_pre_attn_scalar=query_pre_attn_scalar or head_dim,
        attn_logit_softcapping=attn_logit_softcapping,
        max_position_embeddings=max_position_embeddings,
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": rope_local_theta},
            "full_attention": global_rope,
        },
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
    )
    vision = dict(
        model_type="siglip_vision_model",
        hidden_size=vision_hidden,
        intermediate_size=vision_intermediate,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        image_size=image_size,
        patch_size=patch_size,
        vision_use_head=False,
    )
    cfg = Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=mm_tokens_per_image,
        image_token_index=image_token_id,
        boi_token_index=boi_token_id,
        eoi_token_index=eoi_token_id,
    )
    cfg.pad_token_id = pad_token_id
    for c in (cfg, cfg.text_config, cfg.vision_config):
        c._attn_implementation = attn_implementation
    return cfg


def randomize_projector(
    model: Gemma3ForConditionalGeneration, seed: int = 0
) -> Gemma3ForConditionalGeneration:
    """Random weights for the projector's matrix, which transformers initialises to zeros (every image
    token would embed to 0): scaled so image embeddings have the text embeddings' size."""
    proj = model.model.multi_modal_projector.mm_input_projection_weight  # (vision hidden, hidden)
    text = model.config.text_config
    std = text.initializer_range * math.sqrt(text.hidden_size / proj.shape[0])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        proj.copy_(torch.randn(proj.shape, generator=g) * std)
    return model


def build_tiny_gemma3(*, seed: int = 0, **kwargs) -> Gemma3ForConditionalGeneration:
    """A randomly initialised tiny Gemma 3 in eval mode (fp32, CPU), its projector random too."""
    cfg = tiny_gemma3_config(**kwargs)
    torch.manual_seed(seed)
    return randomize_projector(Gemma3ForConditionalGeneration(cfg), seed).eval()


# --random-init name -> the config builder (the family's builders key) and its keywords at full size
ARCHITECTURES: dict[str, dict] = {
    # Gemma 3 4B (gemma-3-4b-it): SigLIP so400m/14 at 896 px (27 layers, 1152-d, no CLS; 64 x 64 patches
    # average-pooled 4 x 4 to 256 tokens per image) + Gemma 3 text (2560-d, 34 layers, 8 heads, 4 kv
    # heads, head dim 256, 5 sliding-window layers of 1,024 per global one, global RoPE 1M, linear x 8)
    "gemma-3-4b": dict(
        builder="gemma3",
        vocab_size=262208,
        image_token_id=262144,
        boi_token_id=255999,
        eoi_token_id=256000,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=1,
        image_size=896,
        patch_size=14,
        mm_tokens_per_image=256,
        vision_hidden=1152,
        vision_layers=27,
        vision_heads=16,
        vision_intermediate=4304,
        hidden_size=2560,
        num_layers=34,
        num_heads=8,
        num_kv_heads=4,
        head_dim=256,
        intermediate_size=10240,
        sliding_window=1024,
        sliding_window_pattern=6,
        query_pre_attn_scalar=256,
        rope_scaling_factor=8.0,
        max_position_embeddings=131072,
    ),
}
# Gemma 3 12B: the same tower and token ids; text 3840-d, 48 layers, 16 heads, 8 kv heads, MLP 15360
ARCHITECTURES["gemma-3-12b"] = {
    **ARCHITECTURES["gemma-3-4b"],
    "hidden_size": 3840,
    "num_layers": 48,
    "num_heads": 16,
    "num_kv_heads": 8,
    "intermediate_size": 15360,
}
