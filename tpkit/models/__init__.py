"""Model loading, the pruner attached to stock LLaVA models, and tiny test models."""

from tpkit.models.pruned_llava import (
    PrunedLlavaOutput,
    attach_pruner,
    detach_pruner,
    is_attached,
    last_stats,
    pruned_lm_loss,
    pruning_disabled,
    set_pruning,
    stage1_scores,
)

__all__ = [
    "attach_pruner",
    "detach_pruner",
    "set_pruning",
    "pruning_disabled",
    "last_stats",
    "is_attached",
    "PrunedLlavaOutput",
    "stage1_scores",
    "pruned_lm_loss",
]
