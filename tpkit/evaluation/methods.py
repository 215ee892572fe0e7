"""Methods compared by an evaluation run, as pruner configurations plus forced per-sample counts.

Every baseline changes one thing relative to ``ours`` and matches the rest, so a difference in
accuracy is attributable (per-sample counts come from ``ours``' own run, see
:mod:`tpkit.pruning.budgets`):

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

torch is imported inside the functions that compute counts: the evaluation config checks method
names against :data:`METHODS` before anything heavy loads.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from tpkit.pruning.budgets import scale_stage1_keep, solve_stage2_keep
from tpkit.pruning.config import PruningConfig

if TYPE_CHECKING:
    import torch

__all__ = ["METHODS", "Method", "MethodSpec", "OursStats", "method_spec", "sweep_spec", "fastv_config"]


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


def _dense(ours: PruningConfig, stats: OursStats | None, num_layers: int, fastv_layer: int) -> MethodSpec:
    return MethodSpec("dense", "dense", PruningConfig.disabled())


def _ours(ours: PruningConfig, stats: OursStats | None, num_layers: int, fastv_layer: int) -> MethodSpec:
    return MethodSpec("ours", "ours", copy.deepcopy(ours))


def _ours_s1(ours: PruningConfig, stats: OursStats | None, num_layers: int, fastv_layer: int) -> MethodSpec:
    cfg = copy.deepcopy(ours)
    cfg.stage2.enabled = False
    return MethodSpec("ours-s1", "ours-s1", cfg)


def _prumerge_iqr(
    ours: PruningConfig, stats: OursStats | None, num_layers: int, fastv_layer: int
) -> MethodSpec:
    cfg = by_score(copy.deepcopy(ours))
    cfg.stage1.enabled = True
    cfg.stage1.score = "cls_attn"
    cfg.stage1.selector = "iqr"
    cfg.stage2.enabled = False
    return MethodSpec("prumerge-iqr", "prumerge-iqr", cfg)


def fastv_config(ours: PruningConfig, layer: int) -> PruningConfig:
    """FastV: no stage 1; at ``layer`` the last token's attention ranks the image tokens only."""
    cfg = copy.deepcopy(ours)
    cfg.stage1.enabled = False
    cfg.stage2.enabled = True
    cfg.stage2.layer = layer
    cfg.stage2.query = "last"
    cfg.stage2.prune_text = False  # FastV drops image tokens only
    cfg.stage2.diversity = 0.0  # and keeps the most attended ones
    return cfg


def by_score(cfg: PruningConfig) -> PruningConfig:
    """``cfg`` with stage 1's kept set back to the head of its score order (no ``diversity``, no
    ``context_tokens``): the baselines keep their published rule and change only their score or count."""
    cfg.stage1.diversity = 0.0
    cfg.stage1.context_tokens = 0
    return cfg


def _random(ours: PruningConfig, stats: OursStats, num_layers: int, fastv_layer: int) -> MethodSpec:
    cfg = by_score(copy.deepcopy(ours))
    cfg.stage1.score = "random"
    k2 = stats.k2.clone() if ours.stage2.enabled else None
    return MethodSpec("random", "random", cfg, stats.k1.clone(), k2)


def _topk_cls(ours: PruningConfig, stats: OursStats, num_layers: int, fastv_layer: int) -> MethodSpec:
    import torch

    cfg = by_score(copy.deepcopy(ours))
    k = int(torch.round(stats.k1.double().mean()).clamp(min=1))
    k1 = torch.minimum(torch.full_like(stats.k1, k), stats.n_visual)
    cfg.stage1.score = "cosine"
    k2 = torch.minimum(stats.k2, stats.n_text + k1) if ours.stage2.enabled else None
    return MethodSpec("topk-cls", "topk-cls", cfg, k1, k2)


def _fastv(ours: PruningConfig, stats: OursStats, num_layers: int, fastv_layer: int) -> MethodSpec:
    import torch

    k2 = solve_stage2_keep(stats.fraction, stats.n_dense, stats.n_dense, num_layers, fastv_layer)
    k2 = torch.maximum(k2, stats.n_dense - stats.n_visual)  # text is never dropped by FastV
    return MethodSpec("fastv", "fastv", fastv_config(ours, fastv_layer), None, k2)


