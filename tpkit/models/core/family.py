"""The seam between the shared pruning core and one model family.

The core (:mod:`tpkit.models.core.prefill`) owns everything that is the same for every
``*ForConditionalGeneration`` with a decoder-only language model: compaction of the kept tokens,
masks, the decoder-layer loop, stage 2 at layer K, token accounting and generation. A family says
only what differs between model families:

* which forward arguments carry its visual inputs (``visual_keys``: pixel values, image sizes, grids);
* where its visual placeholders are in ``input_ids`` and which of them stage 1 keeps, after running
  its vision tower, scoring the patches and projecting the kept ones (:meth:`Family.encode`);
* its position ids (1-D, or 3-D M-RoPE) and how its rotary embedding rotates queries and keys
  (stage 2 scores with the layer's own q/k);
* where its language model, its LM head and its image token are.

A family is one small folder (``tpkit/models/llava``) with a :class:`Family` subclass, listed in
:mod:`tpkit.models.families`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tpkit.models.core.masks import gather_rows
from tpkit.pruning.stage2 import apply_rope

__all__ = ["Visual", "Family", "llama_rotate"]


def llama_rotate(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, qpos: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of q (B, H, Q, d) at the query positions ``qpos`` (B, Q) and of k
    (B, Hk, T, d), with the decoder's cos/sin (B, T, d): the Llama/Mistral/Qwen2 convention."""
    return apply_rope(q, gather_rows(cos, qpos), gather_rows(sin, qpos)), apply_rope(k, cos, sin)


@dataclass
class Visual:
    """What a family hands the core for one batch, stage 1 done. N = the most placeholders of any
    sample; a sample with fewer has padding slots (slot -1, never kept)."""

    slots: torch.Tensor  # (B, N) long: input position of each visual placeholder, in order; -1 = padding
    keep: torch.Tensor  # (B, N) bool: placeholders kept by stage 1 (False on padding slots)
    k1: torch.Tensor  # (B,) long: kept placeholders per sample
    projected: torch.Tensor  # (sum k1, D) LM input embeddings of the kept placeholders, row-major
    scores: (
        torch.Tensor | None
    )  # the stage-1 scores (family-shaped; for stats and overlays); None: stage 1 off
    coords: torch.Tensor  # (B, N, 3) long: (view, row, col) of each placeholder's patch; view -1: no patch


class Family:
    """One model family, as the pruning core sees it (see the module docstring)."""

    name = "family"
    classes: tuple[str, ...] = ()  # model class names this family handles
    visual_keys: tuple[str, ...] = ("pixel_values",)  # forward arguments that carry the visual inputs

    def matches(self, model: nn.Module) -> bool:
        return type(model).__name__ in self.classes

    def check(self, model: nn.Module) -> None:
        """ValueError naming what a model of this family lacks (called once, by ``attach_pruner``)."""

    def check_config(self, model: nn.Module, config: Any) -> None:
        """ValueError for pruning settings this family cannot honour (called by ``attach_pruner``)."""

    def language_model(self, model: nn.Module) -> nn.Module:
        """The decoder stack: ``layers``, ``embed_tokens``, ``norm``, ``rotary_emb``, ``config``."""
        raise NotImplementedError

    def lm_head(self, model: nn.Module) -> nn.Module:
        return model.lm_head

    def image_token_id(self, model: nn.Module) -> int:
        return int(model.config.image_token_id)

    def placeholder_ids(self, model: nn.Module) -> tuple[int, ...]:
        """Token ids of the visual placeholders in ``input_ids`` (images, video frames)."""
        return (self.image_token_id(model),)

    def has_visual(self, visual: dict[str, Any]) -> bool:
        return visual.get(self.visual_keys[0]) is not None

    def encode(
        self,
        model: nn.Module,
        input_ids: torch.Tensor,
        visual: dict[str, Any],
        stage1: Any,
        stage1_keep: torch.Tensor | None = None,
    ) -> Visual:
        """Check the inputs, run the tower once, select with ``stage1`` (a ``Stage1Config``; all kept
        when it is disabled) or the forced per-sample counts ``stage1_keep`` (B,), project the kept."""
        raise NotImplementedError

    def stage1_scores(self, model: nn.Module, visual: dict[str, Any], stage1: Any) -> torch.Tensor:
        """The stage-1 score of every patch, as :meth:`encode` computes it."""
        raise NotImplementedError

    def position_ids(
        self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, visual: dict[str, Any]
    ) -> torch.Tensor:
        """The unpruned prompt's position ids: (B, T) here, as stock ``generate`` builds them from the
        attention mask; a family with multi-dimensional positions returns (R, B, T)."""
        return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)

    def decode_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """Position ids of decoded tokens from their 1-D positions (B, q) (text: every axis the same)."""
        return positions

    # how the decoder's rotary embedding rotates q and k (stage 2 scores with the layer's own q/k)
    rotate = staticmethod(llama_rotate)
