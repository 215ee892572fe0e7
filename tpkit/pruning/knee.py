"""Knee (inflection) detectors on descending score curves, and the kept-count rule shared by both stages.

Every detector takes scores sorted in descending order, ``(B, N)``, and returns how many leading
entries form the head, ``(B,)`` long, before clamping. A curve without a tail (nothing below the
chord / no positive curvature / constant) returns ``N``: with no long tail there is nothing the
detector can justify dropping, and the ``[min_keep, max_keep]`` clamps decide.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_EPS = 1e-6  # on curves normalised to [0, 1]


def _normalise(sorted_desc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N) descending -> y in [0, 1] (1 at the head), and a (B,) flag for flat curves."""
    s = sorted_desc.float()
    hi = s[:, :1]
    lo = s[:, -1:]
    span = hi - lo  # (B, 1)
    flat = (span <= 1e-12 * hi.abs().clamp_min(1.0)).squeeze(1) | ~torch.isfinite(span).squeeze(1)
    y = (s - lo) / torch.where(flat[:, None], torch.ones_like(span), span)
    return torch.nan_to_num(y, nan=0.0), flat


def kneedle(sorted_desc: torch.Tensor) -> torch.Tensor:
    """Kneedle: normalise both axes to [0, 1]; the knee is the rank farthest below the chord.

    Returns the knee's rank (0-based), i.e. the number of entries strictly before it. A step
    ``[1, 1, 1, 0, 0]`` gives 3.
    """
    b, n = sorted_desc.shape
    if n < 3:
        return torch.full((b,), n, dtype=torch.long, device=sorted_desc.device)
    y, flat = _normalise(sorted_desc)
    x = torch.linspace(0.0, 1.0, n, device=y.device)
    below = (1.0 - x)[None, :] - y  # (B, N): distance below the chord from (0, 1) to (1, 0)
    best, idx = below.max(dim=1)
    no_tail = flat | (best <= _EPS)
    return torch.where(no_tail, torch.full_like(idx, n), idx)


def curvature(sorted_desc: torch.Tensor) -> torch.Tensor:
    """Maximum of the second difference of the (lightly smoothed) normalised curve.

    Smoothing window: 1 for N < 100, else ``2 * (N // 100) + 1`` (moving average). Returns the rank of
    the maximum, like :func:`kneedle`.
    """
    b, n = sorted_desc.shape
    if n < 3:
        return torch.full((b,), n, dtype=torch.long, device=sorted_desc.device)
    y, flat = _normalise(sorted_desc)
    half = n // 100
    if half > 0:
        w = 2 * half + 1
        y = F.avg_pool1d(F.pad(y[:, None, :], (half, half), mode="replicate"), w, stride=1)[:, 0]
    dd = y[:, :-2] - 2.0 * y[:, 1:-1] + y[:, 2:]  # (B, N-2), dd[:, i-1] is at rank i
    best, idx = dd.max(dim=1)
    idx = idx + 1
    no_tail = flat | (best <= _EPS)
    return torch.where(no_tail, torch.full_like(idx, n), idx)


def iqr_count(scores: torch.Tensor) -> torch.Tensor:
    """PruMerge outliers: how many scores exceed ``Q3 + 1.5 * (Q3 - Q1)`` (linear-interpolated quartiles)."""
    s = scores.float()
    q = torch.quantile(s, torch.tensor([0.25, 0.75], device=s.device), dim=1)  # (2, B)
    fence = q[1] + 1.5 * (q[1] - q[0])
    return (s > fence[:, None]).sum(dim=1)


def head_count(
    sorted_desc: torch.Tensor,
    selector: str,
    *,
    ratio: float = 0.25,
    budget: int | None = None,
    min_keep: int = 1,
    max_keep: int | None = None,
) -> torch.Tensor:
    """How many of the (B, N) descending scores to keep: selector, then ``[min_keep, max_keep]``, then ``N``."""
    b, n = sorted_desc.shape
    dev = sorted_desc.device
    if selector == "kneedle":
        k = kneedle(sorted_desc)
    elif selector == "curvature":
        k = curvature(sorted_desc)
    elif selector == "iqr":
        k = iqr_count(sorted_desc)
    elif selector == "ratio":
        k = torch.full((b,), int(math.floor(ratio * n + 0.5)), dtype=torch.long, device=dev)
    elif selector == "budget":
        if budget is None:
            raise ValueError("selector 'budget' needs a budget")
        k = torch.full((b,), int(budget), dtype=torch.long, device=dev)
    else:
        raise ValueError(f"unknown selector {selector!r}")
    hi = n if max_keep is None else min(max_keep, n)
    return k.clamp(min=min(min_keep, n), max=hi)
