"""Per-sample token budgets: token-layer fractions and the counts that match them.

Notation, per sample: ``n_dense`` prompt tokens in the stock model, ``n1`` prompt tokens after
stage 1 (text + ``k1`` visual), ``k2`` prompt tokens after stage 2 at decoder layer ``K`` of ``L``.
Layers ``0..K-1`` see ``n1`` tokens, layers ``K..L-1`` see ``k2``, so

    token_layer_fraction = (K * n1 + (L - K) * k2) / (L * n_dense)

Baselines are matched to ``ours`` by solving this for the one count they control.

torch is imported inside the functions: the evaluation config checks method names through
:mod:`tpkit.evaluation.methods`, which imports this module, before anything heavy loads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["token_layer_fraction", "solve_stage2_keep", "scale_stage1_keep", "fixed_budget_counts"]


def token_layer_fraction(
    n_dense: torch.Tensor, n1: torch.Tensor, k2: torch.Tensor | None, num_layers: int, layer: int
) -> torch.Tensor:
    """Token-layer fraction per sample (B,); ``k2=None`` means no stage 2 (every layer sees ``n1``)."""

    n_dense, n1 = n_dense.double(), n1.double()
    if k2 is None:
        return n1 / n_dense
    return (layer * n1 + (num_layers - layer) * k2.double()) / (num_layers * n_dense)


def solve_stage2_keep(
    target_fraction: torch.Tensor | float,
    n_dense: torch.Tensor,
    n1: torch.Tensor,
    num_layers: int,
    layer: int,
    min_keep: int = 1,
) -> torch.Tensor:
    """The stage-2 kept count per sample (B,) that gives ``target_fraction`` (rounded, clamped).

    FastV matched to ours: ``n1 = n_dense`` (no stage 1) and ``target_fraction`` = ours' per-sample
    fraction; the rounding error is at most half a token on each of the ``L - K`` late layers.
    """
    import torch

    if not 0 <= layer < num_layers:
        raise ValueError(f"stage-2 layer {layer} is outside 0..{num_layers - 1}")
    n_dense, n1 = n_dense.double(), n1.double()
    f = torch.as_tensor(target_fraction, dtype=torch.float64)
    k2 = (f * num_layers * n_dense - layer * n1) / (num_layers - layer)
    k2 = torch.round(k2)
    return torch.minimum(k2.clamp(min=min_keep), n1).long()


def scale_stage1_keep(
    k1: torch.Tensor, n_text: torch.Tensor, n_visual: torch.Tensor, target_fraction: float, min_keep: int = 1
) -> torch.Tensor:
    """Scale per-sample stage-1 counts by one factor so the mean of ``(n_text + k1') / n_dense``
    reaches ``target_fraction`` (clamped to ``[min_keep, n_visual]``); keeps the per-image ranking
    of the dynamic counts. Used by the budget sweep to move ``ours`` along the curve.
    """
    import torch

    k1, n_text, n_visual = k1.double(), n_text.double(), n_visual.double()
    n_dense = n_text + n_visual

    def counts(c: float) -> torch.Tensor:
        return torch.minimum(torch.round(k1 * c).clamp(min=min_keep), n_visual)

    def frac(c: float) -> float:
        return float(((n_text + counts(c)) / n_dense).mean())

    lo, hi = 0.0, 1.0
    while frac(hi) < target_fraction and hi < 1e6:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        if frac(mid) < target_fraction:
            lo = mid
        else:
            hi = mid
    return counts(hi).long()


def fixed_budget_counts(
    n_text: int, n_visual: int, num_layers: int, layer: int, budget: float, stage1_factor: float
) -> tuple[int, int]:
    """(k1, k2) for one prompt shape at token-layer fraction ``budget`` (random-init speed runs):
    stage 1 keeps ``stage1_factor * budget`` of the dense prompt, stage 2 the rest."""
    import torch

    n_dense = n_text + n_visual
    target_n1 = min(1.0, stage1_factor * budget) * n_dense
    k1 = int(min(n_visual, max(1, round(target_n1 - n_text))))
    k2 = solve_stage2_keep(budget, torch.tensor([n_dense]), torch.tensor([n_text + k1]), num_layers, layer)
    return k1, int(k2[0])
