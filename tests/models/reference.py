"""Independent masked references for every family: the stock model's own LM input (embeddings and
position ids, read off a stock forward) and a slow full-sequence forward through the stock decoder
layers whose masks, built here from scratch, leave the dropped tokens out as keys.

Each layer gets its own rule as transformers' ``masking_utils`` defines it, in the unpruned prompt's
sequence slots (left padding: slot distance = position distance): causal (``causal_mask_function``),
a sliding window where the config's ``layer_types`` says so (``sliding_window_overlay``: keys at
slots > q - w), bidirectional image blocks (``blockwise_overlay``: a query also sees every key of its
own block), composed as Gemma 3 composes them, AND(window, OR(causal, block)); a query always sees
itself (its row stays finite when it is dropped). Rotary tables per layer type where the rotary
embedding takes one (Gemma 3). Per-token features that stock adds after a layer (Qwen3-VL's DeepStack,
``adds``) are added to every row as stock adds them: a dropped token's rows reach no kept token, since
no kept token attends to it.

A recurrent layer (linear attention, no keys) cannot drop a token by masking: a zeroed input still
decays its state and shifts its short convolution's window. For hybrid decoders (Qwen3.5) the
reference is :func:`compact_logits`: each sample alone, the stock layers run on its kept tokens only
(stage 1's before ``split``, stage 2's from it on) at their original positions, attention layers
causal over them, recurrent layers over them in order. On a decoder of attention layers the two
references agree (tested on Qwen3-VL). Nothing here calls tpkit's masks or layer rules.
"""

from __future__ import annotations

import inspect

import torch


def language_model(model):
    return model.model.language_model


def stock_lm_input(model, inputs: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(inputs_embeds (B, T, D), position_ids as the stock model passes them, or None) that the stock
    model feeds its language model for ``inputs`` (run with pruning disabled)."""
    from tpkit.models import pruning_disabled

    seen = {}

    def grab(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"]
        seen["pos"] = kwargs.get("position_ids")

    handle = language_model(model).register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad(), pruning_disabled(model):
            model(**inputs)
    finally:
        handle.remove()
    return seen["embeds"], seen["pos"]


def stock_layer_adds(model, inputs: dict) -> dict[int, torch.Tensor] | None:
    """{decoder layer i: (B, T, D)} what stock adds to the hidden states after layer i (Qwen3-VL's
    DeepStack features, scattered into the visual positions as ``_deepstack_process`` adds them), read
    off a stock forward of ``inputs`` (pruning disabled); None when the model adds nothing."""
    from tpkit.models import pruning_disabled

    seen = {}

    def grab(module, args, kwargs):
        seen["mask"] = kwargs.get("visual_pos_masks")
        seen["embeds"] = kwargs.get("deepstack_visual_embeds")
        seen["shape"] = kwargs["inputs_embeds"].shape

    handle = language_model(model).register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad(), pruning_disabled(model):
            model(**inputs)
    finally:
        handle.remove()
    if not seen.get("embeds"):
        return None
    zeros = torch.zeros(seen["shape"])
    return {i: zeros.masked_scatter(seen["mask"][..., None], e) for i, e in enumerate(seen["embeds"])}


def image_blocks(token_type_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) long: the index of the run of image tokens (type 1) each token is in, -1 for others."""
    img = token_type_ids == 1
    start = img.clone()
    start[:, 1:] &= ~img[:, :-1]
    return torch.where(img, start.long().cumsum(dim=1) - 1, -1)


RECURRENT_TYPES = ("linear_attention", "conv", "mamba")


def layer_kinds(model) -> list[tuple[str, int | None]]:
    """(layer type, window or None) of each decoder layer, from the text config (recurrent types:
    :data:`RECURRENT_TYPES`)."""
    cfg = language_model(model).config
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None)
    if types is None:  # Mistral: every layer slides when sliding_window is set
        types = ["sliding_attention" if window is not None else "full_attention"] * cfg.num_hidden_layers
    return [(t, window if t == "sliding_attention" else None) for t in types]


