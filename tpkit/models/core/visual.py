"""Stage 1 for families whose visual tokens are many, ragged and structured (any-res crops, newline
tokens, merged units, video frames): the family describes every visual placeholder of the batch, the
core picks the kept ones.

A family's ``encode`` computes, for each kind of placeholder (image tokens, video tokens), the LM input
embedding stock would put at every placeholder, in placeholder order (row-major over ``input_ids``),
plus a score, a selection group, whether it is content or structure, and its (view, row, col). Then
:func:`select_visual` cuts each group at its knee (or at forced per-sample counts), keeps a structure
token (``image_newline``) exactly when its row keeps a patch, and lays everything out per sample as
the core's :class:`tpkit.models.core.family.Visual`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tpkit.models.core.family import Visual
from tpkit.pruning.stage1 import context_merge, merge_into, select_patches

__all__ = ["VisualTokens", "select_visual", "placeholder_slots"]


@dataclass
class VisualTokens:
    """Every placeholder of one kind in a batch, flat in placeholder order (M of them)."""

    token_id: int  # the placeholder id in input_ids
    # (M, D) what stock scatters into the placeholders; None: the family computes the kept ones after
    # selection (from Visual.kept_token), e.g. when stage 1 cuts inside the tower
    embeds: torch.Tensor | None
    scores: torch.Tensor  # (M,) stage-1 score (read on content tokens only)
    group: torch.Tensor  # (M,) long: one knee per group (an image, or a view); ids >= 0
    content: torch.Tensor  # (M,) bool: patches / merged units; False: structure (newline) tokens
    row: torch.Tensor  # (M,) long: a structure token stays iff a content token of its row stays; -1: always
    coords: torch.Tensor  # (M, 3) long: (view, row, col) of a patch; view -1 on structure tokens
    what: str = "image"  # for error messages

    def __len__(self) -> int:
        return self.group.shape[0]


def placeholder_slots(placeholders: torch.Tensor) -> torch.Tensor:
    """(B, T) bool -> (B, N) long: each sample's placeholder positions in order, right-padded with -1
    (N = the most placeholders of any sample; one host sync)."""
    b, t = placeholders.shape
    n = int(placeholders.sum(dim=1).max()) if b else 0
    ar = torch.arange(t, device=placeholders.device).expand(b, t)
    first = torch.sort(torch.where(placeholders, ar, t), dim=1).values[:, :n]
    return torch.where(first < t, first, -1)


def _offset(x: torch.Tensor, base: int) -> torch.Tensor:
    return torch.where(x >= 0, x + base, x)


def select_visual(
    input_ids: torch.Tensor,
    kinds: list[VisualTokens],
    stage1,
    stage1_keep: torch.Tensor | None = None,
) -> Visual:
    """Stage 1 over the placeholders of ``kinds`` (a ``Stage1Config``; disabled: all kept).

    Groups are cut independently at their knee; ``stage1_keep`` (B,) forces how many content tokens
    each sample keeps (its groups pooled, by score). Structure tokens then stay when a content token of
    their row stays. Raises ValueError when a kind's placeholders and tokens differ in number.
    """
    b, t = input_ids.shape
    device = input_ids.device
    pos, parts = [], []
    g_base = r_base = 0
    for kind in kinds:
        flat = (input_ids == kind.token_id).flatten().nonzero().squeeze(1)  # (M_k,) row-major
        if flat.numel() != len(kind):
            raise ValueError(
                f"the prompts hold {flat.numel()} {kind.what} placeholders (token id {kind.token_id}) but the "
                f"{kind.what} inputs give {len(kind)} features: build input_ids and the visual inputs with "
                "the same processor (image sizes, grid pinpoints, resolution limits)"
            )
        pos.append(flat)
        parts.append((kind, _offset(kind.group, g_base), _offset(kind.row, r_base)))
        g_base += int(kind.group.max()) + 1 if len(kind) else 0
        r_base += int(kind.row.max()) + 1 if len(kind) else 0
    flat = torch.cat(pos)  # (M,)
    order = torch.argsort(flat)  # placeholder order of the whole prompt
    flat = flat[order]
    deferred = [k.embeds is None for k, _, _ in parts]
    if any(deferred) and not all(deferred):
        raise ValueError("select_visual: either every kind carries its embeddings or none does")
    embeds = None if any(deferred) else torch.cat([k.embeds for k, _, _ in parts])[order]
    scores = torch.cat([k.scores.float() for k, _, _ in parts])[order]
    group = torch.cat([g for _, g, _ in parts])[order]
    content = torch.cat([k.content for k, _, _ in parts])[order]
    row = torch.cat([r for _, _, r in parts])[order]
    coords = torch.cat([k.coords for k, _, _ in parts])[order]
    sample = flat // t
    m = flat.numel()

    if not stage1.enabled:
        keep = torch.ones(m, dtype=torch.bool, device=device)
    else:
        sel = sample if stage1_keep is not None else group
        n_groups = b if stage1_keep is not None else g_base
        key = torch.where(content, sel, n_groups)  # structure tokens sort last
        by_group = torch.sort(key, stable=True).indices  # (M,) group-major, placeholder order within
        counts = torch.bincount(sel[content], minlength=n_groups)  # (G,)
        start = counts.cumsum(0) - counts
        n_cand = int(counts.sum())
        cand = by_group[:n_cand]
        rank = torch.arange(n_cand, device=device) - start[sel[cand]]
        width = int(counts.max()) if n_groups else 0
        padded = torch.full((n_groups, max(width, 1)), float("-inf"), device=device)
        padded[sel[cand], rank] = scores[cand]
        features = padded_coords = None
        by_features = stage1.context_tokens > 0 or (
            stage1.diversity > 0 and stage1.diversity_by == "features"
        )
        if by_features and embeds is None:
            raise ValueError(
                "pruning.stage1.context_tokens and diversity_by 'features' need the visual tokens' embeddings, "
                "which a cut inside the vision tower (stage1.in_tower_block) computes only for the kept ones: "
                "use diversity_by 'grid' and context_tokens 0 there"
            )
        if by_features:  # the candidates' LM embeddings, padded like the scores
            features = embeds.new_zeros(n_groups, max(width, 1), embeds.shape[-1])
            features[sel[cand], rank] = embeds[cand]
        if stage1.diversity > 0:
            padded_coords = coords.new_full((n_groups, max(width, 1), 3), -1)
            padded_coords[sel[cand], rank] = coords[cand]
        mask, _ = select_patches(
            padded, stage1, stage1_keep, counts=counts, features=features, coords=padded_coords
        )
        if stage1.context_tokens:  # dropped tokens merged into context slots (in the LM's input space)
            mask, into = context_merge(mask, padded, features, stage1.context_tokens)
            embeds = embeds.clone()
            embeds[cand] = merge_into(features, into)[sel[cand], rank]
        keep = torch.zeros(m, dtype=torch.bool, device=device)
        keep[cand] = mask[sel[cand], rank]
        if r_base:  # structure tokens follow their row
            linked = content & (row >= 0)
            row_kept = torch.zeros(r_base, dtype=torch.bool, device=device)
            row_kept[row[linked & keep]] = True
            structure = ~content
            keep = torch.where(structure, torch.where(row >= 0, row_kept[row.clamp(min=0)], True), keep)
        else:
            keep = keep | ~content

    placeholders = torch.zeros(b * t, dtype=torch.bool, device=device)
    placeholders[flat] = True
    slots = placeholder_slots(placeholders.view(b, t))  # (B, N)
    token_at = torch.full((b * t,), -1, dtype=torch.long, device=device)
    token_at[flat] = torch.arange(m, device=device)
    real = slots >= 0
    tok = torch.where(real, token_at.view(b, t).gather(1, slots.clamp(min=0)), 0)  # (B, N)
    keep_bn = keep[tok] & real
    score_bn = torch.where(real & content[tok], scores[tok], float("nan"))
    coords_bn = torch.where(real[..., None], coords[tok], -1)
    kept = tok[keep_bn]  # (sum k1,) row-major: the kept placeholders in prompt order
    return Visual(
        slots=slots,
        keep=keep_bn,
        k1=keep_bn.sum(dim=1),
        projected=None if embeds is None else embeds[kept],
        scores=score_bn if stage1.enabled else None,
        coords=coords_bn,
        kept_token=order[kept],  # each one's index in the kinds' tokens, concatenated in ``kinds`` order
    )
