"""Independent references for the Qwen and InternVL tests: the stock model's own LM input (embeddings
and position ids, read off a stock forward), and a slow full-sequence forward through the stock decoder
layers whose masks, built here from scratch, leave the dropped tokens out as keys. Positions are Qwen's
M-RoPE ids (3, B, T) or 1-D ids (B, T)."""

from __future__ import annotations

import torch

VISUAL_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "pixel_values_videos",
    "video_grid_thw",
    "second_per_grid_ts",
)


def model_inputs(batch: dict) -> dict:
    keys = ("input_ids", "attention_mask", "mm_token_type_ids", *VISUAL_KEYS)
    return {k: batch[k] for k in keys if k in batch}


def stock_lm_input(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs_embeds (B, T, D), position_ids (3, B, T)) that the stock model feeds its text model; a
    model that passes none (1-D positions) gets (B, T) ids from the attention mask, as ``generate``
    builds them."""
    seen = {}

    def grab(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"]
        seen["pos"] = kwargs["position_ids"]

    lm = model.model.language_model
    handle = lm.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        from tpkit.models import pruning_disabled

        with torch.no_grad(), pruning_disabled(model):
            model(**model_inputs(batch))
    finally:
        handle.remove()
    pos = seen["pos"]
    if pos is None:
        am = batch.get("attention_mask")
        am = torch.ones_like(batch["input_ids"]) if am is None else am
        return seen["embeds"], (am.long().cumsum(dim=1) - 1).clamp(min=0)
    if pos.shape[0] == 4:  # text positions first (packed layouts)
        pos = pos[1:]
    return seen["embeds"], pos


def _mask(keys: torch.Tensor, impl: str, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, T, T): a query sees the allowed keys (B, T) at or before it, and always itself."""
    t = keys.shape[1]
    allowed = (torch.ones(t, t, dtype=torch.bool).tril()[None] & keys[:, None, :]) | torch.eye(
        t, dtype=torch.bool
    )
    allowed = allowed[:, None]
    if impl == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)


def masked_logits(model, embeds, pos, keys_a, keys_b, split):
    """Logits (B, T, V) of the whole sequence through the stock layers: layers < ``split`` attend to the
    keys ``keys_a`` (B, T) bool, the rest to ``keys_b``; positions ``pos`` (3, B, T) or (B, T) feed the
    stock rotary embedding."""
    lm = model.model.language_model
    impl = lm.config._attn_implementation
    h = embeds
    cos, sin = lm.rotary_emb(h, position_ids=pos)
    mask_a, mask_b = _mask(keys_a, impl, h.dtype), _mask(keys_b, impl, h.dtype)
    for i, layer in enumerate(lm.layers):
        h = layer(h, attention_mask=mask_a if i < split else mask_b, position_embeddings=(cos, sin))
        h = h[0] if isinstance(h, tuple) else h
    return model.lm_head(lm.norm(h))


def kept_in_prompt(pre, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The kept sets of a pruned prefill in the unpruned prompt's frame: (after stage 1, after stage 2),
    each (B, T) bool."""
    b = pre.index1.shape[0]
    src = pre.index1.clamp(min=0)
    kept1 = torch.zeros(b, t, dtype=torch.bool).scatter(1, src, pre.valid1)
    kept2 = torch.zeros(b, t, dtype=torch.bool).scatter(1, src, pre.keep2 & pre.valid1)
    return kept1, kept2


def greedy_reference(model, embeds, pos, keys_a, keys_b, split, n_new):
    """Greedy ids (B, n_new) and each step's logits (B, n_new, V) of the masked full-sequence reference,
    re-run from scratch every step; new tokens take the prompt's largest position + 1, + 2, ... (on all
    three axes of M-RoPE ids)."""
    lm = model.model.language_model
    nxt = pos.amax(dim=-1) if pos.dim() == 2 else pos.amax(dim=(0, 2))  # (B,)
    out, logits = [], []
    for step in range(n_new):
        logits.append(masked_logits(model, embeds, pos, keys_a, keys_b, split)[:, -1])
        tok = logits[-1].argmax(-1)
        out.append(tok)
        embeds = torch.cat([embeds, lm.embed_tokens(tok[:, None])], dim=1)
        new = (
            (nxt + 1 + step)[:, None] if pos.dim() == 2 else (nxt + 1 + step)[None, :, None].expand(3, -1, 1)
        )
        pos = torch.cat([pos, new], dim=-1)
        one = torch.ones(tok.shape[0], 1, dtype=torch.bool)
        keys_a, keys_b = torch.cat([keys_a, one], 1), torch.cat([keys_b, one], 1)
    return torch.stack(out, dim=1), torch.stack(logits, dim=1)
