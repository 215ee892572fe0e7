"""Attaching the pruner to a stock model: a class swap, not a fork.

``attach(model, config, family)`` swaps the model's class for a thin subclass with the same name (so
``save_pretrained``, PEFT and ``isinstance`` see the stock model) whose ``forward``/``generate``
prune. Pruning disabled (or no ``pixel_values``) calls the stock ``forward``/``generate`` untouched:
that is how the same weights serve as the unpruned teacher (:func:`pruning_disabled`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from tpkit.models.core.family import Family
from tpkit.models.core.generate import generate
from tpkit.models.core.prefill import check_layer, prefill, pruned_lm_loss
from tpkit.pruning.config import PruningConfig

__all__ = [
    "PrunedOutput",
    "attach",
    "detach_pruner",
    "is_attached",
    "set_pruning",
    "pruning_disabled",
    "pruning_config",
    "last_stats",
    "unwrap",
]


@dataclass
class PrunedOutput(CausalLMOutputWithPast):
    """Stock causal-LM output plus ``kept_index`` (B, T_out): original input index per position, -1 = pad."""

    kept_index: torch.LongTensor | None = None


def unwrap(model: nn.Module) -> nn.Module:
    """A PEFT wrapper -> the model inside it (attach works before or after ``get_peft_model``)."""
    seen = 0
    while hasattr(model, "get_base_model") and seen < 3:
        model = model.get_base_model()
        seen += 1
    return model


class _PrunedMixin:
    """Overrides of ``forward`` and ``generate`` on the attached model (see the module docstring)."""

    def forward(
        self,
        input_ids=None,
        pixel_values=None,
        attention_mask=None,
        answer_mask=None,
        stage1_keep=None,
        stage2_keep=None,
        **kwargs,
    ):
        kwargs.update(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask)
        if not _active(self) or kwargs.get("pixel_values") is None or input_ids is None:
            out = super().forward(**kwargs)
            ref = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
            if ref is not None and out.logits is not None and out.logits.shape[1] == ref.shape[1]:
                b, t = ref.shape[:2]
                kept = torch.arange(t, device=out.logits.device).expand(b, t).clone()
                am = kwargs.get("attention_mask")
                if am is not None and am.dim() == 2:
                    kept = kept.masked_fill(am.to(kept.device) == 0, -1)
                out["kept_index"] = kept  # the stock output type, one key more
            return out
        for key in ("cache", "past_key_values"):
            if kwargs.get(key) is not None:
                raise ValueError(
                    "a pruned forward is a prefill: use model.generate for decoding with a cache"
                )
        pre = prefill(
            self,
            input_ids,
            kwargs["pixel_values"],
            kwargs.get("attention_mask"),
            answer_mask=answer_mask,
            stage1_keep=stage1_keep,
            stage2_keep=stage2_keep,
        )
        hidden = pre.hidden
        logits_to_keep = kwargs.get("logits_to_keep", 0) or 0
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        logits = self._tp_family.lm_head(self)(hidden)
        loss = None
        labels = kwargs.get("labels")
        if labels is not None:
            loss = pruned_lm_loss(logits, labels, pre.kept_index[:, -logits.shape[1] :])
        return PrunedOutput(loss=loss, logits=logits, kept_index=pre.kept_index)

    @torch.no_grad()
    def generate(self, *args, **kwargs):
        for name, value in zip(("input_ids",), args):
            kwargs[name] = value
        if not _active(self) or kwargs.get("pixel_values") is None:
            return super().generate(**kwargs)
        return generate(self, **kwargs)


def _active(model: nn.Module) -> bool:
    cfg = getattr(model, "_tp_cfg", None)
    return cfg is not None and cfg.enabled and getattr(model, "_tp_off", 0) == 0


_CLASS_CACHE: dict[type, type] = {}


def _pruned_class(base: type) -> type:
    if base not in _CLASS_CACHE:
        # same name: save_pretrained writes config.architectures from the class name
        _CLASS_CACHE[base] = type(base.__name__, (_PrunedMixin, base), {"__module__": base.__module__})
    return _CLASS_CACHE[base]


def attach(model: nn.Module, config: PruningConfig | None, family: Family) -> nn.Module:
    """Make ``model``'s forward and generate prune; returns the same object. Re-attaching sets ``config``."""
    outer = model
    model = unwrap(model)
    family.check(model)
    config = config if config is not None else PruningConfig()
    config.validate()
    check_layer(family.language_model(model), config)
    if not is_attached(model):
        model._tp_base_class = model.__class__
        model.__class__ = _pruned_class(model.__class__)
        model._tp_off = 0
        model._tp_stats = None
    model._tp_family = family
    model._tp_cfg = config
    return outer


def detach_pruner(model: nn.Module) -> nn.Module:
    """Stock class and behaviour back."""
    outer = model
    model = unwrap(model)
    if is_attached(model):
        model.__class__ = model._tp_base_class
        for attr in ("_tp_base_class", "_tp_cfg", "_tp_off", "_tp_stats", "_tp_family"):
            if attr in model.__dict__:
                delattr(model, attr)
    return outer


def is_attached(model: nn.Module) -> bool:
    return isinstance(unwrap(model), _PrunedMixin)


def pruning_config(model: nn.Module) -> PruningConfig | None:
    """The pruning config attached to ``model`` (or the model inside a PEFT wrapper), None if none."""
    inner = unwrap(model)
    return inner._tp_cfg if is_attached(inner) else None


def set_pruning(model: nn.Module, config: PruningConfig) -> None:
    """Change the config of an attached model."""
    inner = unwrap(model)
    if not is_attached(inner):
        raise ValueError("set_pruning: no pruner attached (call attach_pruner first)")
    config.validate()
    check_layer(inner._tp_family.language_model(inner), config)
    inner._tp_cfg = config


@contextlib.contextmanager
def pruning_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Stock behaviour inside the block (the teacher); nests; a no-op on an unattached model."""
    inner = unwrap(model)
    if not is_attached(inner):
        yield model
        return
    inner._tp_off += 1
    try:
        yield model
    finally:
        inner._tp_off -= 1


def last_stats(model: nn.Module) -> dict[str, Any] | None:
    """Per-sample token accounting of the last pruned prefill, or None.

    Keys, each (B,) unless said: ``n_visual`` (placeholders per sample), ``k1`` (kept by stage 1),
    ``n_prompt`` (prompt tokens after stage 1), ``k2`` (prompt tokens after stage 2), ``n_dense``,
    ``token_layer_fraction`` (float64), ``stage1_scores`` (B, P) or None, ``visual_keep_mask`` and
    ``stage2_visual_keep_mask`` (B, N) bool; ``visual_keep`` / ``stage2_visual_keep`` (per-sample
    index lists) are built from the masks here on first request (three host syncs) and cached.
    """
    stats = getattr(unwrap(model), "_tp_stats", None)
    if stats is not None and "visual_keep" not in stats:
        m1, m2 = stats["visual_keep_mask"], stats["stage2_visual_keep_mask"]  # (B, N) bool each
        counts = torch.stack([m1.sum(dim=1), m2.sum(dim=1)]).tolist()  # (2, B)
        stats["visual_keep"] = list(m1.nonzero()[:, 1].split(counts[0]))
        stats["stage2_visual_keep"] = list(m2.nonzero()[:, 1].split(counts[1]))
    return stats
