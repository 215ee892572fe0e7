"""The pruned prefill, shared by every family: stage-1 compaction, the decoder-layer loop with stage 2
at layer K, and the token accounting.

* **Stage 1**: the family runs its tower once and says which visual placeholders stay and what
  their LM embeddings are (:class:`tpkit.models.core.family.Visual`); the input is rebuilt shorter
  (left-padded; each token keeps its original position id, or they are renumbered:
  ``stage1.positions``).
* **Stage 2** runs the stock decoder layers in this module's loop (the language model's own
  ``forward`` is never called on the pruned path, so its class stays stock): at layer ``K`` it scores
  tokens with that layer's q/k projections, gathers the kept tokens (hidden states, rotary cos/sin,
  original position ids, padding, block ids, per-token additions) and builds new masks for layers
  >= K. With a cache the two layer groups cache different lengths.
* **Per layer**, the loop asks the family's :class:`tpkit.models.core.layers.LayerRule` for the
  layer's mask (causal, sliding window, bidirectional blocks, recurrent), its rotary table and what
  is added after it; each distinct mask and table is built once per group
  (:mod:`tpkit.models.core.layers`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tpkit.data.labels import IGNORE_INDEX, next_token_targets
from tpkit.models.core.family import llama_rotate
from tpkit.models.core.layers import LayerAdds, LayerRule, mask_plan, rotary_tables
from tpkit.models.core.masks import FLASH, compact, compact_full, gather_rows
from tpkit.models.core.sharded import gathered
from tpkit.models.core.state import state_of
from tpkit.pruning.budgets import token_layer_fraction
from tpkit.pruning.config import PruningConfig
from tpkit.pruning.stage2 import redundancy, relevance, select_tokens

__all__ = [
    "Prefill",
    "SUPPORTED_ATTN",
    "attn_impl",
    "cache_kwarg",
    "check_layer",
    "layer_call",
    "pruned_lm_loss",
    "prefill",
    "stage2_roles",
    "stage2_scores",
]

SUPPORTED_ATTN = ("eager", "sdpa", *FLASH)


def attn_impl(lm: nn.Module) -> str:
    return getattr(lm.config, "_attn_implementation", None) or "eager"


def check_layer(lm: nn.Module, cfg: PruningConfig) -> None:
    """ValueError when stage 2's layer or the attention implementation cannot work on ``lm``."""
    n_layers = len(lm.layers)
    if cfg.stage2.enabled and not 0 <= cfg.stage2.layer < n_layers:
        raise ValueError(
            f"stage2.layer = {cfg.stage2.layer} is out of range: the language model has {n_layers} layers "
            f"(valid: 0..{n_layers - 1})"
        )
    impl = attn_impl(lm)
    if cfg.stage2.enabled and impl not in SUPPORTED_ATTN:
        raise ValueError(
            f"attn_implementation {impl!r} is not supported with stage 2 (use one of {SUPPORTED_ATTN})"
        )


