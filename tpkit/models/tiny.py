"""Models built from configs with random weights: tiny ones (tests, CPU runs) and full-size
architectures (speed runs on a GPU, ``--random-init``).

They are stock ``*ForConditionalGeneration`` instances, so everything that works on them works on a
checkpoint loaded with ``from_pretrained``. Each family has a config builder that takes the same
size keywords (``vision_hidden``, ``vision_heads``, ``hidden_size``, ``num_heads``, ``num_kv_heads``,
``intermediate_size``, ...): LLaVA-1.5's is here, the others' in their family folders
(:data:`CONFIG_BUILDERS`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch
import transformers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    MistralConfig,
    Qwen2Config,
)

TEXT_CONFIGS = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}


def text_config(
    text_backbone: str = "llama",
    *,
    vocab_size: int = 128,
    pad_token_id: int = 0,
    hidden_size: int = 64,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 2048,
):
    """The language model's config: Llama (Vicuna), Mistral or Qwen2."""
    if text_backbone not in TEXT_CONFIGS:
        raise ValueError(f"text_backbone must be one of {sorted(TEXT_CONFIGS)}, got {text_backbone!r}")
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
    return TEXT_CONFIGS[text_backbone](**text_kwargs)


def clip_config(
    image_size: int = 32,
    patch_size: int = 8,
    vision_hidden: int = 32,
    vision_layers: int = 2,
    vision_heads: int = 2,
    vision_intermediate: int | None = None,
) -> CLIPVisionConfig:
    """A CLIP vision tower's config (CLS token + patches)."""
    return CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=vision_intermediate or vision_hidden * 4,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=vision_hidden,
    )


def set_attn(cfg, attn_implementation: str):
    """The attention implementation on a composite config and each of its parts."""
    cfg._attn_implementation = attn_implementation
    for part in ("text_config", "vision_config"):
        if getattr(cfg, part, None) is not None:
            getattr(cfg, part)._attn_implementation = attn_implementation
    return cfg


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


def tiny_kwargs_from_processor(processor: Any) -> dict[str, Any]:
    """Vocabulary and image geometry of a processor, so that a random tiny model matches it."""
    tok = processor.tokenizer
    kw: dict[str, Any] = {"vocab_size": len(tok)}
    image_token = getattr(processor, "image_token", "<image>")
    image_token_id = tok.convert_tokens_to_ids(image_token)
    if image_token_id is not None:
        kw["image_token_id"] = int(image_token_id)
    if tok.pad_token_id is not None:
        kw["pad_token_id"] = int(tok.pad_token_id)
    ip = getattr(processor, "image_processor", None)
    for size in (getattr(ip, "crop_size", None), getattr(ip, "size", None)):
        if size is None:
            continue
        get = size.get if isinstance(size, dict) else lambda k, s=size: getattr(s, k, None)
        side = get("height") or get("shortest_edge")
        if side:
            kw["image_size"] = int(side)
            break
    patch = getattr(processor, "patch_size", None)
    if patch:
        kw["patch_size"] = int(patch)
    return kw


# family -> "module:function" building its config from size keywords, and the model class it makes
CONFIG_BUILDERS: dict[str, tuple[str, str]] = {
    "llava": ("tpkit.models.tiny:tiny_llava_config", "LlavaForConditionalGeneration"),
    "llava_next": ("tpkit.models.llava_next.tiny:tiny_next_config", "LlavaNextForConditionalGeneration"),
    "llava_onevision": (
        "tpkit.models.llava_next.tiny:tiny_onevision_config",
        "LlavaOnevisionForConditionalGeneration",
    ),
    "qwen2_vl": ("tpkit.models.qwen2_vl.tiny:tiny_qwen2_vl_config", "Qwen2VLForConditionalGeneration"),
    "qwen2_5_vl": ("tpkit.models.qwen2_vl.tiny:tiny_qwen2_5_vl_config", "Qwen2_5_VLForConditionalGeneration"),
}


