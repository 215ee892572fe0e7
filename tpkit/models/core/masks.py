"""Index and mask plumbing of a pruned sequence: compaction of kept columns and attention masks.

Positions may have gaps once tokens are dropped, so masks here never rely on position ids: a
query sees the keys at or before it in sequence order that are not padding.
"""

from __future__ import annotations

import torch

__all__ = ["FLASH", "attn_mask", "compact", "compact_full", "gather_rows"]

FLASH = ("flash_attention_2", "flash_attention_3")


def attn_mask(
    key_valid: torch.Tensor,
    q_len: int,
    impl: str,
    dtype: torch.dtype,
    no_padding: bool = False,
    *,
    window: int | None = None,
    positions: torch.Tensor | None = None,
    blocks: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Mask for queries that are the last ``q_len`` of the keys (B, Lk): causal by sequence order and
    padding, and optionally a sliding window and bidirectional blocks.

    eager: additive float (B, 1, q, Lk); sdpa: bool (B, 1, q, Lk); flash: the 2D key mask.
    A query always sees itself, so padded query rows stay finite.
    ``no_padding`` (the caller knows on the host that every key is valid): sdpa with ``q_len == Lk``
    gets None, so the attention runs with ``is_causal`` (flash/cuDNN kernels), as stock does.

    ``window`` with ``positions`` (B, Lk) long, each key's position id: a query at position p sees
    keys at positions > p - window (transformers' ``sliding_window_overlay``, measured in position
    ids rather than sequence slots, so that dropped tokens do not widen the window).
    ``blocks`` (B, Lk) long, each key's block id (-1: none): a query also sees every key of its own
    block, later ones too (``blockwise_overlay``: an image's tokens see each other). The window
    applies on top: AND(window, OR(causal, block)), as Gemma 3 composes them.
    """
    if impl in FLASH:
        if window is not None or blocks is not None:
            raise ValueError(
                f"attn_implementation {impl!r} takes a 2D key mask only: it cannot apply this layer's sliding "
                "window in original positions or its bidirectional image blocks; use 'sdpa' or 'eager'"
            )
        return key_valid.to(torch.int32)
    lk = key_valid.shape[1]
    if impl == "sdpa" and no_padding and q_len == lk and window is None and blocks is None:
        return None
    q_idx = torch.arange(lk - q_len, lk, device=key_valid.device)  # (q,)
    k_idx = torch.arange(lk, device=key_valid.device)
    causal = k_idx[None, :] <= q_idx[:, None]  # (q, Lk)
    seen = causal[None]  # (1 or B, q, Lk)
    if blocks is not None:
        qb = blocks[:, lk - q_len :]  # (B, q)
        seen = seen | ((qb[:, :, None] == blocks[:, None, :]) & (qb[:, :, None] >= 0))
    if window is not None:
        qp = positions[:, lk - q_len :]  # (B, q)
        seen = seen & (positions[:, None, :] > qp[:, :, None] - window)
    allowed = seen & key_valid[:, None, :]
    allowed = allowed | (k_idx[None, :] == q_idx[:, None])[None]
    allowed = allowed[:, None]  # (B, 1, q, Lk)
    if impl == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )


def compact(keep: torch.Tensor) -> torch.Tensor:
    """keep (B, T) bool -> index (B, T') of kept columns, left-padded with -1 (T' = max kept)."""
    return compact_full(keep)[0]


def compact_full(keep: torch.Tensor, bucket: int = 0) -> tuple[torch.Tensor, bool]:
    """:func:`compact`, and whether no row is padded (every row keeps T'): one host sync for both.

    ``bucket`` > 0 rounds T' up to a multiple of it (more left padding, masked like any other), so
    that the pruned sequence takes a few lengths only: what graph capture needs.
    """
    b, t = keep.shape
    n = keep.sum(dim=1)  # (B,)
    t_out, t_min = torch.stack([n.max(), n.min()]).tolist() if b else (0, 0)
    if bucket > 0:
        t_out = -(-t_out // bucket) * bucket
    dest = (t_out - n)[:, None] + keep.long().cumsum(dim=1) - 1  # (B, T)
    dest = torch.where(keep, dest, torch.full_like(dest, t_out))
    idx = torch.full((b, t_out + 1), -1, dtype=torch.long, device=keep.device)
    src = torch.arange(t, device=keep.device).expand(b, t)
    idx.scatter_(1, dest, torch.where(keep, src, torch.full_like(src, -1)))
    return idx[:, :t_out], t_min == t_out


def gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, T, ...) gathered along dim 1 by idx (B, T') (-1 -> row 0, mask it yourself)."""
    i = idx.clamp(min=0)
    if x.dim() == 2:
        return x.gather(1, i)
    return x.gather(1, i.view(*i.shape, *([1] * (x.dim() - 2))).expand(*i.shape, *x.shape[2:]))