def reference_mask(
    keys: torch.Tensor,
    impl: str,
    dtype: torch.dtype,
    window: int | None = None,
    blocks: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, 1, T, T) over a whole sequence: a query sees the allowed keys (B, T) at or before it (or in
    its own block), within ``window`` slots, and always itself."""
    t = keys.shape[1]
    q = torch.arange(t)[:, None]
    k = torch.arange(t)[None, :]
    seen = (k <= q)[None]
    if blocks is not None:
        seen = seen | ((blocks[:, :, None] == blocks[:, None, :]) & (blocks[:, :, None] >= 0))
    if window is not None:
        seen = seen & (k > q - window)[None]
    allowed = ((seen & keys[:, None, :]) | (k == q)[None])[:, None]
    if impl == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)


def masked_logits(model, embeds, pos, keys_a, keys_b, split, blocks=None, adds=None):
    """Logits (B, T, V) of the whole sequence through the stock layers: layers < ``split`` attend to the
    keys ``keys_a`` (B, T) bool, the rest to ``keys_b``, each under its own type's rule; ``pos`` (B, T)
    or (R, B, T) feeds the stock rotary embedding; ``blocks`` (B, T) long image blocks, or None;
    ``adds`` {layer: (B, T, D)} added after that layer, or None. Attention layers only: a recurrent
    layer raises (:func:`compact_logits` is its reference)."""
    lm = language_model(model)
    impl = lm.config._attn_implementation
    h = embeds
    per_type = "layer_type" in inspect.signature(lm.rotary_emb.forward).parameters
    rotary, masks = {}, {}
    for i, (layer, (kind, window)) in enumerate(zip(lm.layers, layer_kinds(model))):
        if kind in RECURRENT_TYPES:
            raise ValueError(
                f"layer {i} is {kind!r}: masking cannot drop a token from it; use compact_logits"
            )
        keys = keys_a if i < split else keys_b
        if (kind, i < split) not in masks:
            masks[kind, i < split] = reference_mask(keys, impl, h.dtype, window, blocks)
        if kind not in rotary:
            rotary[kind] = lm.rotary_emb(h, pos, kind) if per_type else lm.rotary_emb(h, position_ids=pos)
        h = layer(h, attention_mask=masks[kind, i < split], position_embeddings=rotary[kind])
        h = h[0] if isinstance(h, tuple) else h
        if adds is not None and i in adds:
            h = h + adds[i].to(h.dtype)
    return model.lm_head(lm.norm(h))


def compact_logits(model, embeds, pos, keys_a, keys_b, split, adds=None) -> list[torch.Tensor]:
    """Per sample b, the logits (n_b, V) of its stage-2 tokens (``keys_b[b]``, in order), each sample run
    alone through the stock layers on its kept tokens only: layers < ``split`` on the ``keys_a[b]``
    tokens, the rest on the ``keys_b[b]`` ones (``keys_b`` within ``keys_a``), at their positions in
    ``pos`` (B, T) or (R, B, T); attention layers causal over them (no padding: a 2-D all-valid mask
    built here), recurrent layers given no mask; ``adds`` {layer: (B, T, D)} added after that layer
    to the rows of the tokens present there. Full-attention and recurrent layers only."""
    lm = language_model(model)
    impl = lm.config._attn_implementation
    kinds = layer_kinds(model)
    if any(window is not None for _, window in kinds):
        raise ValueError("compact_logits runs full-attention and recurrent layers only (no sliding windows)")
    out = []
    for b in range(embeds.shape[0]):
        idx = keys_a[b].nonzero()[:, 0]  # (n1,) the stage-1 tokens
        h = embeds[b : b + 1, idx]
        for i, (layer, (kind, _)) in enumerate(zip(lm.layers, kinds)):
            if i == split or i == 0:
                if i == split:  # stage 2: keep the keys_b tokens among those present
                    keep = keys_b[b, idx]
                    idx, h = idx[keep], h[:, keep]
                p = pos[:, b : b + 1, idx] if pos.dim() == 3 else pos[b : b + 1, idx]
                rotary = lm.rotary_emb(h, position_ids=p)
                causal = reference_mask(torch.ones(1, idx.numel(), dtype=torch.bool), impl, h.dtype)
            mask = None if kind in RECURRENT_TYPES else causal
            h = layer(h, attention_mask=mask, position_embeddings=rotary)
            h = h[0] if isinstance(h, tuple) else h
            if adds is not None and i in adds:
                h = h + adds[i][b : b + 1, idx].to(h.dtype)
        out.append(model.lm_head(lm.norm(h))[0])
    return out


def compact_greedy(model, embeds, pos, keys_a, keys_b, split, n_new, adds=None):
    """Greedy ids (B, n_new) and each step's logits (B, n_new, V) of :func:`compact_logits`, re-run from
    scratch every step; new tokens join both token sets at the prompt's largest position + 1, + 2, ...
    (on every axis of multi-axis positions) and receive no additions."""
    lm = language_model(model)
    out, logits = [], []
    for _ in range(n_new):
        logits.append(
            torch.stack([x[-1] for x in compact_logits(model, embeds, pos, keys_a, keys_b, split, adds)])
        )
        tok = logits[-1].argmax(-1)
        out.append(tok)
        embeds, pos, keys_a, keys_b, adds = _append(lm, embeds, pos, keys_a, keys_b, adds, tok)
    return torch.stack(out, dim=1), torch.stack(logits, dim=1)


def _append(lm, embeds, pos, keys_a, keys_b, adds, tok):
    """The sequence with the new tokens ``tok`` (B,) appended: embedded, at the largest position so far
    + 1 on every axis, kept in both sets, no additions."""
    nxt = (pos.amax(dim=-1) if pos.dim() == 2 else pos.amax(dim=(0, 2))) + 1  # (B,)
    embeds = torch.cat([embeds, lm.embed_tokens(tok[:, None])], dim=1)
    new = nxt[:, None]  # (B, 1)
    pos = torch.cat([pos, new if pos.dim() == 2 else new[None].expand(pos.shape[0], -1, 1)], dim=-1)
    one = torch.ones(tok.shape[0], 1, dtype=torch.bool)
    keys_a, keys_b = torch.cat([keys_a, one], 1), torch.cat([keys_b, one], 1)
    if adds is not None:
        adds = {i: torch.cat([a, a.new_zeros(a.shape[0], 1, a.shape[2])], 1) for i, a in adds.items()}
    return embeds, pos, keys_a, keys_b, adds


def kept_in_prompt(pre, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The kept sets of a pruned prefill in the unpruned prompt's frame: (after stage 1, after stage 2),
    each (B, T) bool."""
    b = pre.index1.shape[0]
    src = pre.index1.clamp(min=0)
    kept1 = torch.zeros(b, t, dtype=torch.bool).scatter(1, src, pre.valid1)
    kept2 = torch.zeros(b, t, dtype=torch.bool).scatter(1, src, pre.keep2 & pre.valid1)
    return kept1, kept2


def greedy_reference(model, embeds, pos, keys_a, keys_b, split, n_new, blocks=None, adds=None):
    """Greedy ids (B, n_new) and each step's logits (B, n_new, V) of the masked full-sequence reference,
    re-run from scratch every step; new tokens take the prompt's largest position + 1, + 2, ... (on
    every axis of multi-axis positions), are in no block and receive no additions."""
    lm = language_model(model)
    out, logits = [], []
    for _ in range(n_new):
        logits.append(masked_logits(model, embeds, pos, keys_a, keys_b, split, blocks, adds)[:, -1])
        tok = logits[-1].argmax(-1)
        out.append(tok)
        embeds, pos, keys_a, keys_b, adds = _append(lm, embeds, pos, keys_a, keys_b, adds, tok)
        if blocks is not None:
            blocks = torch.cat([blocks, torch.full_like(blocks[:, :1], -1)], 1)
    return torch.stack(out, dim=1), torch.stack(logits, dim=1)
