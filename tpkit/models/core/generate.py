"""Generation with the pruner: transformers' own ``generate()`` drives the loop.

tpkit's part is the model call. The first call of ``generate`` (the prefill) runs the pruned prefill
and fills a :class:`tpkit.models.core.cache.PrunedCache`; every later call finds that cache and runs
one decoding step through the same decoder layers, each layer group attending to its own keys. So
streamers, logits processors and warpers, stopping criteria, ``stop_strings``, ``min_new_tokens``,
repetition penalties, beam search, ``return_dict_in_generate`` with scores and logits, and the
model's ``generation_config`` behave as they do on the stock model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tpkit.models.core.cache import PrunedCache
from tpkit.models.core.layers import LayerRule, rotary_tables
from tpkit.models.core.prefill import attn_impl, cache_kwarg, run_group
from tpkit.models.core.state import state_of

__all__ = ["UNSUPPORTED_GENERATE", "check_generate_kwargs", "decode_step"]

# generate() arguments whose decoding strategy cannot run on a pruned cache, and why
UNSUPPORTED_GENERATE = {
    "assistant_model": "assisted decoding verifies draft tokens by cropping the cache",
    "prompt_lookup_num_tokens": "prompt-lookup decoding verifies draft tokens by cropping the cache",
    "penalty_alpha": "contrastive search re-runs candidate tokens against the cache",
    "output_attentions": "the pruned layers run sdpa or flash kernels on fewer keys per group",
}


def check_generate_kwargs(kwargs: dict[str, Any], cache_kw: str) -> None:
    """ValueError, naming the argument and ``pruning_disabled``, for what a pruned ``generate`` cannot do."""
    gc = kwargs.get("generation_config")
    for name, why in UNSUPPORTED_GENERATE.items():
        value = kwargs.get(name, getattr(gc, name, None) if gc is not None else None)
        if value not in (None, False, 0):
            raise ValueError(
                f"generate({name}=...) does not work with the pruner ({why}): "
                "run it inside `with pruning_disabled(model):`"
            )
    for key in ("cache", "past_key_values"):
        if kwargs.get(key) is not None:
            raise ValueError(
                f"generate({key}=...): a pruned generate makes its own cache (its two layer groups hold "
                "different lengths); pass none, or generate inside `with pruning_disabled(model):`"
            )
    if gc is not None and getattr(gc, "cache_implementation", None) is not None:
        raise ValueError(
            f"generation_config.cache_implementation = {gc.cache_implementation!r} does not work with the "
            "pruner, whose cache is its own: set it to None, or generate inside `with pruning_disabled(model):`"
        )


def decode_step(
    model: nn.Module,
    input_ids: torch.Tensor,
    cache: PrunedCache,
    *,
    output_hidden_states: bool = False,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
    """One decoding step after a pruned prefill: ``input_ids`` (B, q) new tokens -> final-normed hidden
    states (B, q, D) (and each layer's input with ``output_hidden_states``). Positions continue from the
    prompt's; each layer attends to its group's cached keys, masked and rotated as its rule says (the
    rules the prefill recorded in the cache); no host sync."""
    family = state_of(model).family
    lm = family.language_model(model)
    n_layers = lm.config.num_hidden_layers
    cache_kw = cache_kwarg(lm.layers[0])
    h = lm.embed_tokens(input_ids)  # (B, q, D)
    q = h.shape[1]
    pos = cache.next_position[:, None] + torch.arange(q, device=h.device)[None, :]  # (B, q)
    pos = family.decode_positions(pos)  # (B, q), or (R, B, q) for multi-axis positions
    rules = cache.rules or (LayerRule(),) * n_layers
    rotary = rotary_tables(lm, h, pos, rules)
    masks = cache.layer_masks(q, attn_impl(lm), h.dtype)
    states: list[torch.Tensor] | None = [] if output_hidden_states else None
    split = min(cache.split, n_layers)
    h = run_group(lm, 0, split, h, masks[:split], rotary[:split], pos, cache, cache_kw, states)
    h = run_group(lm, split, n_layers, h, masks[split:], rotary[split:], pos, cache, cache_kw, states)
    cache.advance(q)
    h = lm.norm(h)
    if states is not None:
        states.append(h)
    return h, (tuple(states) if states is not None else None)