def cache_kwarg(layer: nn.Module) -> str:
    """transformers >= 5.2x names the decoder's cache kwarg ``cache``; 5.17 ``past_key_values``."""
    params = inspect.signature(type(layer).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def layer_call(layer, h, mask, cos, sin, pos, cache, cache_kw):
    kw = {cache_kw: cache} if cache is not None else {}
    out = layer(
        h,
        attention_mask=mask,
        position_ids=pos if pos.dim() == 2 else None,  # M-RoPE (R, B, T): none, as stock text models pass
        position_embeddings=(cos, sin),
        use_cache=cache is not None,
        **kw,
    )
    return out[0] if isinstance(out, tuple) else out


def run_group(
    lm: nn.Module,
    start: int,
    stop: int,
    h: torch.Tensor,
    masks: list,
    rotary: list,
    pos: torch.Tensor,
    cache,
    cache_kw: str,
    states: list | None = None,
    adds: LayerAdds | None = None,
) -> torch.Tensor:
    """Decoder layers ``start..stop-1`` of ``lm`` over h (B, T, D): layer ``i`` takes ``masks[i - start]``
    and ``rotary[i - start]`` ((cos, sin); both from :mod:`tpkit.models.core.layers`), then ``adds``
    adds its rows after it. ``states`` (a list) collects each layer's input. The unit that
    ``tpkit.models.core.compile`` compiles."""
    for i in range(start, stop):
        if states is not None:
            states.append(h)
        cos, sin = rotary[i - start]
        h = layer_call(lm.layers[i], h, masks[i - start], cos, sin, pos, cache, cache_kw)
        if adds is not None:
            h = adds.after(i, h)
    return h


def pruned_lm_loss(logits: torch.Tensor, labels: torch.Tensor, kept_index: torch.Tensor) -> torch.Tensor:
    """Mean CE of next-token targets after pruning (:func:`next_token_targets`)."""
    target = next_token_targets(labels, kept_index)
    return F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), ignore_index=IGNORE_INDEX)


@dataclass
class Prefill:
    """What one pruned prefill produced (tests use the intermediate tensors for references)."""

    hidden: torch.Tensor  # (B, T_out, D) final-normed hidden states
    kept_index: torch.Tensor  # (B, T_out) original input index, -1 = pad
    embeds1: torch.Tensor  # (B, T1, D) LLM input after stage 1
    index1: torch.Tensor  # (B, T1) original input index after stage 1, -1 = pad
    valid1: torch.Tensor  # (B, T1) bool
    pos1: torch.Tensor  # (B, T1) or (R, B, T1) position ids after stage 1 (see Stage1Config.positions)
    keep2: torch.Tensor  # (B, T1) bool, kept by stage 2 (all valid if stage 2 is off)
    valid2: torch.Tensor  # (B, T_out) bool
    split: int  # layers < split cache T1 tokens, layers >= split cache T_out tokens
    stats: dict[str, Any]
    hidden_states: tuple[torch.Tensor, ...] | None = None  # with output_hidden_states: each layer's input


def stage2_scores(
    layer: nn.Module,
    h: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    valid: torch.Tensor,
    qpos: torch.Tensor,
    qvalid: torch.Tensor,
    reduce: str = "mean",
    rotate: Callable | None = None,
) -> torch.Tensor:
    """Relevance (B, T) of every token to the queries at ``qpos`` (B, Q), from the layer's own q/k.

    ``rotate(q, k, cos, sin, qpos)`` applies the family's rotary embedding (default: Llama's).
    """
    attn = layer.self_attn
    x = layer.input_layernorm(h)  # (B, T, D)
    b, t, _ = x.shape
    hd = attn.head_dim
    xq = gather_rows(x, qpos)  # (B, Q, D)
    heads = attn.config.num_attention_heads
    # a query projection wider than heads x head_dim carries each head's output gate after its query
    # (Qwen3-Next / Qwen3.5: (B, Q, H, 2 hd) -> the first hd); otherwise the slice takes everything
    q = attn.q_proj(xq).view(b, qpos.shape[1], heads, -1)[..., :hd]
    k = attn.k_proj(x).view(b, t, -1, hd)
    if hasattr(attn, "q_norm"):  # Qwen3-style q/k norms
        q, k = attn.q_norm(q), attn.k_norm(k)
    rotate = rotate or llama_rotate
    q, k = rotate(q.transpose(1, 2), k.transpose(1, 2), cos, sin, qpos)  # (B, H, Q, hd), (B, Hk, T, hd)
    return relevance(q, k, qpos, qvalid, valid, attn.scaling, reduce)


