"""Methods compared by an evaluation run, as pruner configurations plus forced per-sample counts.

Every baseline changes one thing relative to ``ours`` and matches the rest, so a difference in
accuracy is attributable (per-sample counts come from ``ours``' own run, see
:mod:`tpkit.evaluation.budgets`):

- ``dense``: pruning off (stock model).
- ``ours``: ``cfg.pruning`` (stage 1 + 2); ``ours-s1``: the same with stage 2 off.
- ``random``: stage-1 score ``random`` with ``stage1_keep`` = ours' per-sample ``k1`` and
  ``stage2_keep`` = ours' per-sample ``k2`` (same stage 2).
- ``topk-cls`` (FasterVLM-like): cosine top-K with one fixed ``K = round(mean k1 of ours)`` for every
  image, then ours' stage 2 with ours' ``k2`` (capped at what stage 1 left).
- ``fastv``: no stage 1; stage 2 with FastV's last-token query at layer ``eval.fastv_layer``, visual
  tokens only, ``stage2_keep`` solved per sample so its token-layer fraction equals ours'.
- ``prumerge-iqr``: stage-1 score ``cls_attn`` with PruMerge's IQR outlier selection, no merge,
  no stage 2 (compare with ``ours-s1``).
- ``<family>@<f>`` (budget sweep, families ours/random/topk-cls/fastv): every sample at token-layer
  fraction ``f``. Stage 1 keeps ours' dynamic ``k1`` scaled by one factor so that the mean stage-1
  prompt is ``sweep_stage1_factor * f`` of the dense prompt; stage 2 keeps the count that lands on
  ``f``. ``random@f`` uses the same two counts, ``topk-cls@f`` one K (their mean) for every image,
  ``fastv@f`` solves its single count for ``f``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from tpkit.evaluation.budgets import scale_stage1_keep, solve_stage2_keep
from tpkit.pruning import PruningConfig

__all__ = ["MethodSpec", "OursStats", "base_spec", "matched_spec", "sweep_spec", "NEEDS_OURS"]

NEEDS_OURS = ("random", "topk-cls", "fastv")


@dataclass
class MethodSpec:
    """One run: a pruner config and optional forced counts over the whole dataset (N,)."""

    name: str
    family: str
    pruning: PruningConfig
    stage1_keep: torch.Tensor | None = None  # (N,) long
    stage2_keep: torch.Tensor | None = None  # (N,) long
    budget: float | None = None  # target token-layer fraction (sweep runs)

    def forced(self, index: torch.Tensor | list[int], device: torch.device | str = "cpu") -> dict:
        """``stage1_keep`` / ``stage2_keep`` kwargs for the samples ``index`` of a batch."""
        out = {}
        if self.stage1_keep is not None:
            out["stage1_keep"] = self.stage1_keep[index].to(device)
        if self.stage2_keep is not None:
            out["stage2_keep"] = self.stage2_keep[index].to(device)
        return out


@dataclass
class OursStats:
    """Per-sample token counts of the ``ours`` run over the dataset (N,)."""

    n_dense: torch.Tensor
    n_visual: torch.Tensor
    k1: torch.Tensor
    n_prompt: torch.Tensor  # after stage 1: text + k1
    k2: torch.Tensor
    fraction: torch.Tensor  # token-layer fraction

    @property
    def n_text(self) -> torch.Tensor:
        return self.n_prompt - self.k1


def base_spec(name: str, ours: PruningConfig) -> MethodSpec:
    """Specs that need no counts from ours' run: dense, ours, ours-s1, prumerge-iqr."""
    cfg = copy.deepcopy(ours)
    if name == "dense":
        return MethodSpec(name, name, PruningConfig.disabled())
    if name == "ours":
        return MethodSpec(name, name, cfg)
    if name == "ours-s1":
        cfg.stage2.enabled = False
        return MethodSpec(name, name, cfg)
    if name == "prumerge-iqr":
        cfg.stage1.enabled = True
        cfg.stage1.score = "cls_attn"
        cfg.stage1.selector = "iqr"
        cfg.stage2.enabled = False
        return MethodSpec(name, name, cfg)
    raise ValueError(f"{name!r} needs ours' counts: use matched_spec")


def _fastv_cfg(ours: PruningConfig, layer: int) -> PruningConfig:
    cfg = copy.deepcopy(ours)
    cfg.stage1.enabled = False
    cfg.stage2.enabled = True
    cfg.stage2.layer = layer
    cfg.stage2.query = "last"
    cfg.stage2.prune_text = False  # FastV drops image tokens only
    cfg.stage2.diversity = 0.0  # and keeps the most attended ones
    return cfg