@dataclass(frozen=True)
class Method:
    """One entry of the registry: what ``eval.methods`` (and the harness) accept by name."""

    name: str
    label: str  # its row in reports
    kind: Literal["dense", "ours", "baseline"]
    needs_ours: bool  # built from ours' per-sample counts (matched budgets): ours runs first
    sweep: bool  # may be a family of the budget sweep (``eval.sweep_methods``)
    build: Callable[[PruningConfig, OursStats | None, int, int], MethodSpec]
    cls_only: bool = False  # scores patches against the tower's CLS token: CLIP towers only


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("dense", "dense", "dense", False, False, _dense),
        Method("ours-s1", "ours, stage 1 only", "ours", False, False, _ours_s1),
        Method("ours", "ours", "ours", False, True, _ours),
        Method("random", "random (matched)", "baseline", True, True, _random),
        Method("topk-cls", "topk-cls (matched mean K)", "baseline", True, True, _topk_cls, cls_only=True),
        Method("fastv", "fastv (matched)", "baseline", True, True, _fastv),
        Method("prumerge-iqr", "prumerge-iqr", "baseline", False, False, _prumerge_iqr, cls_only=True),
    )
}


def check_methods(family, model, names) -> None:
    """ValueError, before anything runs, for a method the model's family cannot run (a CLS-based
    baseline on a tower without CLS), naming the methods that apply."""
    if family.has_cls(model):
        return
    bad = [n for n in names if n in METHODS and METHODS[n].cls_only]
    if bad:
        ok = [m.name for m in METHODS.values() if not m.cls_only]
        raise ValueError(
            f"eval.methods {bad} score patches against the CLS token, which {type(model).__name__}'s vision "
            f"tower does not have: leave them out (methods that apply: {', '.join(ok)})"
        )


def method_spec(
    name: str,
    ours: PruningConfig,
    stats: OursStats | None = None,
    num_layers: int = 0,
    fastv_layer: int = 2,
) -> MethodSpec:
    """The run of method ``name``: ``ours`` is ours' pruning config; the matched baselines need
    ``stats`` (ours' per-sample counts) and the language model's ``num_layers``."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
    method = METHODS[name]
    if method.needs_ours and stats is None:
        raise ValueError(f"method {name!r} is matched to ours' per-sample counts: run ours first")
    return method.build(ours, stats, num_layers, fastv_layer)


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
    import torch

    if family not in METHODS or not METHODS[family].sweep:
        sweepable = [m.name for m in METHODS.values() if m.sweep]
        raise ValueError(f"{family!r} cannot be swept (sweep families: {', '.join(sweepable)})")
    name = f"{family}@{budget:g}"
    if family == "fastv":
        k2 = solve_stage2_keep(budget, stats.n_dense, stats.n_dense, num_layers, fastv_layer)
        k2 = torch.maximum(k2, stats.n_dense - stats.n_visual)
        return MethodSpec(name, family, fastv_config(ours, fastv_layer), None, k2, budget)
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
        # never below stage1.min_keep, the knee's own floor: a budget that needs fewer patches is
        # missed, and budget_gap_tokens says by how much
        return torch.minimum(k1.clamp(min=max(1, ours.stage1.min_keep)), stats.n_visual)

    k1 = feasible(scale_stage1_keep(stats.k1, stats.n_text, stats.n_visual, min(1.0, stage1_factor * budget)))
    if family == "topk-cls":  # one K for every image: the mean of ours' counts at this budget
        k1 = feasible(torch.full_like(k1, int(torch.round(k1.double().mean()))))
    k2 = solve_stage2_keep(budget, stats.n_dense, stats.n_text + k1, num_layers, layer)
    cfg = copy.deepcopy(ours)
    cfg.stage2.enabled = True
    if family == "random":
        cfg = by_score(cfg)
        cfg.stage1.score = "random"
    elif family == "topk-cls":
        cfg = by_score(cfg)
        cfg.stage1.score = "cosine"
    elif family != "ours":
        raise ValueError(f"unknown sweep family {family!r}")
    return MethodSpec(name, family, cfg, k1, k2, budget)
