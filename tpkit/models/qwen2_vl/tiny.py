"""Config builders of the Qwen2-VL family with random weights: tiny models for tests and CPU runs, and
the full-size shapes that ``--random-init`` names (:data:`ARCHITECTURES`).

One builder, :func:`tiny_config`, for both generations (``variant``): Qwen2-VL's tower (full attention
in every block, a GELU MLP) and Qwen2.5-VL's (window attention except in ``fullatt_block_indexes``, a
gated SiLU MLP, RMSNorm). The LM's M-RoPE sections are derived from its head dim, in Qwen's
proportions (16, 24, 24 of 64 at head dim 128), so any width that divides into heads works.
"""

from __future__ import annotations

import torch
import transformers

__all__ = [
    "ARCHITECTURES",
    "VARIANTS",
    "mrope_section",
    "tiny_config",
    "tiny_qwen2_vl_config",
    "tiny_qwen2_5_vl_config",
    "build_tiny_qwen",
]

# variant -> (config class name, model class name)
VARIANTS = {
    "qwen2-vl": ("Qwen2VLConfig", "Qwen2VLForConditionalGeneration"),
    "qwen2.5-vl": ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration"),
}

# config attribute the family's random_prompt reads: the side (pixels) of its square random image
IMAGE_SIZE_ATTR = "tpkit_image_size"


