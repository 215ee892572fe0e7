"""Attaching the pruner to a stock model: a class swap, not a fork.

``attach(model, config, family)`` swaps the model's class for a thin subclass with the same name (so
``save_pretrained``, PEFT and ``isinstance`` see the stock model) whose ``forward``/``generate``
prune. Pruning disabled (or no visual input) calls the stock ``forward``/``generate`` untouched:
that is how the same weights serve as the unpruned teacher (:func:`pruning_disabled`).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from tpkit.config import check_fields
from tpkit.models.core.cache import PrunedCache
from tpkit.models.core.family import Family
from tpkit.models.core.generate import check_generate_kwargs, decode_step
from tpkit.models.core.prefill import check_layer, prefill, pruned_lm_loss
from tpkit.models.core.state import ATTR, PrunerState, find_state, state_of
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


# transformers >= 5.2x names the cache ``cache`` (forward argument and output field); 5.17 ``past_key_values``
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
_EXTRA_ARGS = ("answer_mask", "stage1_keep", "stage2_keep")


class _PrunedMixin:
    """Overrides of ``forward`` and ``generate`` on the attached model (see the module docstring)."""

    def _tp_forward(
        self,
        input_ids=None,
        pixel_values=None,
        attention_mask=None,
        answer_mask=None,
        stage1_keep=None,
        stage2_keep=None,
        **kwargs,
    ):
        cache = kwargs.get(CACHE_FIELD)
        if isinstance(cache, PrunedCache) and cache.prefilled:  # a decoding step after a pruned prefill
            return self._tp_decode(input_ids, cache, kwargs)
        kwargs.update(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask)
        state = state_of(self)
        family = state.family
        visual = {k: kwargs.get(k) for k in family.visual_keys}
        if not state.active or not family.has_visual(visual) or input_ids is None:
            state.stats = None  # this call pruned nothing: last_stats must not report an earlier one
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
        if kwargs.get("output_attentions"):
            raise ValueError(
                "output_attentions=True does not work with the pruner (its layers run sdpa or flash kernels on "
                "fewer keys per group): call the model inside `with pruning_disabled(model):`"
            )
        if input_ids.shape[-1] == 0:
            raise ValueError(
                f"input_ids of shape {tuple(input_ids.shape)} hold no tokens: a pruned forward needs the "
                "prompt with its image placeholders"
            )
        if cache is not None and (not isinstance(cache, PrunedCache) or cache.get_seq_length() > 0):
            raise ValueError(
                f"a pruned forward is a prefill: pass no {CACHE_FIELD} (it makes a PrunedCache, returned in the "
                f"output's `{CACHE_FIELD}`, which later calls decode with), or call it inside "
                "`with pruning_disabled(model):`"
            )
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = getattr(family.language_model(self).config, "use_cache", True)
        if cache is None and use_cache:
            cache = PrunedCache(config=family.language_model(self).config)
        pre = prefill(
            self,
            input_ids,
            visual,
            kwargs.get("attention_mask"),
            answer_mask=answer_mask,
            stage1_keep=stage1_keep,
            stage2_keep=stage2_keep,
            cache=cache if use_cache else None,
            output_hidden_states=bool(kwargs.get("output_hidden_states")),
        )
        hidden = _keep_logits(pre.hidden, kwargs.get("logits_to_keep"))
        logits = family.lm_head(self)(hidden)
        loss = None
        labels = kwargs.get("labels")
        if labels is not None:
            loss = pruned_lm_loss(logits, labels, pre.kept_index[:, -logits.shape[1] :])
        return PrunedOutput(
            loss=loss,
            logits=logits,
            hidden_states=pre.hidden_states,
            kept_index=pre.kept_index,
            **{CACHE_FIELD: cache if use_cache else None},
        )

    def _tp_decode(self, input_ids, cache, kwargs):
        if input_ids is None:
            raise ValueError(
                "decoding after a pruned prefill takes input_ids (the new tokens), not inputs_embeds"
            )
        state = state_of(self)
        decode = (state.compiled or {}).get("decode", decode_step)
        hidden, states = decode(
            self, input_ids, cache, output_hidden_states=bool(kwargs.get("output_hidden_states"))
        )
        logits = state.family.lm_head(self)(_keep_logits(hidden, kwargs.get("logits_to_keep")))
        return PrunedOutput(logits=logits, hidden_states=states, **{CACHE_FIELD: cache})

    def generate(self, *args, **kwargs):
        """transformers' ``generate``; with the pruner on and images given, the prefill prunes and the
        decoding steps run on the pruned cache (:mod:`tpkit.models.core.generate`)."""
        state = state_of(self)
        family = state.family
        if state.active and family.has_visual({k: kwargs.get(k) for k in family.visual_keys}):
            check_generate_kwargs(kwargs, CACHE_FIELD)
            static = _new_tokens(self, args, kwargs) if state.compiled else None
            kwargs[CACHE_FIELD] = PrunedCache(config=family.language_model(self).config, static_extra=static)
        return super().generate(*args, **kwargs)

    def _expand_inputs_for_generation(
        self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs
    ):
        # beams / num_return_sequences: inputs packed across the batch (Qwen's patches) expand per sample
        state = state_of(self)
        keys = state.family.packed_visual_keys if state.active and expand_size > 1 else ()
        packed = {k: model_kwargs.pop(k) for k in keys if model_kwargs.get(k) is not None}
        out_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size=expand_size,
            is_encoder_decoder=is_encoder_decoder,
            input_ids=input_ids,
            **model_kwargs,
        )
        if packed:
            model_kwargs.update(state.family.expand_packed(self, input_ids, packed, expand_size))
        return out_ids, model_kwargs

    def create_masks_for_generate(self, *args, **kwargs):
        """transformers' ``generate`` builds the stock 4D masks ahead of each step on a compileable cache;
        a pruned cache's steps build their own per-layer masks (``PrunedCache.layer_masks``), so it
        gets the 2D mask back as it is (the stock masks would also index ``token_type_ids`` against the
        pruned cache's lengths)."""
        if isinstance(kwargs.get("cache", kwargs.get("past_key_values")), PrunedCache):
            return kwargs.get("attention_mask")
        stock = getattr(super(), "create_masks_for_generate", None)
        if stock is None:
            from transformers.masking_utils import create_masks_for_generate as stock
        return stock(*args, **kwargs)

    def _supports_mm_encoder_outputs(self) -> bool:
        # stage 1 needs the tower's hidden states: generate must not encode the images ahead of the prefill
        return not state_of(self).active and super()._supports_mm_encoder_outputs()


def _new_tokens(model, args, kwargs) -> int:
    """How many tokens a generate call may add (a compiled model's static cache holds that many more)."""
    gc = kwargs.get("generation_config") or model.generation_config
    new = kwargs.get("max_new_tokens", gc.max_new_tokens)
    if new is None:
        ids = args[0] if args else kwargs["input_ids"]
        new = kwargs.get("max_length", gc.max_length) - ids.shape[1]
    return max(int(new), 1)


def _keep_logits(hidden: torch.Tensor, logits_to_keep) -> torch.Tensor:
    """The positions whose logits are computed: the last ``n`` (an int > 0), the given indices (a
    tensor), or all."""
    if isinstance(logits_to_keep, int) and logits_to_keep > 0:
        return hidden[:, -logits_to_keep:]
    if isinstance(logits_to_keep, torch.Tensor):
        return hidden[:, logits_to_keep]
    return hidden


_CLASS_CACHE: dict[type, type] = {}


def _forward_for(base: type):
    """The attached class's ``forward``: the stock signature (transformers reads it: logits_to_keep,
    position_ids, the cache argument) plus tpkit's keyword arguments, bound and passed to the mixin."""
    sig = inspect.signature(base.forward)
    params = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    names = {p.name for p in params}
    params += [
        inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None)
        for n in _EXTRA_ARGS
        if n not in names
    ]
    params += [p for p in sig.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD]
    signature = sig.replace(parameters=params)

    def forward(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        values = dict(bound.arguments)
        values.pop("self")
        extra = {
            k: v
            for p in params
            if p.kind is inspect.Parameter.VAR_KEYWORD
            for k, v in values.pop(p.name, {}).items()
        }
        return _PrunedMixin._tp_forward(self, **values, **extra)

    forward.__signature__ = signature
    forward.__doc__ = base.forward.__doc__
    return forward


def _pruned_class(base: type) -> type:
    if base not in _CLASS_CACHE:
        # same name: save_pretrained writes config.architectures from the class name
        _CLASS_CACHE[base] = type(
            base.__name__,
            (_PrunedMixin, base),
            {"__module__": base.__module__, "forward": _forward_for(base)},
        )
    return _CLASS_CACHE[base]


def attach(model: nn.Module, config: PruningConfig | None, family: Family) -> nn.Module:
    """Make ``model``'s forward and generate prune; returns the same object. Re-attaching sets ``config``."""
    outer = model
    model = unwrap(model)
    family.check(model)
    config = config if config is not None else PruningConfig()
    check_fields(config, "pruning.")  # types and finite numbers, as a YAML config is checked
    config.validate()
    check_layer(family.language_model(model), config)
    family.check_config(model, config)
    state = find_state(model)
    if state is None:
        setattr(model, ATTR, PrunerState(family=family, config=config, base_class=model.__class__))
        model.__class__ = _pruned_class(model.__class__)
    else:
        state.family, state.config = family, config
    return outer


def detach_pruner(model: nn.Module) -> nn.Module:
    """Stock class and behaviour back."""
    outer = model
    model = unwrap(model)
    state = find_state(model)
    if state is not None:
        model.__class__ = state.base_class
        if state.compiled:  # compile_model compiled the language model's forward on the instance
            state.family.language_model(model).__dict__.pop("forward", None)
        delattr(model, ATTR)  # family, config, stats and compiled regions go together
    return outer


def is_attached(model: nn.Module) -> bool:
    return find_state(unwrap(model)) is not None


def pruning_config(model: nn.Module) -> PruningConfig | None:
    """The pruning config attached to ``model`` (or the model inside a PEFT wrapper), None if none."""
    state = find_state(unwrap(model))
    return state.config if state is not None else None


def set_pruning(model: nn.Module, config: PruningConfig) -> None:
    """Change the config of an attached model."""
    inner = unwrap(model)
    state = find_state(inner)
    if state is None:
        raise ValueError("set_pruning: no pruner attached (call attach_pruner first)")
    check_fields(config, "pruning.")
    config.validate()
    check_layer(state.family.language_model(inner), config)
    state.family.check_config(inner, config)
    state.config = config


@contextlib.contextmanager
def pruning_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Stock behaviour inside the block (the teacher); nests; a no-op on an unattached model."""
    state = find_state(unwrap(model))
    if state is None:
        yield model
        return
    state.off += 1
    try:
        yield model
    finally:
        state.off -= 1


def last_stats(model: nn.Module) -> dict[str, Any] | None:
    """Per-sample token accounting of the last pruned prefill, or None.

    Keys, each (B,) unless said: ``n_visual`` (placeholders per sample), ``k1`` (kept by stage 1),
    ``n_prompt`` (prompt tokens after stage 1), ``k2`` (prompt tokens after stage 2), ``n_dense``,
    ``token_layer_fraction`` (float64), ``stage1_scores`` (B, P) or None, ``visual_keep_mask`` and
    ``stage2_visual_keep_mask`` (B, N) bool; ``visual_keep`` / ``stage2_visual_keep`` (per-sample
    index lists) are built from the masks here on first request (three host syncs) and cached.
    """
    state = find_state(unwrap(model))
    stats = state.stats if state is not None else None
    if stats is not None and "visual_keep" not in stats:
        m1, m2 = stats["visual_keep_mask"], stats["stage2_visual_keep_mask"]  # (B, N) bool each
        counts = torch.stack([m1.sum(dim=1), m2.sum(dim=1)]).tolist()  # (2, B)
        stats["visual_keep"] = list(m1.nonzero()[:, 1].split(counts[0]))
        stats["stage2_visual_keep"] = list(m2.nonzero()[:, 1].split(counts[1]))
    return stats
