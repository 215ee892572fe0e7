"""Generation after a pruned prefill: the two layer groups cache different lengths, so each decoding
step attends with one key mask per group."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from tpkit.models.core.masks import attn_mask
from tpkit.models.core.prefill import attn_impl, cache_kwarg, layer_call, prefill

__all__ = ["generate"]


def _decode_step(model, token, pos, valid_a, valid_b, split, cache):
    """One cached step: token (B,), position (B,), key-valid masks of both layer groups incl. the new key."""
    lm = model._tp_family.language_model(model)
    impl = attn_impl(lm)
    layers = lm.layers[: lm.config.num_hidden_layers]
    cache_kw = cache_kwarg(layers[0])
    h = lm.embed_tokens(token[:, None])  # (B, 1, D)
    pos = pos[:, None]
    cos, sin = lm.rotary_emb(h, position_ids=pos)
    mask_a = attn_mask(valid_a, 1, impl, h.dtype)
    mask_b = attn_mask(valid_b, 1, impl, h.dtype)
    for i, layer in enumerate(layers):
        h = layer_call(layer, h, mask_a if i < split else mask_b, cos, sin, pos, cache, cache_kw)
    h = lm.norm(h)
    return model._tp_family.lm_head(model)(h[:, -1])  # (B, V)


def _ids(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.flatten().tolist()]
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [int(value)]


def _next_token(logits, do_sample, temperature, top_k, top_p, generator):
    if not do_sample:
        return logits.argmax(dim=-1)
    logits = logits.float()
    if temperature is not None and temperature != 1.0:
        logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(int(top_k), logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_l, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_l.softmax(dim=-1).cumsum(dim=-1)
        drop = cum - sorted_l.softmax(dim=-1) > top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)[:, 0]


_GEN_IGNORED = {"use_cache", "synced_gpus"}


def generate(model, **kwargs):
    """Greedy or sampled generation after a pruned prefill; returns prompt + new token ids."""
    input_ids = kwargs.pop("input_ids")
    pixel_values = kwargs.pop("pixel_values")
    attention_mask = kwargs.pop("attention_mask", None)
    gc = kwargs.pop("generation_config", None) or model.generation_config
    opt = {k: kwargs.pop(k, getattr(gc, k, None)) for k in ("max_new_tokens", "max_length", "do_sample")}
    opt.update(
        {k: kwargs.pop(k, getattr(gc, k, None)) for k in ("temperature", "top_k", "top_p", "num_beams")}
    )
    eos = _ids(kwargs.pop("eos_token_id", gc.eos_token_id))
    pad = kwargs.pop("pad_token_id", gc.pad_token_id)
    generator = kwargs.pop("generator", None)
    stage1_keep = kwargs.pop("stage1_keep", None)
    stage2_keep = kwargs.pop("stage2_keep", None)
    for k in _GEN_IGNORED:
        kwargs.pop(k, None)
    for k in ("return_dict_in_generate", "output_scores", "output_logits", "output_attentions"):
        if kwargs.pop(k, False):
            raise ValueError(f"pruned generate returns the token ids only ({k}=True is not supported)")
    if kwargs:
        raise ValueError(f"pruned generate does not support: {sorted(kwargs)}")
    if (opt["num_beams"] or 1) > 1:
        raise ValueError("pruned generate supports greedy and sampling only (num_beams=1)")
    b, t = input_ids.shape
    max_new = opt["max_new_tokens"]
    if max_new is None:
        max_new = max(0, (opt["max_length"] or 20) - t)
    if pad is None:
        pad = eos[0] if eos else 0
    pad = int(pad[0] if isinstance(pad, (list, tuple)) else pad)

    cache = DynamicCache(config=model._tp_family.language_model(model).config)
    pre = prefill(
        model,
        input_ids,
        pixel_values,
        attention_mask,
        stage1_keep=stage1_keep,
        stage2_keep=stage2_keep,
        cache=cache,
    )
    logits = model._tp_family.lm_head(model)(pre.hidden[:, -1])  # (B, V)
    valid_a, valid_b = pre.valid1, pre.valid2
    pos = pre.pos1.max(dim=1).values + 1  # (B,) next position: after the last prompt token's
    done = torch.zeros(b, dtype=torch.bool, device=input_ids.device)
    eos_t = torch.tensor(eos, device=input_ids.device, dtype=torch.long)
    new = []
    for step in range(max_new):
        tok = _next_token(
            logits, bool(opt["do_sample"]), opt["temperature"], opt["top_k"], opt["top_p"], generator
        )
        tok = torch.where(done, torch.full_like(tok, pad), tok)
        new.append(tok)
        if eos:
            done = done | torch.isin(tok, eos_t)
        if bool(done.all()) or step == max_new - 1:
            break
        one = torch.ones(b, 1, dtype=torch.bool, device=tok.device)
        valid_a = torch.cat([valid_a, one], dim=1)
        valid_b = torch.cat([valid_b, one], dim=1)
        logits = _decode_step(model, tok, pos, valid_a, valid_b, pre.split, cache)
        pos = pos + 1
    if not new:
        return input_ids
    return torch.cat([input_ids, torch.stack(new, dim=1).to(input_ids.dtype)], dim=1)
