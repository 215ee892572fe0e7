"""PEFT LoRA on the language model only (a plain module-name list would also hit the vision tower).

The teacher is never a separate model: it is the same PeftModel with the adapter disabled and
the pruner off (see :mod:`tpkit.training.module`).
"""

from __future__ import annotations

import re

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from torch import nn

from tpkit.training.config import LoraConfig

__all__ = [
    "peft_lora_config",
    "apply_lora",
    "lora_target_names",
]


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


def apply_lora(model: nn.Module, cfg: LoraConfig) -> PeftModel:
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