def stage2_roles(img1, valid1, ans1, prune_text, query, prune_visual=True):
    """Protected tokens, droppable tokens and query positions on the stage-1 sequence.

    img1 (B, T1) bool: visual tokens; valid1 (B, T1) bool; ans1 (B, T1) bool: answer tokens.
    Droppable: the visual tokens (``prune_visual``) and the text before the first of them
    (``prune_text``). The instruction is the text after the last visual token, answers excluded;
    its tokens are the queries (``query`` "instruction"), or the last token (``query`` "last").
    Returns (always (B, T1), droppable (B, T1), query index (B, Q), query valid (B, Q)).
    """
    b, t1 = img1.shape
    ar = torch.arange(t1, device=img1.device)[None, :]
    img = valid1 & img1
    start = img.long().argmax(dim=1)[:, None]  # (B, 1) first visual token
    end = torch.where(img, ar, -1).amax(dim=1, keepdim=True) + 1  # (B, 1) after the last one
    first = ar == (t1 - valid1.sum(dim=1))[:, None]
    last = ar == t1 - 1
    nxt_ans = torch.zeros_like(ans1)
    nxt_ans[:, :-1] = ans1[:, 1:]
    instr = valid1 & (ar >= end) & ~ans1 & ~img
    always = valid1 & (first | last | instr | ans1 | nxt_ans)
    droppable = img.clone() if prune_visual else torch.zeros_like(img)
    if prune_text:
        droppable |= valid1 & (ar < start)
    droppable &= ~always
    always = valid1 & ~droppable  # everything that is not a candidate stays
    qmask = instr if query == "instruction" else last.expand(b, t1)
    qmask = torch.where(qmask.any(dim=1, keepdim=True), qmask, last.expand(b, t1))  # no instruction: last
    qidx = compact(qmask)  # (B, Q), -1 padded
    return always, droppable, qidx.clamp(min=0), qidx >= 0


