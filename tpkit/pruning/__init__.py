"""Two-stage token pruning, pure torch: configs, knee detectors, stage-1 and stage-2 selection."""

from tpkit.pruning.config import PruningConfig, Stage1Config, Stage2Config
from tpkit.pruning.knee import curvature, head_count, iqr_count, kneedle
from tpkit.pruning.stage1 import cls_attention, cls_cosine, random_scores, select_patches
from tpkit.pruning.stage2 import relevance, select_tokens

__all__ = [
    "PruningConfig",
    "Stage1Config",
    "Stage2Config",
    "kneedle",
    "curvature",
    "iqr_count",
    "head_count",
    "cls_cosine",
    "cls_attention",
    "random_scores",
    "select_patches",
    "relevance",
    "select_tokens",
]
