"""Stage 2: relevance of prompt tokens to the instruction at one decoder layer, and the kept set.

Pure torch. The caller (``tpkit.models.core.prefill``) forms the layer's q (instruction queries
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
    """x (B, H, T, d), cos/sin (B, T, r) -> rotated x (the Llama/Mistral/Qwen2 convention); with a
    partial rotary (r < d, Qwen3.5's quarter of the head) the first r dims rotate, the rest pass."""
    r = cos.shape[-1]
    if r < x.shape[-1]:
        return torch.cat([apply_rope(x[..., :r], cos, sin), x[..., r:]], dim=-1)
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


def relevance(
    q: torch.Tensor,
    k: torch.Tensor,
    query_pos: torch.Tensor,
    query_valid: torch.Tensor,
    key_valid: torch.Tensor,
    scaling: float,
    reduce: str = "mean",
) -> torch.Tensor:
    """Attention that the queries pay to every key -> (B, T).

    q (B, H, Q, d) post-RoPE; k (B, Hk, T, d) post-RoPE, expanded to H heads (GQA) here;
    query_pos (B, Q) sequence index of each query (causality: a query sees keys <= its index);
    query_valid (B, Q) bool (ragged query sets); key_valid (B, T) bool (padding).
    Softmax over the visible keys, averaged over heads, then reduced over the valid queries:
    ``mean`` (their average) or ``max`` (the most any one of them pays).
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
    if reduce == "max":  # invalid queries' rows are 0, attention >= 0: they never win
        return w.amax(dim=1)
    if reduce != "mean":
        raise ValueError(f"reduce = {reduce!r} must be 'mean' or 'max'")
    n = query_valid.sum(dim=1).clamp_min(1).to(w.dtype)  # (B,)
    return w.sum(dim=1) / n[:, None]


def redundancy(
    features: torch.Tensor | None, coords: torch.Tensor | None = None, radius: int | None = None
) -> torch.Tensor:
    """How much each token repeats each other token, (B, T, T) in [0, 1].

    The cosine of the tokens' features (B, T, D), clamped at 0. With ``radius``, only patches of the
    same view within ``radius`` grid cells of each other (Chebyshev distance) count as redundant:
    two patches of one object are, two objects that look alike are not. ``coords`` (B, T, 3) gives
    each token's (view, row, col) on its view's patch grid, view -1 for tokens that are no patch (a
    view is an image, a crop of one, or a video frame). ``features`` None (with ``radius``): every
    pair of patches that near is fully redundant (spatial coverage alone).
    """
    if features is None:
        if coords is None or radius is None:
            raise ValueError("redundancy without features needs the patch coordinates and a radius")
        sim = torch.ones(coords.shape[0], coords.shape[1], coords.shape[1], device=coords.device)
    else:
        f = torch.nn.functional.normalize(features.float(), dim=-1)
        sim = (f @ f.transpose(-1, -2)).clamp(0.0, 1.0)  # (B, T, T)
    if radius is not None:
        if coords is None:
            raise ValueError("a redundancy radius needs the tokens' patch coordinates")
        view, r, c = coords.unbind(-1)  # (B, T) each
        near = (
            (view[:, :, None] == view[:, None, :])
            & ((r[:, :, None] - r[:, None, :]).abs() <= radius)
            & ((c[:, :, None] - c[:, None, :]).abs() <= radius)
        )
        patch = view >= 0
        sim = sim * (near & patch[:, :, None] & patch[:, None, :]).to(sim.dtype)
    return sim


def diverse_order(
    scores: torch.Tensor,
    candidate: torch.Tensor,
    sim: torch.Tensor,
    steps: int,
    weight: float,
    accumulate: bool = False,
) -> torch.Tensor:
    """Greedy picks (B, steps): each step takes the candidate with the highest score (scaled so the
    row's best candidate is 1) minus ``weight`` x its largest redundancy with a token already taken
    (``accumulate``: the sum of its redundancies, so that, once every token repeats some pick, the
    ones that repeat fewer still go first).

    Rows with fewer than ``steps`` candidates repeat an arbitrary index after their last one; the
    caller keeps only the first ``k`` picks of each row (``k`` <= its candidate count).
    """
    b, t = scores.shape
    s = scores.float().masked_fill(~candidate, float("-inf"))
    top = s.amax(dim=1, keepdim=True)
    rel = torch.where(candidate, scores.float() / top.clamp_min(1e-12), torch.zeros_like(s))
    free = candidate.clone()
    worst = torch.zeros_like(rel)  # each token's largest (or summed) redundancy with the picks so far
    picks = []
    for _ in range(steps):
        p = (rel - weight * worst).masked_fill(~free, float("-inf")).argmax(dim=1)  # (B,)
        picks.append(p)
        free = free.scatter(1, p[:, None], False)
        row = sim.gather(1, p[:, None, None].expand(b, 1, t)).squeeze(1)
        worst = worst + row if accumulate else torch.maximum(worst, row)
    return torch.stack(picks, dim=1) if picks else scores.new_zeros((b, 0), dtype=torch.long)


def select_tokens(
    scores: torch.Tensor,
    droppable: torch.Tensor,
    always: torch.Tensor,
    cfg: Stage2Config,
    keep_total: torch.Tensor | None = None,
    sim: torch.Tensor | None = None,
    diverse: torch.Tensor | None = None,
) -> torch.Tensor:
    """Kept tokens (B, T) bool: every ``always`` token plus the head of the droppable ones.

    ``droppable`` tokens are cut with ``cfg.selector`` (a per-sample knee, a ratio of the droppable
    count, or a budget), at least ``cfg.min_keep`` and at most ``cfg.max_keep``. ``keep_total`` (B,)
    forces the total kept count of each sample instead (protected tokens included; clamped to what
    exists).

    Vectorised over the ragged candidate sets: each row is sorted with its droppable tokens first (in
    descending score order, ties by position), a per-row count ``k`` is computed and the first ``k``
    sorted positions are scattered back. No host sync for forced counts, ``ratio`` and ``budget``; the
    knee selectors sync once (the distinct candidate counts) and run the detector once per count.

    With ``cfg.diversity`` > 0 and ``sim`` (B, T, T) (:func:`redundancy`), the kept set has the same
    size, and as many tokens of the ``diverse`` pool (B, T) bool (the patches; None: every
    droppable token) as the score order gives it, but the pool's tokens are taken by
    :func:`diverse_order` instead of by score alone (one more sync: the largest pool count).
    """
    b, t = scores.shape
    dev = scores.device
    s = scores.float()  # (B, T)
    order = torch.sort(s, dim=1, descending=True, stable=True).indices  # ties: earlier token first
    notcand = (~droppable).to(torch.uint8).gather(1, order)  # (B, T), 0 = candidate
    order = order.gather(1, torch.sort(notcand, dim=1, stable=True).indices)  # candidates first
    n = droppable.sum(dim=1)  # (B,) candidates per row
    if keep_total is not None:
        k = keep_total.to(device=dev).long().reshape(b) - always.sum(dim=1)
        k = torch.minimum(k.clamp(min=0), n)
    elif cfg.selector in ("ratio", "budget"):
        if cfg.selector == "ratio":
            k = (n.double() * cfg.ratio + 0.5).floor().long()
        else:
            if cfg.budget is None:
                raise ValueError("selector 'budget' needs a budget")
            k = torch.full_like(n, int(cfg.budget))
        k = torch.minimum(torch.maximum(k, n.clamp(max=cfg.min_keep)), n)  # head_count's clamps
    else:
        sorted_s = s.gather(1, order)  # (B, T): each row's candidate scores lead, descending
        k = torch.zeros_like(n)
        for c in sorted(set(n.tolist()) - {0}):  # one sync: the distinct candidate counts
            kc = head_count(
                sorted_s[:, :c], cfg.selector, ratio=cfg.ratio, budget=cfg.budget, min_keep=cfg.min_keep
            )  # (B,), valid on rows with c candidates (row-independent)
            k = torch.where(n == c, kc, k)
    if keep_total is None and cfg.max_keep is not None:
        k = k.clamp(max=cfg.max_keep)
    rank = torch.arange(t, device=dev)[None, :] < k[:, None]  # (B, T) in sorted order
    kept = torch.zeros_like(droppable).scatter(1, order, rank)
    if cfg.diversity > 0 and sim is not None:
        pool = droppable if diverse is None else droppable & diverse
        m = (kept & pool).sum(dim=1)  # (B,) slots of the pool: the score order decides how many
        steps = int(m.max()) if b else 0
        picks = diverse_order(s, pool, sim, steps, cfg.diversity)  # (B, steps)
        take = torch.arange(steps, device=dev)[None, :] < m[:, None]
        chosen = torch.zeros(b, t + 1, dtype=torch.bool, device=dev)
        chosen = chosen.scatter(1, torch.where(take, picks, t), take)[:, :t]
        kept = (kept & ~pool) | chosen
    return always | kept
