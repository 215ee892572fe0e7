"""Config builders of the Qwen3-VL family with random weights: tiny models for tests and CPU runs, and
the full-size shapes that ``--random-init`` names (:data:`ARCHITECTURES`: ``qwen3-vl-8b``,
``qwen3.5-27b``).

One builder, :func:`tiny_config`, for the three models that share Qwen3-VL's vision tower (a ViT with
learned, interpolated position embeddings, 2-D rotary, no windows, a 2 x 2 merger) and its interleaved
M-RoPE (``variant``):

* ``"qwen3-vl"``: ``Qwen3VLForConditionalGeneration``, a Qwen3 decoder (q/k norms) fed DeepStack
  features: the outputs of the tower blocks ``deepstack_visual_indexes``, through their own mergers,
  are added to the visual tokens after the first ``len(deepstack_visual_indexes)`` decoder layers;
* ``"qwen3-vl-moe"``: ``Qwen3VLMoeForConditionalGeneration``, the same with sparse MoE MLPs;
* ``"qwen3.5"``: ``Qwen3_5ForConditionalGeneration``, no DeepStack, a hybrid decoder: Gated DeltaNet
  (linear attention: a recurrent state, no keys) in every layer but each ``full_attention_interval``-th,
  which is gated softmax attention with a partial rotary (``partial_rotary_factor`` of its head dim).

The M-RoPE sections are derived from the rotary dims in the shipped proportions (Qwen3-VL 24:20:20 of
64 at head dim 128; Qwen3.5 11:11:10 of 32 at a quarter of head dim 256), so any width works.
"""

from __future__ import annotations

import math

import torch
import transformers

from tpkit.models.qwen2_vl.tiny import _check_heads  # the same head checks as Qwen2-VL's

__all__ = [
    "ARCHITECTURES",
    "IMAGE_SIZE_ATTR",
    "VARIANTS",
    "build_tiny_qwen3",
    "mrope_section",
    "tiny_config",
    "tiny_qwen3_5_config",
    "tiny_qwen3_vl_config",
    "tiny_qwen3_vl_moe_config",
]

# variant -> (config class name, model class name)
VARIANTS = {
    "qwen3-vl": ("Qwen3VLConfig", "Qwen3VLForConditionalGeneration"),
    "qwen3-vl-moe": ("Qwen3VLMoeConfig", "Qwen3VLMoeForConditionalGeneration"),
    "qwen3.5": ("Qwen3_5Config", "Qwen3_5ForConditionalGeneration"),
}

# config attribute the family's random_prompt reads: the side (pixels) of its square random image (the
# Qwen2-VL family's name for it, so both families read one attribute)
IMAGE_SIZE_ATTR = "tpkit_image_size"


