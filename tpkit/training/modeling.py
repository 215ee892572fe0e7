"""Building the student: base LLaVA from a :class:`ModelConfig`, PEFT LoRA on the language model only.

The teacher is never a separate model: it is the same PeftModel with the adapter disabled and
the pruner off (see :mod:`tpkit.training.module`).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from transformers import LlavaForConditionalGeneration

from tpkit.config import LoraConfig, ModelConfig

__all__ = [
    "resolve_dtype",
    "load_base_model",
    "load_processor",
    "peft_lora_config",
    "apply_lora",
    "lora_target_names",
]


def resolve_dtype(name: str, on_gpu: bool | None = None) -> torch.dtype:
    """``auto`` = bf16 when a CUDA device is used, fp32 on CPU (tpkit.models.loading rules)."""
    from tpkit.models.loading import resolve_dtype as _resolve

    if on_gpu is None:
        return _resolve(name)
    return _resolve(name, "cuda" if on_gpu else "cpu")


def _tiny_kwargs_from_processor(processor: Any) -> dict[str, Any]:
    """Vocabulary and image geometry of a processor, so a random tiny model matches it."""
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


def load_base_model(
    cfg: ModelConfig, *, dtype: torch.dtype | None = None, processor: Any = None
) -> LlavaForConditionalGeneration:
    """Stock ``LlavaForConditionalGeneration`` from a local dir / hub id, or a random tiny one.

    ``path: tiny[:backbone]`` builds :func:`tpkit.models.tiny.build_tiny_llava`; vocabulary and
    image geometry come from ``processor`` when given (``cfg.tiny`` wins).
    """
    dtype = dtype or resolve_dtype(cfg.dtype)
    if cfg.path == "tiny" or cfg.path.startswith("tiny:"):
        from tpkit.models.tiny import build_tiny_llava

        backbone = cfg.path.split(":", 1)[1] if ":" in cfg.path else "llama"
        kw = _tiny_kwargs_from_processor(processor) if processor is not None else {}
        kw.update(cfg.tiny)
        model = build_tiny_llava(backbone, seed=cfg.seed, attn_implementation=cfg.attn_implementation, **kw)
        return model.to(dtype)
    from tpkit.models.loading import load_llava

    return load_llava(
        cfg.path, dtype=dtype, attn_implementation=cfg.attn_implementation, revision=cfg.revision
    )


def load_processor(path: str) -> Any:
    """``AutoProcessor.from_pretrained`` of a local dir or hub id (tpkit.models.loading)."""
    from tpkit.models.loading import load_processor as _load

    return _load(path)


def peft_lora_config(cfg: LoraConfig) -> PeftLoraConfig:
    return PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        modules_to_save=["multi_modal_projector"] if cfg.train_projector else None,
        bias="none",
    )


def lora_target_names(model: torch.nn.Module, target_modules: str | list[str]) -> list[str]:
    """Names of the ``nn.Linear`` modules that ``target_modules`` selects (peft's matching rule)."""
    names = []
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        if isinstance(target_modules, str):
            hit = re.fullmatch(target_modules, name) is not None
        else:
            hit = any(name == t or name.endswith("." + t) for t in target_modules)
        if hit:
            names.append(name)
    return names


def apply_lora(model: LlavaForConditionalGeneration, cfg: LoraConfig) -> PeftModel:
    """Wrap ``model`` in a PeftModel: LoRA on the LM (checked: no vision-tower target), base frozen.

    LoRA init is seeded by ``cfg.init_seed`` without disturbing the global RNG stream.
    """
    targets = lora_target_names(model, cfg.target_modules)
    if not targets:
        raise ValueError(f"lora.target_modules {cfg.target_modules!r} matches no Linear layer")
    bad = [n for n in targets if "vision_tower" in n]
    if bad:
        raise ValueError(
            f"lora.target_modules {cfg.target_modules!r} hits the vision tower ({bad[0]} and {len(bad) - 1} more):"
            " target the language model by regex, e.g. r'.*language_model.*\\.(q_proj|v_proj)'"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.init_seed)
        peft_model = get_peft_model(model, peft_lora_config(cfg))
    for p in peft_model.parameters():  # optimizer state and updates in fp32 (a bf16 projector copy too)
        if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16):
            p.data = p.data.float()
    return peft_model
