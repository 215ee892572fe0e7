"""Building blocks of the config builders in the family folders (``tpkit/models/<family>/tiny.py``):
the language model's and a CLIP tower's configs from size keywords, the attention implementation on a
composite config, and a processor's geometry for a matching tiny model.

Each family's builders take the same size keywords (``vision_hidden``, ``vision_heads``,
``hidden_size``, ``num_heads``, ``num_kv_heads``, ``intermediate_size``, ...), so one named shape can
be scaled down for a CPU (:func:`tpkit.models.registry.architecture_kwargs`). Nothing here knows a
family.
"""

from __future__ import annotations

from typing import Any

from transformers import CLIPVisionConfig, LlamaConfig, MistralConfig, Qwen2Config

__all__ = ["TEXT_CONFIGS", "text_config", "clip_config", "set_attn", "tiny_kwargs_from_processor"]

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
