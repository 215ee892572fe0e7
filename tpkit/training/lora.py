"""PEFT LoRA on the language model only (a plain module-name list would also hit the vision tower).

The model's family (:mod:`tpkit.models.registry`) gives the defaults: the target regex when
``lora.target_modules`` is null, the projector modules ``lora.train_projector`` trains in full, and the
vision tower's module names that no target may hit.

The teacher is never a separate model: it is the same PeftModel with the adapter disabled and
the pruner off (see :mod:`tpkit.training.module`).
"""

from __future__ import annotations

import re

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from torch import nn

from tpkit.config import ConfigError
from tpkit.models.core.family import Family
from tpkit.models.registry import family_of
from tpkit.training.config import LoraConfig

__all__ = [
    "peft_lora_config",
    "apply_lora",
    "lora_targets",
    "lora_target_names",
    "check_lora_size",
]

# bytes per trainable LoRA parameter while training: fp32 weight, gradient, two AdamW moments
_BYTES_PER_PARAM = 16


def peft_lora_config(cfg: LoraConfig, family: Family) -> PeftLoraConfig:
    return PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=lora_targets(cfg, family),
        modules_to_save=list(family.projector_modules) if cfg.train_projector else None,
        bias="none",
    )


def lora_targets(cfg: LoraConfig, family: Family) -> str | list[str]:
    """``lora.target_modules``, or the family's default when it is null."""
    return family.lora_target if cfg.target_modules is None else cfg.target_modules


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


def _free_bytes(device: torch.device) -> int | None:
    """Memory free for new tensors on ``device`` (None: not known)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def check_lora_size(model: nn.Module, targets: list[str], r: int) -> None:
    """ConfigError, before anything is allocated, when rank ``r`` cannot help or cannot fit: a rank
    above a target layer's smaller side adds nothing a full matrix would not, and the adapter's
    training state must fit in the memory that is free."""
    modules = dict(model.named_modules())
    smallest = min(targets, key=lambda n: min(modules[n].in_features, modules[n].out_features))
    side = min(modules[smallest].in_features, modules[smallest].out_features)
    if r > side:
        raise ConfigError(
            f"lora.r = {r} is larger than the smaller side ({side}) of the target layer {smallest}: a rank above "
            f"it adds parameters, not capacity. Set lora.r <= {side}"
        )
    params = sum(r * (modules[n].in_features + modules[n].out_features) for n in targets)
    need = params * _BYTES_PER_PARAM
    device = next(model.parameters()).device
    free = _free_bytes(device)
    if free is not None and need > free:
        raise ConfigError(
            f"lora.r = {r}: the adapter ({params / 1e6:.1f}M parameters on {len(targets)} layers) needs about "
            f"{need / 2**30:.1f} GiB for its weights, gradients and AdamW state, and {free / 2**30:.1f} GiB "
            f"is free on {device}. Lower lora.r or narrow lora.target_modules"
        )


def apply_lora(model: nn.Module, cfg: LoraConfig) -> PeftModel:
    """Wrap ``model`` in a PeftModel: LoRA on the LM (checked: no vision-tower target), base frozen.

    LoRA init is seeded by ``cfg.init_seed`` without disturbing the global RNG stream.
    """
    family = family_of(model)
    pattern = lora_targets(cfg, family)
    targets = lora_target_names(model, pattern)
    if not targets:
        raise ConfigError(f"lora.target_modules {pattern!r} matches no Linear layer")
    bad = [n for n in targets if re.search(family.tower_pattern, n)]
    if bad:
        raise ConfigError(
            f"lora.target_modules {pattern!r} hits the vision tower ({bad[0]} and {len(bad) - 1} more):"
            " target the language model by regex, e.g. r'.*language_model.*\\.(q_proj|v_proj)'"
        )
    check_lora_size(model, targets, cfg.r)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.init_seed)
        peft_model = get_peft_model(model, peft_lora_config(cfg, family))
    for p in peft_model.parameters():  # optimizer state and updates in fp32 (a bf16 projector copy too)
        if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16):
            p.data = p.data.float()
    return peft_model
