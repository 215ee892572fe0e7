"""Checks of a model against what was made for it, before any work: which base a teacher cache or an
adapter was made on (a fingerprint of its config and weights), and whether a pruning config fits
the model's images."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

from tpkit.config import ConfigError
from tpkit.pruning.config import PruningConfig

__all__ = [
    "config_sha256",
    "model_fingerprint",
    "fingerprint_diff",
    "ARCHITECTURE_KEYS",
    "image_patches",
    "check_pruning_fits",
]

_VOLATILE_CONFIG_KEYS = {
    "_name_or_path",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "_attn_implementation",
}
# fingerprint keys that say what the model is (its shapes); the others are its weights
ARCHITECTURE_KEYS = ("class", "config_sha256", "vocab_size")


def config_sha256(config: Any) -> str:
    """A hash of a transformers config (less dtype, paths and versions): equal for the same architecture."""
    cfg = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    for sub in ("text_config", "vision_config"):
        if isinstance(cfg.get(sub), dict):
            cfg[sub] = {k: v for k, v in cfg[sub].items() if k not in _VOLATILE_CONFIG_KEYS}
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()


def model_fingerprint(model: torch.nn.Module) -> dict[str, Any]:
    """What identifies a base model: its config (less dtype/paths) and checksums of two weight matrices.

    The sums are float64 over the weights rounded to bfloat16, so a model saved in one dtype or on
    one device is recognised in another (compared with a relative tolerance); LoRA never touches the
    embeddings or ``lm_head``.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    emb = base.get_input_embeddings().weight
    head = base.get_output_embeddings().weight
    return {
        "class": type(base).__name__,
        "config_sha256": config_sha256(base.config),
        "embed_sum": float(emb.detach().to(torch.bfloat16).double().sum()),
        "lm_head_sum": float(head.detach().to(torch.bfloat16).double().sum()),
        "vocab_size": int(head.shape[0]),
    }


def fingerprint_diff(saved: dict[str, Any], now: dict[str, Any], labels: tuple[str, str]) -> list[str]:
    """``"key: saved (labels[0]) vs now (labels[1])"`` for every key that differs."""
    out = []
    for k in sorted(set(saved) | set(now)):
        a, b = saved.get(k), now.get(k)
        if isinstance(a, float) and isinstance(b, float):
            if abs(a - b) > 1e-6 * max(1.0, abs(a), abs(b)):
                out.append(f"{k}: {a!r} ({labels[0]}) vs {b!r} ({labels[1]})")
        elif a != b:
            out.append(f"{k}: {a!r} ({labels[0]}) vs {b!r} ({labels[1]})")
    return out


def image_patches(model: torch.nn.Module) -> int | None:
    """Patches of one image of a LLaVA-1.5-style model (a fixed grid), else None (not known here)."""
    config = getattr(model, "config", None)
    vision = getattr(config, "vision_config", None)
    if getattr(config, "model_type", None) != "llava" or vision is None:
        return None
    size, patch = getattr(vision, "image_size", None), getattr(vision, "patch_size", None)
    if not size or not patch:
        return None
    return (size // patch) ** 2


def check_pruning_fits(model: torch.nn.Module, pruning: PruningConfig) -> None:
    """ConfigError (naming the key) when ``pruning`` cannot prune this model's images."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    n = image_patches(base)
    if n is not None:
        try:
            pruning.check_patches(n)
        except ValueError as e:
            raise ConfigError(str(e)) from None
