"""Independent references for the Qwen and InternVL tests: the stock model's own LM input (embeddings
and position ids, read off a stock forward), and the family-generic masked full-sequence forward
(:mod:`tests.models.reference`) whose masks, built from scratch, leave the dropped tokens out as keys.
Positions are Qwen's M-RoPE ids (3, B, T) or 1-D ids (B, T)."""

from __future__ import annotations

import torch

from tests.models import reference
from tests.models.reference import greedy_reference, kept_in_prompt, masked_logits

__all__ = [
    "VISUAL_KEYS",
    "greedy_reference",
    "kept_in_prompt",
    "masked_logits",
    "model_inputs",
    "stock_lm_input",
]

VISUAL_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "pixel_values_videos",
    "video_grid_thw",
    "second_per_grid_ts",
)


def model_inputs(batch: dict) -> dict:
    keys = ("input_ids", "attention_mask", "mm_token_type_ids", *VISUAL_KEYS)
    return {k: batch[k] for k in keys if k in batch}


def stock_lm_input(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs_embeds (B, T, D), position_ids (3, B, T)) that the stock model feeds its text model; a
    model that passes none (1-D positions) gets (B, T) ids from the attention mask, as ``generate``
    builds them."""
    embeds, pos = reference.stock_lm_input(model, model_inputs(batch))
    if pos is None:
        am = batch.get("attention_mask")
        am = torch.ones_like(batch["input_ids"]) if am is None else am
        return embeds, (am.long().cumsum(dim=1) - 1).clamp(min=0)
    if pos.shape[0] == 4:  # text positions first (packed layouts)
        pos = pos[1:]
    return embeds, pos
