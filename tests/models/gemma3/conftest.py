"""Tiny random Gemma 3 models and left-padded batches laid out as Gemma's processor does.

* ``gemma_factory(attn="sdpa", seed=0, **config_kwargs)`` -> a fresh tiny model (eval, fp32, random
  projector): SigLIP 32 px, patch 4 (8 x 8 patches pooled 2 x 2 to 16 tokens per image), 4 LM layers of
  width 64 (layer 2 global, the others a sliding window of 8 positions).
* ``build_gemma_batch(model, samples, seed=0, answer=None)``: ``samples`` is one list of segments per
  sample, each ``("text", n)`` or ``("image", None)``; a sample starts with ``<bos>``, an image becomes
  ``<start_of_image>`` + 16 placeholders + ``<end_of_image>`` (a pan-and-scan crop is one more image).
  Returns ``input_ids``, ``attention_mask``, ``token_type_ids`` (B, T) left-padded, ``pixel_values``
  (images, 3, 32, 32) in prompt order, and ``answer_mask`` when ``answer`` gives per-sample answer
  lengths (the last tokens).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import torch

from tpkit.models.gemma3.tiny import build_tiny_gemma3

PAD, FIRST_TEXT_ID, LAST_TEXT_ID = 0, 4, 149  # the tiny vocabulary's ordinary ids (specials at 150..152)


def build_gemma_batch(
    model, samples: Sequence[Sequence[tuple]], seed: int = 0, answer: Sequence[int] | None = None
):
    cfg = model.config
    side = cfg.vision_config.image_size
    n_units = cfg.mm_tokens_per_image
    g = torch.Generator().manual_seed(seed)
    rows, images = [], []
    for i, segments in enumerate(samples):
        ids = [cfg.text_config.bos_token_id]
        segments = list(segments) + ([("text", answer[i])] if answer is not None else [])
        for what, n in segments:
            if what == "text":
                ids += torch.randint(FIRST_TEXT_ID, LAST_TEXT_ID + 1, (n,), generator=g).tolist()
            else:
                ids += [cfg.boi_token_id] + [cfg.image_token_id] * n_units + [cfg.eoi_token_id]
                images.append(torch.randn(3, side, side, generator=g))
        rows.append(ids)
    b, t = len(rows), max(len(r) for r in rows)
    input_ids = torch.full((b, t), PAD, dtype=torch.long)
    attention_mask = torch.zeros(b, t, dtype=torch.long)
    answer_mask = torch.zeros(b, t, dtype=torch.bool)
    for i, r in enumerate(rows):
        input_ids[i, t - len(r) :] = torch.tensor(r)
        attention_mask[i, t - len(r) :] = 1
        if answer is not None and answer[i]:
            answer_mask[i, t - answer[i] :] = True
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "token_type_ids": (input_ids == cfg.image_token_id).long(),
        "pixel_values": torch.stack(images),
    }
    if answer is not None:
        batch["answer_mask"] = answer_mask
    return batch


def model_inputs(batch: dict) -> dict:
    keys = ("input_ids", "attention_mask", "token_type_ids", "pixel_values")
    return {k: batch[k] for k in keys if k in batch}


def stock_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """The position ids stock ``generate`` builds from the attention mask (pads 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@pytest.fixture
def gemma_factory() -> Callable:
    def make(attn: str = "sdpa", seed: int = 0, **kwargs):
        return build_tiny_gemma3(seed=seed, attn_implementation=attn, **kwargs)

    return make


@pytest.fixture
def make_gemma_batch() -> Callable:
    return build_gemma_batch
