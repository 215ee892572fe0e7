"""Stage 2: relevance of prompt tokens to the instruction at one decoder layer, and the kept set.

Pure torch. The caller (``tpkit.models.pruned_llava``) forms the layer's q (instruction queries
only) and k (all tokens) from its own projections of the normed layer input; here they are rotated,
GQA-expanded and turned into a softmax over keys -- a (Q x T) matrix per head, never (T x T).
"""

from __future__ import annotations

import torch

from tpkit.pruning.config import Stage2Config
from tpkit.pruning.knee import head_count


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, d), cos/sin (B, T, d) -> rotated x (the Llama/Mistral/Qwen2 convention)."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


def relevance(
    q: torch.Tensor,
    k: torch.Tensor,
    query_pos: torch.Tensor,
    query_valid: torch.Tensor,
    key_valid: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """Mean attention that the queries pay to every key -> (B, T).

    q (B, H, Q, d) post-RoPE; k (B, Hk, T, d) post-RoPE, expanded to H heads (GQA) here;
    query_pos (B, Q) sequence index of each query (causality: a query sees keys <= its index);
    query_valid (B, Q) bool (ragged query sets); key_valid (B, T) bool (padding).
    Softmax over the visible keys, then averaged over heads and valid queries.
    """
    b, h, nq, _ = q.shape
    t = k.shape[2]
    if k.shape[1] != h:
        k = k.repeat_interleave(h // k.shape[1], dim=1)  # (B, H, T, d)
    logits = (q.float() @ k.float().transpose(-1, -2)) * scaling  # (B, H, Q, T)
    keys = torch.arange(t, device=q.device)
    visible = key_valid[:, None, :] & (keys[None, None, :] <= query_pos[:, :, None])  # (B, Q, T)
    visible = visible & query_valid[:, :, None]
    logits = logits.masked_fill(~visible[:, None], float("-inf"))
    w = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # rows of invalid queries are all -inf -> 0
    w = w.mean(dim=1)  # (B, Q, T)
    n = query_valid.sum(dim=1).clamp_min(1).to(w.dtype)  # (B,)
    return w.sum(dim=1) / n[:, None]


def select_tokens(
    scores: torch.Tensor,
    droppable: torch.Tensor,
    always: torch.Tensor,
    cfg: Stage2Config,
    keep_total: torch.Tensor | None = None,
) -> torch.Tensor:
    """Kept tokens (B, T) bool: every ``always`` token plus the head of the droppable ones.

    ``droppable`` tokens are cut with ``cfg.selector`` (a per-sample knee, a ratio of the droppable
    count, or a budget), at least ``cfg.min_keep``. ``keep_total`` (B,) forces the total kept count of
    each sample instead (protected tokens included; clamped to what exists).
    """
    keep = always.clone()
    for i in range(scores.shape[0]):  # ragged candidate sets
        cand = droppable[i].nonzero().squeeze(1)  # (C,)
        n = cand.numel()
        if n == 0:
            continue
        s, order = torch.sort(scores[i, cand].float(), descending=True, stable=True)
        if keep_total is not None:
            k = int(keep_total[i]) - int(always[i].sum())
            k = max(0, min(k, n))
        else:
            k = int(
                head_count(s[None], cfg.selector, ratio=cfg.ratio, budget=cfg.budget, min_keep=cfg.min_keep)[
                    0
                ]
            )
        keep[i, cand[order[:k]]] = True
    return keep