def matched_spec(
    name: str, ours: PruningConfig, stats: OursStats, num_layers: int, fastv_layer: int
) -> MethodSpec:
    """random / topk-cls / fastv with budgets matched per sample to ours' run."""
    cfg = copy.deepcopy(ours)
    s2_on = ours.stage2.enabled
    if name == "random":
        cfg.stage1.score = "random"
        return MethodSpec(name, name, cfg, stats.k1.clone(), stats.k2.clone() if s2_on else None)
    if name == "topk-cls":
        k = int(torch.round(stats.k1.double().mean()).clamp(min=1))
        k1 = torch.minimum(torch.full_like(stats.k1, k), stats.n_visual)
        cfg.stage1.score = "cosine"
        k2 = torch.minimum(stats.k2, stats.n_text + k1) if s2_on else None
        return MethodSpec(name, name, cfg, k1, k2)
    if name == "fastv":
        k2 = solve_stage2_keep(stats.fraction, stats.n_dense, stats.n_dense, num_layers, fastv_layer)
        k2 = torch.maximum(k2, stats.n_dense - stats.n_visual)  # text is never dropped by FastV
        return MethodSpec(name, name, _fastv_cfg(ours, fastv_layer), None, k2)
    raise ValueError(f"unknown matched method {name!r}")


def sweep_spec(
    family: str,
    budget: float,
    ours: PruningConfig,
    stats: OursStats,
    num_layers: int,
    fastv_layer: int,
    stage1_factor: float,
) -> MethodSpec:
    """``<family>@<budget>``: every sample at token-layer fraction ``budget`` (see module doc)."""
    name = f"{family}@{budget:g}"
    if family == "fastv":
        k2 = solve_stage2_keep(budget, stats.n_dense, stats.n_dense, num_layers, fastv_layer)
        k2 = torch.maximum(k2, stats.n_dense - stats.n_visual)
        return MethodSpec(name, family, _fastv_cfg(ours, fastv_layer), None, k2, budget)
    layer = ours.stage2.layer
    # keep every sample feasible: its stage-1 prompt must hold at least budget * n_dense tokens (else
    # even keeping everything at stage 2 falls short) and leave stage 2 room above the text it
    # protects (at most n_text). Matters for shallow LMs, where the K layers before stage 2 weigh a lot.
    n_dense, n_text = stats.n_dense.double(), stats.n_text.double()
    k1_min = (torch.ceil(budget * n_dense) - n_text).long()
    n1_max = (budget * num_layers * n_dense - (num_layers - layer) * n_text) / max(layer, 1)
    k1_max = n1_max.floor().long() - stats.n_text

    def feasible(k1: torch.Tensor) -> torch.Tensor:
        k1 = torch.minimum(torch.maximum(k1, k1_min), k1_max)
        return torch.minimum(k1.clamp(min=1), stats.n_visual)

    k1 = feasible(scale_stage1_keep(stats.k1, stats.n_text, stats.n_visual, min(1.0, stage1_factor * budget)))
    if family == "topk-cls":  # one K for every image: the mean of ours' counts at this budget
        k1 = feasible(torch.full_like(k1, int(torch.round(k1.double().mean()))))
    k2 = solve_stage2_keep(budget, stats.n_dense, stats.n_text + k1, num_layers, layer)
    cfg = copy.deepcopy(ours)
    cfg.stage2.enabled = True
    if family == "random":
        cfg.stage1.score = "random"
    elif family == "topk-cls":
        cfg.stage1.score = "cosine"
    elif family != "ours":
        raise ValueError(f"unknown sweep family {family!r}")
    return MethodSpec(name, family, cfg, k1, k2, budget)


def fixed_budget_counts(
    n_text: int, n_visual: int, num_layers: int, layer: int, budget: float, stage1_factor: float
) -> tuple[int, int]:
    """(k1, k2) for one prompt shape at token-layer fraction ``budget`` (random-init speed runs):
    stage 1 keeps ``stage1_factor * budget`` of the dense prompt, stage 2 the rest."""
    n_dense = n_text + n_visual
    target_n1 = min(1.0, stage1_factor * budget) * n_dense
    k1 = int(min(n_visual, max(1, round(target_n1 - n_text))))
    k2 = solve_stage2_keep(budget, torch.tensor([n_dense]), torch.tensor([n_text + k1]), num_layers, layer)
    return k1, int(k2[0])


__all__ += ["fixed_budget_counts"]
