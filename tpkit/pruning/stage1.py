"""Stage 1: score the vision tower's patches against CLS and keep the head of the sorted curve.

Pure torch. The vision-tower call and the projection of kept patches live in
:mod:`tpkit.models` (each family's tower); this module turns hidden states into per-image kept sets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tpkit.pruning.config import Stage1Config
from tpkit.pruning.knee import head_count


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


def cls_attention(layer_input: torch.Tensor, layer: torch.nn.Module) -> torch.Tensor:
    """CLS row of a CLIP encoder layer's self-attention, averaged over heads -> (B, P).

    ``layer_input`` (B, 1 + P, D) is the layer's input (hidden_states[-2] for the last layer);
    ``layer`` has ``layer_norm1`` and ``self_attn.{q_proj, k_proj}``. Computed from q/k here because
    sdpa attention returns no weights. Only the CLS query is formed: O(P) not O(P^2).
    """
    attn = layer.self_attn
    x = layer.layer_norm1(layer_input)
    b, t, d = x.shape
    heads = attn.num_heads
    hd = getattr(attn, "head_dim", d // heads)
    scale = getattr(attn, "scale", hd**-0.5)
    q = attn.q_proj(x[:, :1]).view(b, 1, heads, hd).transpose(1, 2)  # (B, H, 1, hd)
    k = attn.k_proj(x).view(b, t, heads, hd).transpose(1, 2)  # (B, H, 1+P, hd)
    w = torch.softmax((q.float() @ k.float().transpose(-1, -2)) * scale, dim=-1)  # (B, H, 1, 1+P)
    return w.mean(dim=1)[:, 0, 1:]


def random_scores(batch: int, n: int, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Seeded uniform scores (B, P): the same images-independent draw for a given seed."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.rand(batch, n, generator=g).to(device)


def select_patches(
    scores: torch.Tensor, cfg: Stage1Config, keep: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image kept sets from scores (B, P).

    Returns ``(mask (B, P) bool, k (B,) long)``; the mask keeps original spatial order. ``keep``
    (B,) forces per-image counts (matched-budget baselines), clamped to ``[1, P]``.
    """
    b, p = scores.shape
    s = torch.nan_to_num(scores.float(), nan=float("-inf"))
    sorted_s, order = torch.sort(s, dim=1, descending=True, stable=True)  # ties: earlier patch first
    if keep is not None:
        k = keep.to(device=s.device, dtype=torch.long).reshape(b).clamp(1, p)
    else:
        finite = torch.nan_to_num(sorted_s, neginf=0.0, posinf=0.0)
        k = head_count(
            finite,
            cfg.selector,
            ratio=cfg.ratio,
            budget=cfg.budget,
            min_keep=cfg.min_keep,
            max_keep=cfg.max_keep,
        )
    rank_kept = torch.arange(p, device=s.device)[None, :] < k[:, None]  # (B, P) in sorted order
    mask = torch.zeros_like(rank_kept).scatter(1, order, rank_kept)
    return mask, k
