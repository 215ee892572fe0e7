"""Stage 1: score the vision tower's patches against a global summary and keep the head of the sorted
curve.

The summary is the CLS token where the tower has one (CLIP: ``cosine``, ``cosine_centered``,
``cls_attn``). Towers without a CLS token (SigLIP, Qwen's ViT) score against a summary built from the
patches themselves: ``mean_distance`` (1 - the cosine to the image's mean patch at the scoring layer:
the unusual patches first), ``cosine_mean`` (that cosine) or ``attn_received`` (the attention each
patch receives from all patches, from the layer's q/k).

Pure torch. The vision-tower call and the projection of kept patches live in
:mod:`tpkit.models` (each family's tower); this module turns hidden states into per-image kept sets.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from tpkit.pruning.config import CLS_SCORES, STAGE1_SCORES, Stage1Config
from tpkit.pruning.knee import head_count
from tpkit.pruning.stage2 import diverse_order, redundancy


def cls_cosine(hidden: torch.Tensor, centered: bool = False) -> torch.Tensor:
    """cos(CLS, patch_i) from tower hidden states (B, 1 + P, D) -> (B, P).

    ``centered``: subtract the mean patch from CLS and from every patch first.
    """
    h = hidden.float()
    cls, patches = h[:, :1], h[:, 1:]
    if centered:
        mean = patches.mean(dim=1, keepdim=True)
        cls, patches = cls - mean, patches - mean
    return F.cosine_similarity(patches, cls, dim=-1, eps=1e-8)


def _encoder_qk(
    layer_input: torch.Tensor, layer: torch.nn.Module, n_queries: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Queries (of the first ``n_queries`` tokens; None: all) and keys (B, H, T, hd) of a ViT encoder
    layer for its input, and its scale: CLIP/SigLIP (``layer_norm1``, ``self_attn.{q_proj, k_proj}``)
    or InternViT (``layernorm_before``, ``attention.{q_proj, k_proj}``, whose ``q_norm``/``k_norm``
    normalise the projections over the full width before the heads are split)."""
    clip = hasattr(layer, "self_attn")
    attn = layer.self_attn if clip else layer.attention
    x = (layer.layer_norm1 if clip else layer.layernorm_before)(layer_input)
    b, t, d = x.shape
    heads = attn.num_heads
    hd = getattr(attn, "head_dim", d // heads)
    xq = x if n_queries is None else x[:, :n_queries]
    q, k = attn.q_proj(xq), attn.k_proj(x)
    if not clip:
        q, k = attn.q_norm(q), attn.k_norm(k)
    q = q.view(b, xq.shape[1], heads, hd).transpose(1, 2)
    k = k.view(b, t, heads, hd).transpose(1, 2)
    return q, k, getattr(attn, "scale", hd**-0.5)


def cls_attention(layer_input: torch.Tensor, layer: torch.nn.Module) -> torch.Tensor:
    """CLS row of a ViT encoder layer's self-attention (CLIP, InternViT), averaged over heads -> (B, P).

    ``layer_input`` (B, 1 + P, D) is the layer's input (hidden_states[-2] for the last layer);
    ``layer`` is read as :func:`_encoder_qk` reads it. Computed from q/k here because
    sdpa attention returns no weights. Only the CLS query is formed: O(P) not O(P^2).
    """
    q, k, scale = _encoder_qk(layer_input, layer, n_queries=1)  # (B, H, 1, hd), (B, H, 1+P, hd)
    w = torch.softmax((q.float() @ k.float().transpose(-1, -2)) * scale, dim=-1)  # (B, H, 1, 1+P)
    return w.mean(dim=1)[:, 0, 1:]


def mean_cosine(patches: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """cos(mean patch, patch_i): patches (B, P, D) -> (B, P); ``valid`` (B, P) bool leaves padding
    out of the mean (its scores are NaN). The CLS-less stand-in for ``cls_cosine``."""
    h = patches.float()
    if valid is None:
        mean = h.mean(dim=1, keepdim=True)
    else:
        w = valid[..., None].to(h.dtype)
        mean = (h * w).sum(dim=1, keepdim=True) / w.sum(dim=1, keepdim=True).clamp_min(1.0)
    s = F.cosine_similarity(h, mean, dim=-1, eps=1e-8)
    return s if valid is None else s.masked_fill(~valid, float("nan"))


def attention_received(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    valid: torch.Tensor | None = None,
    chunk: int = 1024,
) -> torch.Tensor:
    """Mean attention each key receives: q, k (B, H, P, d) -> (B, P), softmax over the (valid) keys of
    every (valid) query, averaged over heads and queries. Queries go in chunks of ``chunk`` so memory
    stays O(chunk * P) per head, and q/k come from the layer's own projections, so sdpa towers work.
    Padding keys (``valid`` False) receive NaN."""
    b, h, p, _ = q.shape
    kf = k.float()
    total = torch.zeros(b, h, p, device=q.device, dtype=torch.float32)
    for i in range(0, p, chunk):
        logits = (q[:, :, i : i + chunk].float() @ kf.transpose(-1, -2)) * scale  # (B, H, c, P)
        if valid is not None:
            logits = logits.masked_fill(~valid[:, None, None, :], float("-inf"))
            w = torch.softmax(logits, dim=-1) * valid[:, None, i : i + chunk, None]
        else:
            w = torch.softmax(logits, dim=-1)
        total += w.sum(dim=2)
    n = torch.full((b,), p, device=q.device) if valid is None else valid.sum(dim=1)
    out = total.mean(dim=1) / n.clamp_min(1)[:, None].float()
    return out if valid is None else out.masked_fill(~valid, float("nan"))


def tower_attention_received(
    layer_input: torch.Tensor, layer: torch.nn.Module, cls: bool = True, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """:func:`attention_received` in a ViT encoder layer (CLIP, SigLIP, InternViT; see
    :func:`_encoder_qk`): layer_input (B, [1 +] P, D) -> (B, P), all tokens attending,
    the CLS token's column (``cls``) left out of the result."""
    q, k, scale = _encoder_qk(layer_input, layer)
    out = attention_received(q, k, scale, valid)
    return out[:, 1:] if cls else out


def random_scores(batch: int, n: int, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Seeded uniform scores (B, P): the same images-independent draw for a given seed."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.rand(batch, n, generator=g).to(device)


def encoder_attention(
    layer_input: torch.Tensor, layer: torch.nn.Module, cls: bool
) -> Callable[[str], torch.Tensor]:
    """The attention-based scores of a ViT encoder layer (CLIP, SigLIP, InternViT: read as
    :func:`_encoder_qk` reads it) for :func:`patch_scores`: ``"cls_attn"`` -> :func:`cls_attention`,
    ``"attn_received"`` -> :func:`tower_attention_received`; layer_input (B, [1 +] P, D)."""

    def scores(kind: str) -> torch.Tensor:
        if kind == "cls_attn":
            return cls_attention(layer_input, layer)
        return tower_attention_received(layer_input, layer, cls=cls)

    return scores


def patch_scores(
    kind: str,
    hidden: torch.Tensor,
    *,
    cls: bool,
    attention: Callable[[str], torch.Tensor] | None = None,
    valid: torch.Tensor | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """The stage-1 score ``kind`` of every patch: the one dispatch every family calls.

    hidden (B, [1 +] P, D): the tower's states at the scoring layer, a CLS token first when ``cls``;
    ``attention(kind)`` -> (B, P): the family's attention-based scores (``cls_attn``,
    ``attn_received``) from its own q/k (:func:`encoder_attention` for CLIP/SigLIP layers); ``valid``
    (B, P) bool: ragged rows (padding scores NaN; ``random`` draws the valid entries in row-major
    order, so a packed batch gets the same draw as its rows concatenated). Returns (B, P) float.
    """
    patches = hidden[:, 1:] if cls else hidden
    if kind in CLS_SCORES and not cls:
        raise ValueError(
            f"pruning.stage1.score = {kind!r} compares patches with the CLS token, but this vision tower has "
            "none: use 'mean_distance', 'cosine_mean', 'attn_received' or 'random'"
        )
    with torch.no_grad():  # scores only pick indices
        if kind in ("cosine", "cosine_centered"):
            return cls_cosine(hidden, centered=kind == "cosine_centered")
        if kind == "cosine_mean":
            return mean_cosine(patches, valid)
        if kind == "mean_distance":
            return 1.0 - mean_cosine(patches, valid)
        if kind in ("cls_attn", "attn_received"):
            if attention is None:
                raise ValueError(
                    f"pruning.stage1.score = {kind!r} needs the tower's attention (q/k of a layer)"
                )
            return attention(kind)
        if kind == "random":
            b, p = patches.shape[:2]
            if valid is None:
                return random_scores(b, p, seed, patches.device)
            out = torch.full((b, p), float("nan"), device=patches.device)
            n = int(valid.sum())
            return out.masked_scatter(valid, random_scores(1, n, seed, patches.device)[0])
    raise ValueError(f"pruning.stage1.score = {kind!r} is not one of {list(STAGE1_SCORES)}")


def select_patches(
    scores: torch.Tensor,
    cfg: Stage1Config,
    keep: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
    features: torch.Tensor | None = None,
    coords: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image (or per-group) kept sets from scores (B, P).

    Returns ``(mask (B, P) bool, k (B,) long)``; the mask keeps original spatial order. ``keep``
    (B,) forces per-row counts (matched-budget baselines), clamped to ``[1, n]``. ``counts`` (B,):
    row b's candidates are its first ``counts[b]`` entries (ragged groups, padding after them); each
    distinct count runs the selector once (one host sync).

    The count ``k`` comes from the scores alone (the knee). Which ``k`` patches fill it is the head of
    the score order, or with ``cfg.diversity`` > 0 a greedy choice that also weighs how much a patch
    repeats the ones already taken (:func:`tpkit.pruning.stage2.diverse_order`): by the cosine of
    ``features`` (B, P, D) (``diversity_by: features``) or by nearness on the grid (``grid``), within
    ``cfg.diversity_radius`` cells of ``coords`` (B, P, 3) (view, row, col) when set.
    """
    b, p = scores.shape
    s = torch.nan_to_num(scores.float(), nan=float("-inf"), neginf=float("-inf"))  # padding: -inf
    if counts is not None:
        pad = torch.arange(p, device=s.device)[None, :] >= counts[:, None]
        s = s.masked_fill(pad, float("-inf"))
    sorted_s, order = torch.sort(s, dim=1, descending=True, stable=True)  # ties: earlier patch first
    n = torch.full((b,), p, dtype=torch.long, device=s.device) if counts is None else counts.long()
    if keep is not None:
        k = torch.minimum(keep.to(device=s.device, dtype=torch.long).reshape(b).clamp(min=1), n)
    else:
        finite = torch.nan_to_num(sorted_s, neginf=0.0, posinf=0.0)
        kw = dict(ratio=cfg.ratio, budget=cfg.budget, min_keep=cfg.min_keep, max_keep=cfg.max_keep)
        if counts is None:
            k = head_count(finite, cfg.selector, **kw)
        else:
            k = torch.zeros_like(n)
            for c in sorted(set(n.tolist()) - {0}):  # rows with c candidates: their first c sorted scores
                k = torch.where(n == c, head_count(finite[:, :c], cfg.selector, **kw), k)
    if cfg.diversity > 0:
        return _diverse_mask(s, k, cfg, features, coords), k
    rank_kept = torch.arange(p, device=s.device)[None, :] < k[:, None]  # (B, P) in sorted order
    mask = torch.zeros_like(rank_kept).scatter(1, order, rank_kept)
    return mask, k


def _diverse_mask(
    s: torch.Tensor,
    k: torch.Tensor,
    cfg: Stage1Config,
    features: torch.Tensor | None,
    coords: torch.Tensor | None,
) -> torch.Tensor:
    """(B, P) bool: the first ``k`` greedy picks of :func:`diverse_order` over the finite scores ``s``
    (padding is -inf; a +inf score, a token that must stay, is picked first)."""
    b, p = s.shape
    by_features = cfg.diversity_by == "features"
    if (by_features and features is None) or (cfg.diversity_radius is not None and coords is None):
        what = "features" if by_features and features is None else "patch coordinates"
        raise ValueError(
            f"pruning.stage1.diversity = {cfg.diversity} needs the patches' {what}, which this caller does "
            "not give: set it to 0"
        )
    if not by_features and cfg.diversity_radius is None:
        raise ValueError("pruning.stage1.diversity_by = 'grid' needs diversity_radius (grid cells)")
    candidate = s > float("-inf")
    finite = torch.where(torch.isfinite(s), s, torch.full_like(s, float("-inf"))).amax(dim=1, keepdim=True)
    finite = torch.nan_to_num(finite, neginf=0.0)
    s = torch.where(s == float("inf"), finite + finite.abs() + 1.0, s)  # above every finite score
    sim = redundancy(features if by_features else None, coords, cfg.diversity_radius)  # (B, P, P)
    steps = int(k.max()) if b else 0  # one host sync
    # on the grid a patch counts every taken neighbour, so the picks keep spreading once each patch
    # has one (coverage); by features, the closest pick decides (as stage 2)
    picks = diverse_order(s, candidate, sim, steps, cfg.diversity, accumulate=not by_features)  # (B, steps)
    take = torch.arange(steps, device=s.device)[None, :] < k[:, None]
    mask = torch.zeros(b, p + 1, dtype=torch.bool, device=s.device)
    return mask.scatter(1, torch.where(take, picks, p), take)[:, :p]


def context_merge(
    mask: torch.Tensor, scores: torch.Tensor, features: torch.Tensor, n_context: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Context tokens (VisionZip's contextual tokens) carved out of each row's kept count.

    ``mask`` (B, P) is the kept set, ``scores`` (B, P) its scores (-inf or NaN on padding), ``features``
    (B, P, D) what the patches carry. In each row that dropped something, the ``c = min(n_context,
    k - 1, dropped)`` lowest-scored kept patches are released; ``c`` seeds are spread evenly, in raster
    order, over the patches now dropped; every dropped patch joins the seed its features are most
    like (cosine), and each seed's slot will carry its cluster's mean (:func:`merge_into`). So the
    dropped patches are summarised instead of lost, in the same number of kept slots.

    Returns ``(mask, into)``: the new kept set (the same count per row; unchanged where nothing was
    dropped, so keep-all stays exact) and ``into`` (B, P) long, the slot that carries each patch's
    features (itself when kept, its seed when dropped, -1 on padding).
    """
    b, p = mask.shape
    dev = mask.device
    s = torch.nan_to_num(scores.float(), nan=float("-inf"), neginf=float("-inf"))  # padding: -inf
    valid = s > float("-inf")
    mask = mask & valid
    k = mask.sum(dim=1)
    c = torch.minimum(torch.minimum(torch.full_like(k, n_context), (k - 1).clamp(min=0)), valid.sum(1) - k)
    ar = torch.arange(p, device=dev)[None, :].expand(b, p)
    # release the c lowest-scored kept patches (a +inf score, a token that must stay, never is: c < k)
    order = torch.sort(
        torch.where(mask, s, float("inf")), dim=1, stable=True
    ).indices  # kept first, ascending
    rank = torch.empty_like(order).scatter_(1, order, ar)
    mask = mask & ~(rank < c[:, None])
    # seeds: c of the d dropped patches, at raster ranks floor((j + 0.5) * d / c)
    dropped = valid & ~mask
    d = dropped.sum(dim=1)
    drank = dropped.long().cumsum(dim=1) - 1  # raster rank among the dropped
    j = torch.arange(p, device=dev)[None, :]
    want = torch.div((2 * j + 1) * d[:, None], 2 * c.clamp(min=1)[:, None], rounding_mode="floor")  # (B, P)
    want = torch.where(j < c[:, None], want, -1)  # the first c entries of each row are seed ranks
    is_seed = dropped & (drank[:, :, None] == want[:, None, :]).any(dim=-1)  # (B, P)
    f = F.normalize(features.float(), dim=-1)
    sim = (f @ f.transpose(-1, -2)).masked_fill(~is_seed[:, None, :], float("-inf"))  # (B, P, seeds)
    nearest = sim.argmax(dim=-1)  # (B, P)
    into = torch.where(mask, ar, torch.where(is_seed, ar, torch.where(dropped, nearest, -1)))
    into = torch.where(valid, into, -1)
    return mask | is_seed, into


def merge_into(features: torch.Tensor, into: torch.Tensor) -> torch.Tensor:
    """(B, P, D): each slot's features replaced by the mean over the patches that ``into`` (B, P) sends
    to it (:func:`context_merge`); a slot that carries only itself keeps its features bit for bit."""
    b, p, d = features.shape
    target = into.clamp(min=0)
    w = (into >= 0).to(features.dtype)
    total = torch.zeros_like(features).scatter_add_(
        1, target[..., None].expand(b, p, d), features * w[..., None]
    )
    count = torch.zeros(b, p, dtype=features.dtype, device=features.device).scatter_add_(1, target, w)
    merged = total / count.clamp(min=1)[..., None]
    return torch.where((count > 1)[..., None], merged, features)
