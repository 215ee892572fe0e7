"""Models: loading (hub id, local directory or a random tiny model), the pruner attached to stock
``transformers`` models, and the families it supports.

    from tpkit.models import attach_pruner, last_stats, load_base_model

Names are resolved on first use, so ``tpkit.models.config`` imports without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "attach_pruner": "tpkit.models.families",
    "stage1_scores": "tpkit.models.families",
    "family_of": "tpkit.models.registry",
    "families": "tpkit.models.registry",
    "build_random_init": "tpkit.models.registry",
    "detach_pruner": "tpkit.models.core.attach",
    "set_pruning": "tpkit.models.core.attach",
    "pruning_disabled": "tpkit.models.core.attach",
    "pruning_config": "tpkit.models.core.attach",
    "last_stats": "tpkit.models.core.attach",
    "is_attached": "tpkit.models.core.attach",
    "PrunedOutput": "tpkit.models.core.attach",
    "ModelConfig": "tpkit.models.config",
    "load_base_model": "tpkit.models.loading",
    "load_model": "tpkit.models.loading",
    "load_processor": "tpkit.models.loading",
    "load_exported": "tpkit.models.loading",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'tpkit.models' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)