def mrope_section(rotary_dim: int, variant: str = "qwen3-vl") -> list[int]:
    """(temporal, height, width) sections of the interleaved M-RoPE, summing to ``rotary_dim // 2``, in
    the shipped proportions: Qwen3-VL 24:20:20 (rotary dim 128 -> [24, 20, 20]), Qwen3.5 11:11:10
    (64 -> [11, 11, 10])."""
    half = rotary_dim // 2
    if half < 1:
        raise ValueError(f"rotary dim {rotary_dim} is too small for M-RoPE (need >= 2)")
    if variant == "qwen3.5":
        t = -(-half // 3)
        h = -(-(half - t) // 2)
        return [t, h, half - t - h]
    h = half * 5 // 16
    return [half - 2 * h, h, h]


def tiny_config(
    variant: str = "qwen3-vl",
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
    num_position_embeddings: int = 16,
    deepstack_visual_indexes: tuple[int, ...] | None = None,
    vision_hidden: int = 32,
    vision_layers: int = 4,
    vision_heads: int = 2,
    vision_intermediate: int = 64,
    hidden_size: int = 64,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int | None = None,
    intermediate_size: int = 128,
    num_experts: int = 4,
    num_experts_per_tok: int = 2,
    moe_intermediate_size: int = 32,
    full_attention_interval: int = 2,
    partial_rotary_factor: float = 0.25,
    linear_key_heads: int = 2,
    linear_value_heads: int = 4,
    linear_head_dim: int = 8,
    linear_conv_kernel: int = 4,
    max_position_embeddings: int = 4096,
    rope_theta: float = 5_000_000.0,
    rms_norm_eps: float = 1e-6,
    attn_implementation: str = "sdpa",
):
    """A Qwen3-VL (``variant="qwen3-vl"``), Qwen3-VL-MoE (``"qwen3-vl-moe"``) or Qwen3.5 (``"qwen3.5"``)
    config.

    Special ids sit at the top of the vocabulary, as in the real one, so random text (ids below them)
    never hits a placeholder. ``image_size`` is the side of the family's random prompt image (patches
    of ``patch_size``, merged ``merge_size`` x ``merge_size``); ``num_position_embeddings`` the learned
    position grid (a square) the tower resamples to each image. ``deepstack_visual_indexes`` None: the
    last block of each of the tower's first three quarters (8, 16, 24 of 27 blocks as shipped; 0, 1, 2 of
    4). ``head_dim`` None: hidden / heads. MoE: ``num_experts``, ``num_experts_per_tok``,
    ``moe_intermediate_size``. Qwen3.5: ``full_attention_interval`` (every such layer is softmax
    attention, the rest Gated DeltaNet; 2 in the tiny 4 layers: [linear, full, linear, full]),
    ``partial_rotary_factor``, the DeltaNet's ``linear_key_heads``, ``linear_value_heads`` (a multiple
    of the key heads), ``linear_head_dim`` (keys and values) and ``linear_conv_kernel``.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant = {variant!r} must be one of {', '.join(VARIANTS)}")
    if image_size % (patch_size * merge_size):
        raise ValueError(
            f"image_size = {image_size} must be a multiple of patch_size x merge_size = {patch_size * merge_size}"
        )
    if int(num_position_embeddings**0.5) ** 2 != num_position_embeddings:
        raise ValueError(f"num_position_embeddings = {num_position_embeddings} must be a square (a grid)")
    if head_dim is None:
        head_dim = _check_heads("language model", hidden_size, num_heads, 2)
    # the tower's 2-D rotary splits each head in four: a scaled-down width rounds down to fit (1152 / 64)
    vision_hidden = max(4 * vision_heads, vision_hidden - vision_hidden % (4 * vision_heads))
    _check_heads("vision tower", vision_hidden, vision_heads, 4)
    if num_heads % max(num_kv_heads, 1):
        raise ValueError(f"num_heads = {num_heads} must be a multiple of num_kv_heads = {num_kv_heads}")
    qwen35 = variant == "qwen3.5"
    if qwen35:  # a scaled-down head keeps at least two rotary dims (256 / 64 = 4, a quarter of it 1)
        head_dim = max(head_dim, math.ceil(2 / partial_rotary_factor))
    rotary_dim = int(head_dim * partial_rotary_factor) if qwen35 else head_dim
    rope = {
        "rope_type": "default",
        "rope_theta": rope_theta,
        "mrope_section": mrope_section(rotary_dim, variant),
        "mrope_interleaved": True,
    }
    if qwen35:
        rope["partial_rotary_factor"] = partial_rotary_factor
    text = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=max(num_kv_heads, 1),
        head_dim=head_dim,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=rms_norm_eps,
        rope_parameters=rope,
        pad_token_id=pad_token_id,
    )
    if variant == "qwen3-vl-moe":
        text.update(
            num_experts=num_experts,
            num_experts_per_tok=num_experts_per_tok,
            moe_intermediate_size=moe_intermediate_size,
        )
    if qwen35:
        if linear_value_heads % max(linear_key_heads, 1):
            raise ValueError(
                f"linear_value_heads = {linear_value_heads} must be a multiple of linear_key_heads = "
                f"{linear_key_heads}"
            )
        text.update(
            layer_types=[
                "full_attention" if (i + 1) % full_attention_interval == 0 else "linear_attention"
                for i in range(num_layers)
            ],
            linear_num_key_heads=linear_key_heads,
            linear_num_value_heads=linear_value_heads,
            linear_key_head_dim=linear_head_dim,
            linear_value_head_dim=linear_head_dim,
            linear_conv_kernel_dim=linear_conv_kernel,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
        )
    vision = dict(
        depth=vision_layers,
        hidden_size=vision_hidden,
        intermediate_size=vision_intermediate,
        num_heads=vision_heads,
        in_channels=3,
        patch_size=patch_size,
        spatial_merge_size=merge_size,
        temporal_patch_size=temporal_patch_size,
        out_hidden_size=hidden_size,
        num_position_embeddings=num_position_embeddings,
    )
    if not qwen35:
        if deepstack_visual_indexes is None:
            step = max(1, vision_layers // 4)
            deepstack_visual_indexes = tuple(
                step * (i + 1) - 1 for i in range(3) if step * (i + 1) - 1 < vision_layers
            )
        bad = [i for i in deepstack_visual_indexes if not 0 <= i < vision_layers]
        if bad:
            raise ValueError(f"deepstack_visual_indexes {bad} must lie in 0..{vision_layers - 1}")
        if len(deepstack_visual_indexes) > num_layers:
            raise ValueError(
                f"{len(deepstack_visual_indexes)} DeepStack levels need at least as many decoder layers ({num_layers})"
            )
        vision["deepstack_visual_indexes"] = list(deepstack_visual_indexes)
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


def tiny_qwen3_vl_config(**kwargs):
    """:func:`tiny_config` with ``variant="qwen3-vl"``."""
    return tiny_config("qwen3-vl", **kwargs)


def tiny_qwen3_vl_moe_config(**kwargs):
    """:func:`tiny_config` with ``variant="qwen3-vl-moe"``."""
    return tiny_config("qwen3-vl-moe", **kwargs)


def tiny_qwen3_5_config(**kwargs):
    """:func:`tiny_config` with ``variant="qwen3.5"`` (head dim 32 by default, a quarter of it rotary)."""
    kwargs.setdefault("head_dim", 32)
    return tiny_config("qwen3.5", **kwargs)


def build_tiny_qwen3(variant: str = "qwen3-vl", *, seed: int = 0, **kwargs):
    """A randomly initialised tiny model of ``variant`` in eval mode (fp32, CPU)."""
    build = {"qwen3-vl": tiny_qwen3_vl_config, "qwen3-vl-moe": tiny_qwen3_vl_moe_config,
             "qwen3.5": tiny_qwen3_5_config}[variant]  # fmt: skip
    cfg = build(**kwargs)
    torch.manual_seed(seed)
    return getattr(transformers, VARIANTS[variant][1])(cfg).eval()


# Qwen3-VL's tower at every size Qwen ships (2B to 235B): 27 blocks of 1152, patch 16, a 48 x 48 learned
# position grid, DeepStack from blocks 8, 16 and 24
_TOWER = dict(
    patch_size=16,
    temporal_patch_size=2,
    merge_size=2,
    num_position_embeddings=2304,
    vision_hidden=1152,
    vision_layers=27,
    vision_heads=16,
    vision_intermediate=4304,
)

# --random-init name -> the config builder (a key of the family's builders) and its keywords at full size
ARCHITECTURES: dict[str, dict] = {
    # Qwen3-VL-8B-Instruct: the tower above + a Qwen3 LM (4096-d, 36 layers, 32 heads, 8 kv heads, head
    # dim 128, rotary base 5e6); one 1024 x 1024 image = 64 x 64 patches = 32 x 32 = 1024 merged units
    "qwen3-vl-8b": dict(
        builder="qwen3_vl",
        vocab_size=151936,
        image_token_id=151655,
        video_token_id=151656,
        vision_start_token_id=151652,
        vision_end_token_id=151653,
        pad_token_id=151643,
        bos_token_id=151643,
        eos_token_id=151645,
        image_size=1024,
        deepstack_visual_indexes=(8, 16, 24),
        **_TOWER,
        hidden_size=4096,
        num_layers=36,
        num_heads=32,
        num_kv_heads=8,
        intermediate_size=12288,
        max_position_embeddings=262144,
        rope_theta=5_000_000.0,
    ),
    # Qwen3.5-27B: the same tower (no DeepStack) + a hybrid LM of 64 layers (5120-d): 48 Gated DeltaNet
    # layers (16 key heads, 48 value heads of 128) and 16 gated softmax-attention layers (every 4th: 24
    # heads, 4 kv heads, head dim 256, a quarter of it rotary, base 1e7); the same 1024 x 1024 image
    "qwen3.5-27b": dict(
        builder="qwen3_5",
        vocab_size=248320,
        image_token_id=248056,
        video_token_id=248057,
        vision_start_token_id=248053,
        vision_end_token_id=248054,
        pad_token_id=248044,
        bos_token_id=248044,
        eos_token_id=248044,
        image_size=1024,
        **_TOWER,
        hidden_size=5120,
        num_layers=64,
        num_heads=24,
        num_kv_heads=4,
        head_dim=256,
        intermediate_size=17408,
        full_attention_interval=4,
        partial_rotary_factor=0.25,
        linear_key_heads=16,
        linear_value_heads=48,
        linear_head_dim=128,
        linear_conv_kernel=4,
        max_position_embeddings=262144,
        rope_theta=10_000_000.0,
    ),
}
