"""Labels of a causal LM batch: which token each output position must predict.

Shared by the training losses, the pruned forward's ``loss`` and the lmms-eval harness: once tokens
are dropped, output positions no longer line up with the input, so targets are read through the
kept positions' original indices.
"""

from __future__ import annotations

import torch

__all__ = ["IGNORE_INDEX", "next_token_targets"]

IGNORE_INDEX = -100  # label of a position that is not supervised (prompt, padding)


def next_token_targets(labels: torch.Tensor, kept_index: torch.Tensor | None = None) -> torch.Tensor:
    """The target of each output position: the label of the token after it, IGNORE_INDEX where none.

    labels (B, T) unshifted (``labels[b, t] = input_ids[b, t]`` on answer tokens, else IGNORE_INDEX);
    kept_index (B, T_out): original index of each output position, -1 = padding (None: unpruned).
    Position j predicts ``labels[b, kept_index[b, j] + 1]``. Returns (B, T_out) long.
    """
    b, t = labels.shape
    if kept_index is None:
        kept_index = torch.arange(t, device=labels.device).expand(b, t)
    nxt = kept_index + 1
    valid = (kept_index >= 0) & (nxt < t)
    target = labels.gather(1, nxt.clamp(0, t - 1))
    return torch.where(valid, target, torch.full_like(target, IGNORE_INDEX))
