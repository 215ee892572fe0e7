"""Two-stage token pruning, pure torch: configs, knee detectors, stage-1 and stage-2 selection, and
the token-layer accounting (:mod:`tpkit.pruning.budgets`).

Names are resolved on first use: ``tpkit.pruning.config`` (the dataclasses) imports without torch,
so a config file can be checked before any heavy import.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "PruningConfig": "tpkit.pruning.config",
    "Stage1Config": "tpkit.pruning.config",
    "Stage2Config": "tpkit.pruning.config",
    "kneedle": "tpkit.pruning.knee",
    "curvature": "tpkit.pruning.knee",
    "iqr_count": "tpkit.pruning.knee",
    "head_count": "tpkit.pruning.knee",
    "cls_cosine": "tpkit.pruning.stage1",
    "cls_attention": "tpkit.pruning.stage1",
    "mean_cosine": "tpkit.pruning.stage1",
    "attention_received": "tpkit.pruning.stage1",
    "tower_attention_received": "tpkit.pruning.stage1",
    "random_scores": "tpkit.pruning.stage1",
    "patch_scores": "tpkit.pruning.stage1",
    "encoder_attention": "tpkit.pruning.stage1",
    "select_patches": "tpkit.pruning.stage1",
    "context_merge": "tpkit.pruning.stage1",
    "merge_into": "tpkit.pruning.stage1",
    "relevance": "tpkit.pruning.stage2",
    "select_tokens": "tpkit.pruning.stage2",
    "token_layer_fraction": "tpkit.pruning.budgets",
    "solve_stage2_keep": "tpkit.pruning.budgets",
    "scale_stage1_keep": "tpkit.pruning.budgets",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'tpkit.pruning' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)