def run_edges(img: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: the tokens just before and just after each run of ``img`` (B, T) tokens."""
    edge = torch.zeros_like(img)
    edge[:, :-1] |= img[:, 1:] & ~img[:, :-1]
    edge[:, 1:] |= img[:, :-1] & ~img[:, 1:]
    return edge


def take_positions(pos: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Position ids (B, T) or (R, B, T) at the columns ``index`` (B, T') (-1 -> 0)."""
    if pos.dim() == 2:
        return gather_rows(pos, index).masked_fill(index < 0, 0)
    return torch.stack([take_positions(p, index) for p in pos])


def _scatter_slots(base: torch.Tensor, slots: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``base`` (B, T) with ``values`` (B, N) written at the columns ``slots`` (B, N); slots -1 are
    padding and write nowhere (a scratch column takes them; no boolean indexing: no host sync)."""
    t = base.shape[1]
    out = torch.cat([base, base[:, :1]], dim=1)
    out = out.scatter(1, torch.where(slots >= 0, slots, t), values)
    return out[:, :t]


def prefill(
    model,
    input_ids,
    visual,
    attention_mask,
    *,
    answer_mask=None,
    stage1_keep=None,
    stage2_keep=None,
    cache=None,
    output_hidden_states: bool = False,
) -> Prefill:
    """The pruned prefill of an attached model (its family and config: :func:`state_of`).

    ``visual``: the family's visual inputs ({"pixel_values": ..., "image_sizes": ...}), or the pixel
    values alone. ``cache`` (a :class:`tpkit.models.core.cache.PrunedCache`, empty) receives the keys
    and values of both layer groups and the layout decoding needs. ``output_hidden_states``:
    ``Prefill.hidden_states`` holds each layer's input and the final normed output, as stock models
    return them (the layers from stage 2's on see fewer tokens).
    """
    state = state_of(model)
    cfg: PruningConfig = state.config
    family = state.family
    lm = family.language_model(model)
    device = input_ids.device
    b, t = input_ids.shape
    am = (
        torch.ones_like(input_ids, dtype=torch.bool)
        if attention_mask is None
        else attention_mask.to(device=device).bool()
    )
    if not isinstance(visual, dict):
        visual = {"pixel_values": visual}

    # ---- stage 1: the shorter LLM input
    vis = family.encode(model, input_ids, visual, cfg.stage1, stage1_keep)
    n_slots = vis.slots.shape[1]
    real = vis.slots >= 0  # (B, N): placeholder slots (the rest pad ragged samples)
    tgt = vis.slots.clamp(min=0)
    keep_tok = _scatter_slots(am, vis.slots, vis.keep & real & am.gather(1, tgt))  # (B, T)
    index1, full1 = compact_full(keep_tok, cfg.bucket)  # (B, T1); full1: no padding
    valid1 = index1 >= 0
    pad_id = getattr(lm.config, "pad_token_id", None)
    pad_id = 0 if pad_id is None else pad_id
    ids1 = input_ids.gather(1, index1.clamp(min=0)).masked_fill(~valid1, pad_id)
    placeholder_ids = family.placeholder_ids(model)
    placeholders = torch.tensor(placeholder_ids, device=device)
    img1 = valid1 & torch.isin(ids1, placeholders)
    if max(placeholder_ids) >= lm.embed_tokens.num_embeddings:  # out of the vocabulary: embed pad there
        embeds = lm.embed_tokens(ids1.masked_fill(img1, pad_id))  # (B, T1, D), rows replaced below
    else:
        embeds = lm.embed_tokens(ids1)  # (B, T1, D)
    embeds = embeds.masked_scatter(img1[..., None], vis.projected.to(embeds.dtype))
    dense_pos = family.position_ids(model, input_ids, am, visual)  # (B, T) or (R, B, T), as stock
    if cfg.stage1.positions == "original":  # each kept token's position in the unpruned prompt
        pos1 = take_positions(dense_pos, index1)
    elif dense_pos.dim() == 2:
        pos1 = (valid1.long().cumsum(dim=1) - 1).clamp(min=0)  # contiguous, pads 0
    else:
        raise ValueError(
            f"{type(model).__name__} has multi-axis (M-RoPE) positions: stage1.positions must be 'original'"
        )
    if answer_mask is not None:
        ans1 = answer_mask.to(device).bool().gather(1, index1.clamp(min=0)) & valid1
    else:
        ans1 = torch.zeros_like(valid1)
    # each input position's placeholder slot (0..N-1), -1 for text
    slot_of = _scatter_slots(
        torch.full_like(input_ids, -1), vis.slots, torch.arange(n_slots, device=device).expand(b, -1)
    )

    # ---- layers, with stage 2 at layer K; each layer called as its rule says (core/layers.py)
    impl = attn_impl(lm)
    n_layers = lm.config.num_hidden_layers
    layers = lm.layers[:n_layers]
    rules: tuple[LayerRule, ...] = family.layer_rules(model)
    cache_kw = cache_kwarg(layers[0])
    s2 = cfg.stage2
    split = s2.layer if s2.enabled else n_layers
    blocks0 = family.token_blocks(model, input_ids, visual) if any(r.blocks for r in rules) else None
    blocks1 = None if blocks0 is None else gather_rows(blocks0.to(device), index1).masked_fill(~valid1, -1)
    adds = None if not vis.after_layer else LayerAdds.from_visual(vis.after_layer, img1)
    # 1-D positions lie in 0..t-1 (the unpruned prompt's, from its attention mask): no query is more
    # than t - 1 positions after a key, so a window wider than that binds nothing (known on the host)
    span = t - 1
    h = embeds
    tables: dict = {}  # the stage-1 rotary tables, also stage 2's scoring layer's
    rotary = rotary_tables(lm, h, pos1, rules[:split], tables)
    valid, pos, index = valid1, pos1, index1
    masks = mask_plan(rules[:split], valid, h.shape[1], impl, h.dtype, no_padding=full1, positions=pos1,
                      blocks=blocks1, span=span)  # fmt: skip
    keep2, full = valid1, full1
    states: list[torch.Tensor] | None = [] if output_hidden_states else None
    run = (state.compiled or {}).get("group", run_group)
    h = run(lm, 0, split, h, masks, rotary, pos, cache, cache_kw, states, adds)
    if split < n_layers:  # stage 2 at layer K = split, scored with that layer's own q/k
        layer = layers[split]
        always, droppable, qpos, qvalid = stage2_roles(
            img1, valid1, ans1, s2.prune_text, s2.query, s2.prune_visual
        )
        if family.protect_run_edges:
            edge = run_edges(img1) & valid1
            always, droppable = always | edge, droppable & ~edge
        sim = patches = None
        cos, sin = rotary_tables(lm, h, pos1, rules[split : split + 1], tables)[0]
        # scores only pick indices; a sharded layer K stays gathered for its own forward below
        with torch.no_grad(), gathered(layer, for_forward=True):
            scores = stage2_scores(layer, h, cos, sin, valid, qpos, qvalid, s2.reduce, family.rotate)
            if s2.diversity > 0:  # each stage-1 token's (view, row, col), view -1 for text (and CLS)
                slot1 = gather_rows(slot_of, index1)
                coords = vis.coords.gather(1, slot1.clamp(min=0)[..., None].expand(-1, -1, 3))
                coords[..., 0] = torch.where(img1 & (slot1 >= 0), coords[..., 0], -1)
                sim = redundancy(layer.input_layernorm(h), coords, s2.diversity_radius)
                patches = coords[..., 0] >= 0
        keep2 = select_tokens(scores, droppable, always, s2, stage2_keep, sim, patches)
        index2, full = compact_full(keep2, cfg.bucket)  # (B, T2) into the stage-1 sequence
        valid = index2 >= 0
        h = gather_rows(h, index2)
        pos = take_positions(pos1, index2)
        rotary = rotary_tables(lm, h, pos, rules[split:])  # the kept tokens' own (the same values)
        index = gather_rows(index1, index2).masked_fill(~valid, -1)
        blocks2 = None if blocks1 is None else gather_rows(blocks1, index2).masked_fill(~valid, -1)
        adds = None if adds is None else adds.take(index2)
        masks = mask_plan(rules[split:], valid, h.shape[1], impl, h.dtype, no_padding=full, positions=pos,
                          blocks=blocks2, span=span)  # fmt: skip
        h = run(lm, split, n_layers, h, masks, rotary, pos, cache, cache_kw, states, adds)
    h = lm.norm(h)
    if states is not None:
        states.append(h)
    if cache is not None:  # decoding continues after each row's last prompt position
        last = pos1 if pos1.dim() == 2 else pos1.amax(dim=0)
        cache.start(
            split, valid1, valid, last.max(dim=1).values + 1, (not full1, not full), rules, (pos1, pos), span
        )

    # ---- token accounting
    n_dense = am.sum(dim=1)
    n1 = valid1.sum(dim=1)
    k2 = valid.sum(dim=1)
    slot = torch.where(index >= 0, gather_rows(slot_of, index), -1)  # (B, T_out)
    keep12 = torch.zeros(b, n_slots + 1, dtype=torch.bool, device=device).scatter(
        1, torch.where(slot >= 0, slot, n_slots), slot >= 0
    )[:, :n_slots]  # (B, N) placeholders kept by both stages
    stats = {
        "n_visual": real.sum(dim=1),
        "k1": vis.k1,
        "n_prompt": n1,
        "k2": k2,
        "n_dense": n_dense,
        "token_layer_fraction": token_layer_fraction(n_dense, n1, k2, n_layers, split),
        "visual_keep_mask": vis.keep,  # (B, N); last_stats adds the "visual_keep" index lists
        "stage1_scores": vis.scores,  # the family's scores, or None when stage 1 is off
        "stage2_visual_keep_mask": keep12,  # (B, N); last_stats adds "stage2_visual_keep"
    }
    state.stats = stats
    hidden_states = tuple(states) if states is not None else None
    return Prefill(h, index, embeds, index1, valid1, pos1, keep2 & valid1, valid, split, stats, hidden_states)
