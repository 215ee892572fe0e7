"""What an attached pruner keeps on its model: one small object, set and cleared in one place.

:func:`tpkit.models.core.attach.attach` sets it (``model._tpkit``), ``detach_pruner`` removes it; the
prefill, the decoding step and the compiler read it through :func:`state_of`. Keeping the family,
the config, the on/off count, the last accounting and the compiled regions together (as peft keeps an
adapter's config and its active state together) means detaching cannot forget one of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from tpkit.models.core.family import Family
from tpkit.pruning.config import PruningConfig

__all__ = ["ATTR", "PrunerState", "find_state", "state_of"]

ATTR = "_tpkit"  # the one attribute an attached model carries (transformers uses _tp_plan, _tp_size)


@dataclass
class PrunerState:
    """The pruner attached to one model."""

    family: Family
    config: PruningConfig
    base_class: type  # the stock class, restored by detach_pruner
    off: int = 0  # nesting depth of pruning_disabled blocks
    stats: dict[str, Any] | None = None  # token accounting of the last pruned prefill (last_stats)
    compiled: dict[str, Callable] | None = None  # compile_model's prefill layer groups and decoding step

    @property
    def active(self) -> bool:
        """Whether forward and generate prune now."""
        return self.config.enabled and self.off == 0


def find_state(model: nn.Module) -> PrunerState | None:
    """The pruner state of ``model`` (not a PEFT wrapper: unwrap first), None when none is attached."""
    return model.__dict__.get(ATTR)


def state_of(model: nn.Module) -> PrunerState:
    """The pruner state of ``model``; ValueError when no pruner is attached."""
    state = find_state(model)
    if state is None:
        raise ValueError(f"{type(model).__name__} has no pruner attached (call attach_pruner first)")
    return state