def mrope_section(head_dim: int) -> list[int]:
    """(temporal, height, width) rotary sections, summing to ``head_dim // 2``, in Qwen's 16:24:24
    proportion (head dim 128 -> [16, 24, 24])."""
    half = head_dim // 2
    if half < 3:
        raise ValueError(f"head_dim = {head_dim} is too small for M-RoPE's three sections (need >= 6)")
    t = max(1, half // 4)
    h = (half - t) // 2
    return [t, h, half - t - h]


def _check_heads(what: str, hidden: int, heads: int, multiple: int) -> int:
    if heads < 1 or hidden % heads:
        raise ValueError(
            f"{what}: hidden size {hidden} is not divisible by {heads} heads; pick sizes that divide"
        )
    head_dim = hidden // heads
    if head_dim % multiple:
        raise ValueError(
            f"{what}: head dim {hidden} / {heads} = {head_dim} must be a multiple of {multiple} (rotary halves)"
        )
    return head_dim


def tiny_config(
    variant: str = "qwen2.5-vl",
    *,
    vocab_size: int = 160,
    image_token_id: int = 150,
    video_token_id: int = 151,
    vision_start_token_id: int = 152,
    vision_end_token_id: int = 153,
    pad_token_id: int = 0,
    bos_token_id: int = 1,
    eos_token_id: int = 2,
    image_size: int = 16,
    patch_size: int = 2,
    temporal_patch_size: int = 2,
    merge_size: int = 2,
    window_size: int = 8,
    fullatt_block_indexes: tuple[int, ...] | None = None,
    tokens_per_second: int = 2,
    vision_hidden: int = 32,
    vision_layers: int = 4,
    vision_heads: int = 2,
    vision_intermediate: int = 64,
    hidden_size: int = 64,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 4096,
    rope_theta: float = 1_000_000.0,
    rms_norm_eps: float = 1e-6,
    attn_implementation: str = "sdpa",
):
    """A Qwen2-VL (``variant="qwen2-vl"``) or Qwen2.5-VL (``"qwen2.5-vl"``) config.

    Special ids sit at the top of the vocabulary, as in the real one, so random text (ids below them)
    never hits a placeholder. ``image_size`` is the side of :meth:`Qwen2VLFamily.random_prompt`'s image
    (patches of ``patch_size``, merged ``merge_size`` x ``merge_size``). Qwen2.5-VL: ``window_size`` in
    pixels (a window is ``window_size // merge_size // patch_size`` merged units a side);
    ``fullatt_block_indexes`` None = the last block of every quarter of the tower (7, 15, 23, 31 of 32;
    1, 3 of 4), and always the last block (stage 1's ``attn_received`` scores there).
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant = {variant!r} must be one of {', '.join(VARIANTS)}")
    if image_size % (patch_size * merge_size):
        raise ValueError(
            f"image_size = {image_size} must be a multiple of patch_size x merge_size = {patch_size * merge_size}"
        )
    head_dim = _check_heads("language model", hidden_size, num_heads, 2)
    _check_heads("vision tower", vision_hidden, vision_heads, 4)
    if num_heads % max(num_kv_heads, 1):
        raise ValueError(f"num_heads = {num_heads} must be a multiple of num_kv_heads = {num_kv_heads}")
    text = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=max(num_kv_heads, 1),
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=rms_norm_eps,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": rope_theta,
            "mrope_section": mrope_section(head_dim),
        },
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )
    vision = dict(
        depth=vision_layers,
        num_heads=vision_heads,
        in_channels=3,
        patch_size=patch_size,
        spatial_merge_size=merge_size,
        temporal_patch_size=temporal_patch_size,
    )
    if variant == "qwen2-vl":
        vision.update(
            embed_dim=vision_hidden,
            hidden_size=hidden_size,
            mlp_ratio=max(1, vision_intermediate // vision_hidden),
        )
    else:
        if fullatt_block_indexes is None:
            step = max(2, vision_layers // 4)
            fullatt_block_indexes = tuple(i for i in range(vision_layers) if (i + 1) % step == 0)
        full = sorted({int(i) for i in fullatt_block_indexes} | {vision_layers - 1})
        if full[0] < 0 or full[-1] >= vision_layers:
            raise ValueError(
                f"fullatt_block_indexes = {fullatt_block_indexes} must lie in 0..{vision_layers - 1}"
            )
        vision.update(
            hidden_size=vision_hidden,
            intermediate_size=vision_intermediate,
            out_hidden_size=hidden_size,
            window_size=window_size,
            fullatt_block_indexes=full,
            tokens_per_second=tokens_per_second,
        )
    config_class = getattr(transformers, VARIANTS[variant][0])
    cfg = config_class(
        text_config=text,
        vision_config=vision,
        image_token_id=image_token_id,
        video_token_id=video_token_id,
        vision_start_token_id=vision_start_token_id,
        vision_end_token_id=vision_end_token_id,
        tie_word_embeddings=False,
    )
    cfg.pad_token_id = pad_token_id
    setattr(cfg, IMAGE_SIZE_ATTR, image_size)
    for c in (cfg, cfg.text_config, cfg.vision_config):
        c._attn_implementation = attn_implementation
    return cfg


def tiny_qwen2_vl_config(**kwargs):
    """:func:`tiny_config` with ``variant="qwen2-vl"``."""
    return tiny_config("qwen2-vl", **kwargs)


def tiny_qwen2_5_vl_config(**kwargs):
    """:func:`tiny_config` with ``variant="qwen2.5-vl"``."""
    return tiny_config("qwen2.5-vl", **kwargs)


def build_tiny_qwen(variant: str = "qwen2.5-vl", *, seed: int = 0, **kwargs):
    """A randomly initialised tiny Qwen2-VL / Qwen2.5-VL in eval mode (fp32, CPU)."""
    cfg = tiny_config(variant, **kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, VARIANTS[variant][1])(cfg)
    return model.eval()


# --random-init name -> the config builder (a key of the family's builders) and its keywords at full size
ARCHITECTURES: dict[str, dict] = {
    # Qwen2.5-VL-7B: ViT of 32 blocks (1280-d, 16 heads, window attention except blocks 7/15/23/31,
    # patch 14, 2x2 merge) + Qwen2 LM (3584-d, 28 layers, 28 heads, 4 kv heads); one 1036x1036 image =
    # 74 x 74 patches = 37 x 37 = 1369 merged units
    "qwen2.5-vl-7b": dict(
        builder="qwen2_5_vl",
        vocab_size=152064,
        image_token_id=151655,
        video_token_id=151656,
        vision_start_token_id=151652,
        vision_end_token_id=151653,
        pad_token_id=151643,
        bos_token_id=151643,
        eos_token_id=151645,
        image_size=1036,
        patch_size=14,
        temporal_patch_size=2,
        merge_size=2,
        window_size=112,
        fullatt_block_indexes=(7, 15, 23, 31),
        tokens_per_second=2,
        vision_hidden=1280,
        vision_layers=32,
        vision_heads=16,
        vision_intermediate=3420,
        hidden_size=3584,
        num_layers=28,
        num_heads=28,
        num_kv_heads=4,
        intermediate_size=18944,
        max_position_embeddings=128000,
    ),
}
# Qwen2-VL-7B: Qwen2.5-VL-7B's LM and token ids, a ViT of 32 full-attention blocks (no windows,
# MLP 5120) and the shorter context of Qwen2-VL
ARCHITECTURES["qwen2-vl-7b"] = {
    **{
        k: v
        for k, v in ARCHITECTURES["qwen2.5-vl-7b"].items()
        if k not in ("window_size", "fullatt_block_indexes", "tokens_per_second")
    },
    "builder": "qwen2_vl",
    "vision_intermediate": 5120,
    "max_position_embeddings": 32768,
}
