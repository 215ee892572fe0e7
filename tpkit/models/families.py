"""The public entry points that pick a model's family (:mod:`tpkit.models.registry`) and act on it."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tpkit.models.core.attach import attach, pruning_config, unwrap
from tpkit.models.registry import family_of
from tpkit.pruning.config import PruningConfig

__all__ = ["attach_pruner", "stage1_scores", "model_inputs", "device_inputs"]


def attach_pruner(model: nn.Module, config: PruningConfig | None = None) -> nn.Module:
    """Make ``model``'s forward and generate prune (two stages, ``config``); returns the same object.

    Works on the stock model or a PEFT wrapper of it; re-attaching sets ``config``. Pruning off, or a
    config that keeps every token, reproduces the stock outputs.
    """
    return attach(model, config, family_of(model))


def stage1_scores(
    model: nn.Module, pixel_values: torch.Tensor, config: Any = None, **visual: Any
) -> torch.Tensor:
    """The stage-1 score of every patch, exactly as the pruner computes it ((B, P) for LLaVA-1.5).

    ``config``: a ``PruningConfig`` or ``Stage1Config`` (default: the attached config's, else cosine);
    ``visual``: the family's other visual inputs (``image_sizes``, ``image_grid_thw``). For overlays
    and premise studies; runs the vision tower once.
    """
    inner = unwrap(model)
    if config is None:
        config = pruning_config(inner) or PruningConfig()
    visual = {"pixel_values": pixel_values, **visual}
    return family_of(inner).stage1_scores(inner, visual, getattr(config, "stage1", config))


def model_inputs(model: nn.Module, batch: dict) -> dict:
    """The entries of a batch that the model's forward takes: ids, mask and the family's visual
    inputs (pixel values, image sizes, grids, videos), those present."""
    keys = ("input_ids", "attention_mask", *family_of(model).visual_keys)
    return {k: batch[k] for k in keys if batch.get(k) is not None}


def device_inputs(model: nn.Module, batch: dict, device: torch.device | str) -> dict:
    """:func:`model_inputs` on ``device``, floating tensors (pixels) in the model's dtype."""
    dtype = next(model.parameters()).dtype
    out = {}
    for k, v in model_inputs(model, batch).items():
        if isinstance(v, torch.Tensor):
            v = v.to(device, dtype=dtype if v.is_floating_point() else None, non_blocking=True)
        out[k] = v
    return out
