"""Two-stage token pruning attached to a stock ``LlavaForConditionalGeneration``.

``attach_pruner`` swaps the model's class for a thin subclass with the same name (so
``save_pretrained``, PEFT and ``isinstance`` see the stock model) whose ``forward``/``generate`` prune:

* **Stage 1** runs the vision tower once, scores patches against CLS, keeps a per-image head, projects
  only the kept patches, and rebuilds the LLM input with a shorter image run (left-padded; each
  token keeps its original position id, or they are renumbered: ``stage1.positions``).
* **Stage 2** runs the stock decoder layers in our own loop (``_prefill``; the language model's own
  ``forward`` is never called on the pruned path, so its class stays stock): at layer ``K`` it scores
  tokens with that layer's q/k projections, gathers the kept tokens (hidden states, rotary cos/sin,
  original position ids, padding) and builds a new mask for layers >= K. With a ``DynamicCache`` the
  two layer groups cache different lengths; decoding uses one mask per group.

Pruning disabled (or no ``pixel_values``) calls the stock ``forward``/``generate`` untouched.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache
from transformers.models.llava.modeling_llava import LlavaCausalLMOutputWithPast

from tpkit.pruning import PruningConfig
from tpkit.pruning.stage1 import cls_attention, cls_cosine, random_scores, select_patches
from tpkit.pruning.stage2 import apply_rope, redundancy, relevance, select_tokens

__all__ = [
    "attach_pruner",
    "detach_pruner",
    "set_pruning",
    "pruning_disabled",
    "last_stats",
    "stage1_scores",
    "pruned_lm_loss",
    "is_attached",
    "PrunedLlavaOutput",
]

_FLASH = ("flash_attention_2", "flash_attention_3")
_SUPPORTED_ATTN = ("eager", "sdpa", *_FLASH)


@dataclass
class PrunedLlavaOutput(LlavaCausalLMOutputWithPast):
    """Stock LLaVA output plus ``kept_index`` (B, T_out): original input index per position, -1 = pad."""

    kept_index: torch.LongTensor | None = None


# --------------------------------------------------------------------------------------------
# checks and plumbing


def _unwrap(model: nn.Module) -> nn.Module:
    """A PEFT wrapper -> the LLaVA inside it (attach works before or after ``get_peft_model``)."""
    seen = 0
    while hasattr(model, "get_base_model") and seen < 3:
        model = model.get_base_model()
        seen += 1
    return model


def _check_llava_like(model: nn.Module) -> None:
    name = type(model).__name__
    needed = [
        "model",
        "lm_head",
        "config",
        "model.vision_tower",
        "model.multi_modal_projector",
        "model.language_model",
        "model.language_model.layers",
        "model.language_model.embed_tokens",
        "model.language_model.norm",
        "model.language_model.rotary_emb",
        "config.image_token_id",
        "config.vision_config",
        "config.text_config",
    ]
    for path in needed:
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                raise ValueError(
                    f"{name} is not LLaVA-like: it has no '{path}' (expected a LlavaForConditionalGeneration "
                    "with vision_tower, multi_modal_projector, language_model and lm_head)"
                )
    layer = model.model.language_model.layers[0]
    for part in ("input_layernorm", "self_attn"):
        if not hasattr(layer, part):
            raise ValueError(f"{name} is not LLaVA-like: decoder layers have no '{part}'")
    for part in ("q_proj", "k_proj"):
        if not hasattr(layer.self_attn, part):
            raise ValueError(f"{name} is not LLaVA-like: attention has no '{part}'")


def _check_layer(model: nn.Module, cfg: PruningConfig) -> None:
    n_layers = len(model.model.language_model.layers)
    if cfg.stage2.enabled and not 0 <= cfg.stage2.layer < n_layers:
        raise ValueError(
            f"stage2.layer = {cfg.stage2.layer} is out of range: the language model has {n_layers} layers "
            f"(valid: 0..{n_layers - 1})"
        )
    impl = _attn_impl(model)
    if cfg.stage2.enabled and impl not in _SUPPORTED_ATTN:
        raise ValueError(
            f"attn_implementation {impl!r} is not supported with stage 2 (use one of {_SUPPORTED_ATTN})"
        )


def _attn_impl(model: nn.Module) -> str:
    return getattr(model.model.language_model.config, "_attn_implementation", None) or "eager"


def _cache_kwarg(layer: nn.Module) -> str:
    """transformers >= 5.2x names the decoder's cache kwarg ``cache``; 5.17 ``past_key_values``."""
    params = inspect.signature(type(layer).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _image_token_count(model: nn.Module) -> tuple[int, int]:
    """(placeholders per image, patches per image)."""
    vc = model.config.vision_config
    n_patches = (vc.image_size // vc.patch_size) ** 2
    full = getattr(model.config, "vision_feature_select_strategy", "default") == "full"
    return n_patches + int(full), n_patches


# --------------------------------------------------------------------------------------------
# masks


def _attn_mask(
    key_valid: torch.Tensor, q_len: int, impl: str, dtype: torch.dtype, no_padding: bool = False
) -> torch.Tensor | None:
    """Mask for queries that are the last ``q_len`` of the keys (B, Lk): causal by sequence order and
    padding. Positions may have gaps, so this never relies on position ids.

    eager: additive float (B, 1, q, Lk); sdpa: bool (B, 1, q, Lk); flash: the 2D key mask.
    A query always sees itself, so padded query rows stay finite.
    ``no_padding`` (the caller knows on the host that every key is valid): sdpa with ``q_len == Lk``
    gets None, so the attention runs with ``is_causal`` (flash/cuDNN kernels), as stock does.
    """
    if impl in _FLASH:
        return key_valid.to(torch.int32)
    lk = key_valid.shape[1]
    if impl == "sdpa" and no_padding and q_len == lk:
        return None
    q_idx = torch.arange(lk - q_len, lk, device=key_valid.device)  # (q,)
    k_idx = torch.arange(lk, device=key_valid.device)
    causal = k_idx[None, :] <= q_idx[:, None]  # (q, Lk)
    allowed = causal[None] & key_valid[:, None, :]
    allowed = allowed | (k_idx[None, :] == q_idx[:, None])[None]
    allowed = allowed[:, None]  # (B, 1, q, Lk)
    if impl == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )


def _compact(keep: torch.Tensor) -> torch.Tensor:
    """keep (B, T) bool -> index (B, T') of kept columns, left-padded with -1 (T' = max kept)."""
    return _compact_full(keep)[0]


def _compact_full(keep: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """:func:`_compact`, and whether no row is padded (every row keeps T'): one host sync for both."""
    b, t = keep.shape
    n = keep.sum(dim=1)  # (B,)
    t_out, t_min = torch.stack([n.max(), n.min()]).tolist() if b else (0, 0)
    dest = (t_out - n)[:, None] + keep.long().cumsum(dim=1) - 1  # (B, T)
    dest = torch.where(keep, dest, torch.full_like(dest, t_out))
    idx = torch.full((b, t_out + 1), -1, dtype=torch.long, device=keep.device)
    src = torch.arange(t, device=keep.device).expand(b, t)
    idx.scatter_(1, dest, torch.where(keep, src, torch.full_like(src, -1)))
    return idx[:, :t_out], t_min == t_out


def _gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, T, ...) gathered along dim 1 by idx (B, T') (-1 -> row 0, mask it yourself)."""
    i = idx.clamp(min=0)
    if x.dim() == 2:
        return x.gather(1, i)
    return x.gather(1, i.view(*i.shape, *([1] * (x.dim() - 2))).expand(*i.shape, *x.shape[2:]))


# --------------------------------------------------------------------------------------------
# the prefill


@dataclass
class _Prefill:
    """What one pruned prefill produced (tests use the intermediate tensors for references)."""

    hidden: torch.Tensor  # (B, T_out, D) final-normed hidden states
    kept_index: torch.Tensor  # (B, T_out) original input index, -1 = pad
    embeds1: torch.Tensor  # (B, T1, D) LLM input after stage 1
    index1: torch.Tensor  # (B, T1) original input index after stage 1, -1 = pad
    valid1: torch.Tensor  # (B, T1) bool
    pos1: torch.Tensor  # (B, T1) position ids after stage 1 (see Stage1Config.positions)
    keep2: torch.Tensor  # (B, T1) bool, kept by stage 2 (all valid if stage 2 is off)
    valid2: torch.Tensor  # (B, T_out) bool
    split: int  # layers < split cache T1 tokens, layers >= split cache T_out tokens
    stats: dict[str, Any]


class _PrunedLlavaMixin:
    """Overrides of ``forward`` and ``generate`` on the attached model (see module docstring)."""

    # ---- public overrides

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
                out = PrunedLlavaOutput(**out, kept_index=kept)
            return out
        for key in ("cache", "past_key_values"):
            if kwargs.get(key) is not None:
                raise ValueError(
                    "a pruned forward is a prefill: use model.generate for decoding with a cache"
                )
        pre = _prefill(
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
        logits = self.lm_head(hidden)
        loss = None
        labels = kwargs.get("labels")
        if labels is not None:
            loss = pruned_lm_loss(logits, labels, pre.kept_index[:, -logits.shape[1] :])
        return PrunedLlavaOutput(loss=loss, logits=logits, kept_index=pre.kept_index)

    @torch.no_grad()
    def generate(self, *args, **kwargs):
        names = ("input_ids",)
        for name, value in zip(names, args):
            kwargs[name] = value
        if not _active(self) or kwargs.get("pixel_values") is None:
            return super().generate(**kwargs)
        return _generate(self, **kwargs)


def _active(model: nn.Module) -> bool:
    cfg = getattr(model, "_tp_cfg", None)
    return cfg is not None and cfg.enabled and getattr(model, "_tp_off", 0) == 0


_CLASS_CACHE: dict[type, type] = {}


def _pruned_class(base: type) -> type:
    if base not in _CLASS_CACHE:
        # same name: save_pretrained writes config.architectures from the class name
        _CLASS_CACHE[base] = type(base.__name__, (_PrunedLlavaMixin, base), {"__module__": base.__module__})
    return _CLASS_CACHE[base]


# --------------------------------------------------------------------------------------------
# public API


def attach_pruner(model: nn.Module, config: PruningConfig | None = None) -> nn.Module:
    """Make ``model``'s forward and generate prune; returns the same object. Re-attaching sets ``config``."""
    outer = model
    model = _unwrap(model)
    _check_llava_like(model)
    config = config if config is not None else PruningConfig()
    config.validate()
    _check_layer(model, config)
    if not is_attached(model):
        model._tp_base_class = model.__class__
        model.__class__ = _pruned_class(model.__class__)
        model._tp_off = 0
        model._tp_stats = None
    model._tp_cfg = config
    return outer


def detach_pruner(model: nn.Module) -> nn.Module:
    """Stock class and behaviour back."""
    outer = model
    model = _unwrap(model)
    if is_attached(model):
        model.__class__ = model._tp_base_class
        for attr in ("_tp_base_class", "_tp_cfg", "_tp_off", "_tp_stats"):
            if attr in model.__dict__:
                delattr(model, attr)
    return outer


def is_attached(model: nn.Module) -> bool:
    return isinstance(_unwrap(model), _PrunedLlavaMixin)


def set_pruning(model: nn.Module, config: PruningConfig) -> None:
    """Change the config of an attached model."""
    inner = _unwrap(model)
    if not is_attached(inner):
        raise ValueError("set_pruning: no pruner attached (call attach_pruner first)")
    config.validate()
    _check_layer(inner, config)
    inner._tp_cfg = config


@contextlib.contextmanager
def pruning_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Stock behaviour inside the block (the teacher); nests; a no-op on an unattached model."""
    inner = _unwrap(model)
    if not is_attached(inner):
        yield model
        return
    inner._tp_off += 1
    try:
        yield model
    finally:
        inner._tp_off -= 1


def last_stats(model: nn.Module) -> dict[str, Any] | None:
    """Per-sample token accounting of the last pruned prefill (see CONTRACT.md), or None.

    The prefill keeps the kept sets as (B, N) masks on the device (``visual_keep_mask``,
    ``stage2_visual_keep_mask``); the per-sample index lists ``visual_keep`` / ``stage2_visual_keep``
    are built here on first request (three host syncs for the whole batch) and cached.
    """
    stats = getattr(_unwrap(model), "_tp_stats", None)
    if stats is not None and "visual_keep" not in stats:
        m1, m2 = stats["visual_keep_mask"], stats["stage2_visual_keep_mask"]  # (B, N) bool each
        counts = torch.stack([m1.sum(dim=1), m2.sum(dim=1)]).tolist()  # (2, B)
        stats["visual_keep"] = list(m1.nonzero()[:, 1].split(counts[0]))
        stats["stage2_visual_keep"] = list(m2.nonzero()[:, 1].split(counts[1]))
    return stats


def pruned_lm_loss(logits: torch.Tensor, labels: torch.Tensor, kept_index: torch.Tensor) -> torch.Tensor:
    """Mean CE of next-token targets after pruning: position j predicts ``labels[b, kept_index[b, j] + 1]``."""
    t = labels.shape[1]
    nxt = kept_index + 1
    ok = (kept_index >= 0) & (nxt < t)
    target = labels.gather(1, nxt.clamp(max=t - 1)).masked_fill(~ok, -100)
    return F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), ignore_index=-100)


# --------------------------------------------------------------------------------------------
# stage 1


def _validate_inputs(model, input_ids, pixel_values) -> tuple[torch.Tensor, torch.Tensor]:
    """Checks placeholders and pixel sizes; returns (image-token mask (B, T), run start (B,))."""
    vc = model.config.vision_config
    b = input_ids.shape[0]
    if pixel_values.dim() != 4 or pixel_values.shape[0] != b:
        raise ValueError(
            f"pixel_values must be (B={b}, C, H, W) with one image per sample, got {tuple(pixel_values.shape)}"
        )
    if tuple(pixel_values.shape[-2:]) != (vc.image_size, vc.image_size):
        raise ValueError(
            f"pixel_values are {pixel_values.shape[-2]}x{pixel_values.shape[-1]} but the vision tower expects "
            f"{vc.image_size}x{vc.image_size} (vision_config.image_size)"
        )
    n_tokens, _ = _image_token_count(model)
    tok = model.config.image_token_id
    img = input_ids == tok  # (B, T)
    start = img.long().argmax(dim=1)  # (B,)
    span = torch.arange(input_ids.shape[1], device=img.device)[None, :] - start[:, None]
    contiguous = (img == ((span >= 0) & (span < n_tokens))).all(dim=1)  # (B,)
    counts, contiguous = torch.stack([img.sum(dim=1), contiguous.long()]).tolist()  # one sync
    for i, c in enumerate(counts):
        if c == 0:
            raise ValueError(
                f"sample {i} has no image placeholder (image_token_id={tok}); the prompt must contain "
                f"{n_tokens} image tokens (the processor expands '<image>')"
            )
        if c != n_tokens:
            raise ValueError(
                f"sample {i} has {c} image placeholders (image_token_id={tok}) but one image gives {n_tokens} "
                "features; one image per sample is supported"
            )
    if not all(contiguous):
        raise ValueError("image placeholders must form one contiguous run per sample")
    return img, start


def _tower_layers(tower: nn.Module) -> nn.ModuleList:
    """Encoder layers of a CLIP/SigLIP tower (flat in transformers 5, nested under vision_model before)."""
    for root in (tower, getattr(tower, "vision_model", None)):
        enc = getattr(root, "encoder", None) if root is not None else None
        if enc is not None and hasattr(enc, "layers"):
            return enc.layers
    raise ValueError(f"stage1.score='cls_attn': cannot find the encoder layers of {type(tower).__name__}")


def _tower_states(model, pixel_values) -> tuple[torch.Tensor, ...]:
    """All hidden states of the vision tower (one run, as stock LLaVA does)."""
    tower = model.model.vision_tower
    dtype = next(tower.parameters()).dtype
    out = tower(pixel_values.to(dtype), output_hidden_states=True, return_dict=True)
    hs = out.hidden_states
    if hs is None:
        raise ValueError("the vision tower returned no hidden_states")
    return hs


def _hs(hs, i: int) -> torch.Tensor:
    """hidden_states[i], or a clear error when a caching wrapper replayed an ``output_hidden_states=<int>`` call."""
    if hs[i] is None:
        raise ValueError(f"the vision tower returned no hidden_states[{i}] (needed by stage 1)")
    return hs[i]


def _scores_from_states(model, hs, s1) -> torch.Tensor:
    """Stage-1 scores (B, P) per patch from the tower's hidden states."""
    layer = model.config.vision_feature_layer
    score_hidden = _hs(hs, layer if isinstance(layer, int) else layer[-1])
    with torch.no_grad():  # scores only pick indices; no graph needed
        if s1.score in ("cosine", "cosine_centered"):
            return cls_cosine(score_hidden, centered=s1.score == "cosine_centered")
        if s1.score == "cls_attn":
            return cls_attention(_hs(hs, -2), _tower_layers(model.model.vision_tower)[-1])
        return random_scores(score_hidden.shape[0], score_hidden.shape[1] - 1, s1.seed, score_hidden.device)


def stage1_scores(model: nn.Module, pixel_values: torch.Tensor, config: Any = None) -> torch.Tensor:
    """The stage-1 score of every patch, (B, P), exactly as the pruner computes it.

    ``config``: a ``PruningConfig`` or ``Stage1Config`` (default: the attached config's, else cosine).
    For overlays and premise studies; runs the vision tower once.
    """
    inner = _unwrap(model)
    if config is None:
        config = getattr(inner, "_tp_cfg", None) or PruningConfig()
    s1 = getattr(config, "stage1", config)
    with torch.no_grad():
        return _scores_from_states(inner, _tower_states(inner, pixel_values), s1)


def _stage1(model, pixel_values, cfg, stage1_keep):
    """Vision tower once; returns (projected kept features (sum k1, D), keep mask (B, N), k1 (B,), scores)."""
    inner = model.model
    mcfg = model.config
    hs = _tower_states(model, pixel_values)
    layer = mcfg.vision_feature_layer
    strategy = getattr(mcfg, "vision_feature_select_strategy", "default")
    feats = _hs(hs, layer) if isinstance(layer, int) else torch.cat([_hs(hs, i) for i in layer], dim=-1)
    if strategy == "default":
        feats = feats[:, 1:]
    b, n = feats.shape[:2]
    s1 = cfg.stage1
    scores = None
    if s1.enabled:
        scores = _scores_from_states(model, hs, s1)  # (B, P)
        full = scores
        if strategy == "full":  # the CLS feature is an image token too: always keep it
            full = torch.cat([torch.full_like(scores[:, :1], float("inf")), scores], dim=1)
        keep, k1 = select_patches(full, s1, stage1_keep)
    else:
        keep = torch.ones(b, n, dtype=torch.bool, device=feats.device)
        k1 = torch.full((b,), n, dtype=torch.long, device=feats.device)
    n_kept = int(keep.sum())  # the one host sync of stage 1
    if n_kept == keep.numel():
        projected = inner.multi_modal_projector(feats).flatten(0, 1)  # same call as stock
    else:  # feats[keep] without a second sync: kept (row-major) positions lead a stable sort
        rows = torch.sort((~keep.flatten()).to(torch.uint8), stable=True).indices[:n_kept]  # (sum k1,)
        projected = inner.multi_modal_projector(feats.flatten(0, 1).index_select(0, rows))  # (sum k1, D)
    return projected, keep, k1, scores


# --------------------------------------------------------------------------------------------
# the layer loop


def _layer_call(layer, h, mask, cos, sin, pos, cache, cache_kw):
    kw = {cache_kw: cache} if cache is not None else {}
    out = layer(
        h,
        attention_mask=mask,
        position_ids=pos,
        position_embeddings=(cos, sin),
        use_cache=cache is not None,
        **kw,
    )
    return out[0] if isinstance(out, tuple) else out


def _stage2_scores(layer, h, cos, sin, valid, qpos, qvalid, reduce="mean") -> torch.Tensor:
    """Relevance (B, T) of every token to the queries at ``qpos`` (B, Q), from the layer's own q/k."""
    attn = layer.self_attn
    x = layer.input_layernorm(h)  # (B, T, D)
    b, t, d = x.shape
    hd = attn.head_dim
    xq = _gather_rows(x, qpos)  # (B, Q, D)
    q = attn.q_proj(xq).view(b, qpos.shape[1], -1, hd)
    k = attn.k_proj(x).view(b, t, -1, hd)
    if hasattr(attn, "q_norm"):  # Qwen3-style q/k norms
        q, k = attn.q_norm(q), attn.k_norm(k)
    q = apply_rope(q.transpose(1, 2), _gather_rows(cos, qpos), _gather_rows(sin, qpos))  # (B, H, Q, hd)
    k = apply_rope(k.transpose(1, 2), cos, sin)  # (B, Hk, T, hd)
    return relevance(q, k, qpos, qvalid, valid, attn.scaling, reduce)


def _stage2_roles(ids1, valid1, ans1, image_token_id, k1, prune_text, query, prune_visual=True):
    """Protected tokens, droppable tokens and query positions on the stage-1 sequence."""
    b, t1 = ids1.shape
    ar = torch.arange(t1, device=ids1.device)[None, :]
    img = valid1 & (ids1 == image_token_id)
    start = img.long().argmax(dim=1)[:, None]  # (B, 1)
    end = start + k1[:, None]
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
    qmask = torch.where(
        qmask.any(dim=1, keepdim=True), qmask, last.expand(b, t1)
    )  # no instruction: last token
    qidx = _compact(qmask)  # (B, Q), -1 padded
    return always, droppable, qidx.clamp(min=0), qidx >= 0


def _prefill(
    model,
    input_ids,
    pixel_values,
    attention_mask,
    *,
    answer_mask=None,
    stage1_keep=None,
    stage2_keep=None,
    cache=None,
) -> _Prefill:
    cfg: PruningConfig = model._tp_cfg
    lm = model.model.language_model
    mcfg = model.config
    device = input_ids.device
    b, t = input_ids.shape
    am = (
        torch.ones_like(input_ids, dtype=torch.bool)
        if attention_mask is None
        else attention_mask.to(device=device).bool()
    )
    img, img_start = _validate_inputs(model, input_ids, pixel_values)  # (B, T), (B,)

    # ---- stage 1: the shorter LLM input
    projected, keep1, k1, scores1 = _stage1(model, pixel_values, cfg, stage1_keep)
    img_pos = img_start[:, None] + torch.arange(keep1.shape[1], device=device)[None, :]  # (B, N)
    keep_tok = am.scatter(1, img_pos, keep1 & am.gather(1, img_pos))  # no boolean indexing: no sync
    index1, full1 = _compact_full(keep_tok)  # (B, T1); full1: no padding
    valid1 = index1 >= 0
    pad_id = (
        mcfg.text_config.pad_token_id if getattr(mcfg.text_config, "pad_token_id", None) is not None else 0
    )
    ids1 = input_ids.gather(1, index1.clamp(min=0)).masked_fill(~valid1, pad_id)
    embeds = lm.embed_tokens(ids1)  # (B, T1, D)
    img1 = valid1 & (ids1 == mcfg.image_token_id)
    embeds = embeds.masked_scatter(img1[..., None], projected.to(embeds.dtype))
    if cfg.stage1.positions == "original":  # each kept token's position in the unpruned prompt
        dense_pos = (am.long().cumsum(dim=1) - 1).clamp(min=0)  # (B, T), as stock builds them
        pos1 = _gather_rows(dense_pos, index1).masked_fill(~valid1, 0)
    else:
        pos1 = (valid1.long().cumsum(dim=1) - 1).clamp(min=0)  # contiguous, pads 0
    if answer_mask is not None:
        ans1 = answer_mask.to(device).bool().gather(1, index1.clamp(min=0)) & valid1
    else:
        ans1 = torch.zeros_like(valid1)

    # ---- layers, with stage 2 at layer K
    impl = _attn_impl(model)
    n_layers = lm.config.num_hidden_layers
    layers = lm.layers[:n_layers]
    cache_kw = _cache_kwarg(layers[0])
    s2 = cfg.stage2
    split = s2.layer if s2.enabled else n_layers
    n_tokens, n_patches = _image_token_count(model)  # placeholders (a leading CLS with "full"), patches
    h = embeds
    cos, sin = lm.rotary_emb(h, position_ids=pos1)
    valid, pos, index = valid1, pos1, index1
    mask = _attn_mask(valid, h.shape[1], impl, h.dtype, no_padding=full1)
    keep2 = valid1
    for i, layer in enumerate(layers):
        if i == split:
            always, droppable, qpos, qvalid = _stage2_roles(
                ids1, valid1, ans1, mcfg.image_token_id, k1, s2.prune_text, s2.query, s2.prune_visual
            )
            sim = None
            with torch.no_grad():  # scores only pick indices
                scores = _stage2_scores(layer, h, cos, sin, valid, qpos, qvalid, s2.reduce)
                if s2.diversity > 0:  # each token's patch cell on the grid, -1 for text (and CLS)
                    cell = index1 - img_start[:, None] - (n_tokens - n_patches)
                    cell = torch.where(valid1 & (ids1 == mcfg.image_token_id) & (cell >= 0), cell, -1)
                    side = math.isqrt(n_patches)
                    sim = redundancy(layer.input_layernorm(h), cell, side, s2.diversity_radius)
                    patches = cell >= 0
            keep2 = select_tokens(
                scores, droppable, always, s2, stage2_keep, sim, patches if sim is not None else None
            )
            index2, full2 = _compact_full(keep2)  # (B, T2) into the stage-1 sequence
            valid = index2 >= 0
            h = _gather_rows(h, index2)
            cos, sin = _gather_rows(cos, index2), _gather_rows(sin, index2)
            pos = _gather_rows(pos1, index2)
            index = _gather_rows(index1, index2).masked_fill(~valid, -1)
            mask = _attn_mask(valid, h.shape[1], impl, h.dtype, no_padding=full2)
        h = _layer_call(layer, h, mask, cos, sin, pos, cache, cache_kw)
    h = lm.norm(h)

    # ---- token accounting
    n_dense = am.sum(dim=1)
    n1 = valid1.sum(dim=1)
    k2 = valid.sum(dim=1)
    tokens_seen = split * n1 + (n_layers - split) * k2
    patch_of = index - img_start[:, None]  # (B, T_out)
    is_patch = (index >= 0) & (patch_of >= 0) & (patch_of < n_tokens)
    keep12 = torch.zeros(b, n_tokens + 1, dtype=torch.bool, device=device).scatter(
        1, torch.where(is_patch, patch_of, n_tokens), is_patch
    )[:, :n_tokens]  # (B, N) patches kept by both stages
    stats = {
        "n_visual": torch.full((b,), keep1.shape[1], dtype=torch.long, device=device),
        "k1": k1,
        "n_prompt": n1,
        "k2": k2,
        "n_dense": n_dense,
        "token_layer_fraction": tokens_seen.double() / (n_layers * n_dense).double(),
        "visual_keep_mask": keep1,  # (B, N); last_stats adds the "visual_keep" index lists
        "stage1_scores": scores1,  # (B, P) or None when stage 1 is off
        "stage2_visual_keep_mask": keep12,  # (B, N); last_stats adds "stage2_visual_keep"
    }
    model._tp_stats = stats
    return _Prefill(h, index, embeds, index1, valid1, pos1, keep2 & valid1, valid, split, stats)


# --------------------------------------------------------------------------------------------
# generate


def _decode_step(model, token, pos, valid_a, valid_b, split, cache):
    """One cached step: token (B,), position (B,), key-valid masks of both layer groups incl. the new key."""
    lm = model.model.language_model
    impl = _attn_impl(model)
    layers = lm.layers[: lm.config.num_hidden_layers]
    cache_kw = _cache_kwarg(layers[0])
    h = lm.embed_tokens(token[:, None])  # (B, 1, D)
    pos = pos[:, None]
    cos, sin = lm.rotary_emb(h, position_ids=pos)
    mask_a = _attn_mask(valid_a, 1, impl, h.dtype)
    mask_b = _attn_mask(valid_b, 1, impl, h.dtype)
    for i, layer in enumerate(layers):
        h = _layer_call(layer, h, mask_a if i < split else mask_b, cos, sin, pos, cache, cache_kw)
    h = lm.norm(h)
    return model.lm_head(h[:, -1])  # (B, V)


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


def _generate(model, **kwargs):
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

    cache = DynamicCache(config=model.model.language_model.config)
    pre = _prefill(
        model,
        input_ids,
        pixel_values,
        attention_mask,
        stage1_keep=stage1_keep,
        stage2_keep=stage2_keep,
        cache=cache,
    )
    logits = model.lm_head(pre.hidden[:, -1])  # (B, V)
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