def config_builder(family: str) -> tuple[Callable[..., Any], type]:
    """(config builder, model class) of a family named in :data:`CONFIG_BUILDERS`."""
    if family not in CONFIG_BUILDERS:
        raise ValueError(
            f"no config builder for family {family!r}; known: {', '.join(sorted(CONFIG_BUILDERS))}"
        )
    target, cls = CONFIG_BUILDERS[family]
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name), getattr(transformers, cls)


# name -> the family and the keywords of its config builder (full-size numbers)
ARCHITECTURES: dict[str, dict] = {
    # CLIP ViT-L/14-336 (24 layers, 1024-d, 576 patches) + Vicuna-7B (Llama, 4096-d, 32 layers)
    "llava-1.5-7b": dict(
        family="llava",
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
        family="llava",
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
    # LLaVA-NeXT-7B (llava-v1.6-vicuna-7b): CLIP ViT-L/14-336, any-res crops up to 672 px (1008 x 336),
    # Vicuna-7B. random prompts carry a 672 x 672 image: the base view + 2 x 2 crops = 2,928 tokens
    "llava-next-7b": dict(
        family="llava_next",
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
        family="llava_onevision",
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
    # Qwen2.5-VL-7B: ViT of 32 blocks (1280-d, 16 heads, window attention except blocks 7/15/23/31,
    # patch 14, 2x2 merge) + Qwen2 LM (3584-d, 28 layers, 28 heads, 4 kv heads); one 1036x1036 image =
    # 74 x 74 patches = 37 x 37 = 1369 merged units
    "qwen2.5-vl-7b": dict(
        family="qwen2_5_vl",
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
    # benchmarks/prefill_speed.py: LLaVA-1.5's token counts (576 patches) with a small tower and an
    # LM large enough (512-d, 8 layers, batch 8) that compute, not overhead, dominates on a CPU
    "cpu-bench": dict(
        family="llava",
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
# Qwen2-VL-7B: Qwen2.5-VL-7B's LM and token ids, a ViT of 32 full-attention blocks (no windows,
# MLP 5120) and the shorter context of Qwen2-VL
ARCHITECTURES["qwen2-vl-7b"] = {
    **{
        k: v
        for k, v in ARCHITECTURES["qwen2.5-vl-7b"].items()
        if k not in ("window_size", "fullatt_block_indexes", "tokens_per_second")
    },
    "family": "qwen2_vl",
    "vision_intermediate": 5120,
    "max_position_embeddings": 32768,
}


def architecture_kwargs(name: str, scale_down: int = 1) -> dict:
    """Config kwargs of a named architecture; ``scale_down`` divides widths (not depths, not token
    counts) so a CPU can run the same code path in seconds."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(sorted(ARCHITECTURES))}")
    kw = dict(ARCHITECTURES[name])
    if scale_down < 1:
        raise ValueError(f"scale_down = {scale_down} must be >= 1")
    if scale_down > 1:
        for k in ("vision_hidden", "vision_heads", "hidden_size", "num_heads", "num_kv_heads"):
            if k in kw:
                kw[k] = max(1, kw[k] // scale_down)
        for k in ("intermediate_size", "vision_intermediate"):
            if k in kw:
                kw[k] = max(8, kw[k] // scale_down)
    return kw


def build_random_init(
    name: str,
    device: str | torch.device = "cuda",
    dtype: str | torch.dtype = "bfloat16",
    attn_implementation: str = "sdpa",
    scale_down: int = 1,
    seed: int = 0,
):
    """A model of architecture ``name`` (:data:`ARCHITECTURES`) with random weights, in eval mode.

    Parameters are allocated and initialised on ``device`` in ``dtype`` (default-dtype switch plus a
    ``torch.device`` context), so a 7B model appears in seconds on a GPU instead of minutes of CPU
    init followed by a copy.
    """
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    kw = architecture_kwargs(name, scale_down)
    build_config, model_class = config_builder(kw.pop("family"))
    cfg = build_config(attn_implementation=attn_implementation, **kw)
    torch.manual_seed(seed)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = model_class(cfg)
    finally:
        torch.set_default_dtype(prev)
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(attn_implementation)
    return model.eval()
