"""Tiny random InternVL models and left-padded batches laid out as InternVL's processor lays them out.

* ``internvl_factory(attn="sdpa", seed=0, **config_kwargs)`` -> a fresh tiny model (eval, fp32): 32 px
  tiles of 8 x 8 patches, pixel-shuffled to 16 tokens a tile, 2 tower layers, 4 LM layers of width 64
  (:func:`tpkit.models.internvl.tiny.build_tiny_internvl`).
* ``build_internvl_batch(model, samples, seed=0, answer=None)``: ``samples`` is one list of segments per
  sample, each ``("text", n)``, ``("image", tiles)`` (an image's tiles, its thumbnail included) or
  ``("video", frames)``. An image becomes ``<img>`` + its tiles' placeholders + ``</img>``; a video
  ``Frame{i}: <img> ... </img>\\n`` per frame, one tile each (``Frame1:`` and ``\\n`` as one random text
  token each). Returns ``input_ids``, ``attention_mask`` (B, T) left-padded, ``pixel_values``
  (tiles, 3, 32, 32) in prompt order, and ``answer_mask`` when ``answer`` gives per-sample answer
  lengths (the last tokens).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import torch

from tpkit.models.internvl.tiny import MARKERS_ATTR, build_tiny_internvl, tokens_per_tile

PAD, FIRST_TEXT_ID = 0, 8  # the tiny vocabulary: specials at 0..7 (<img> 5, </img> 6, <IMG_CONTEXT> 7)


def build_internvl_batch(
    model, samples: Sequence[Sequence[tuple]], seed: int = 0, answer: Sequence[int] | None = None
):
    cfg = model.config
    vocab = cfg.text_config.vocab_size
    start, end = getattr(cfg, MARKERS_ATTR)
    per_tile = tokens_per_tile(cfg)
    side = cfg.vision_config.image_size[0]
    g = torch.Generator().manual_seed(seed)

    def text(n: int) -> list[int]:
        return torch.randint(FIRST_TEXT_ID, vocab, (n,), generator=g).tolist()

    rows, tiles = [], 0
    for i, segments in enumerate(samples):
        ids: list[int] = []
        for what, size in list(segments) + ([("text", answer[i])] if answer is not None else []):
            if what == "text":
                ids += text(size)
            elif what == "image":
                ids += [start] + [cfg.image_token_id] * (per_tile * size) + [end]
                tiles += size
            else:  # a video: frames one after the other, one tile each
                for _ in range(size):
                    ids += text(1) + [start] + [cfg.image_token_id] * per_tile + [end] + text(1)
                tiles += size
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
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if tiles:
        batch["pixel_values"] = torch.randn(tiles, 3, side, side, generator=g)
    if answer is not None:
        batch["answer_mask"] = answer_mask
    return batch


def model_inputs(batch: dict) -> dict:
    return {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values") if k in batch}


def sample_alone(batch: dict, b: int, tiles: Sequence[int]) -> dict:
    """Sample ``b`` of a batch, unpadded, with its own tiles (``tiles``: tiles per sample)."""
    am = batch["attention_mask"][b].bool()
    first = sum(tiles[:b])
    return {
        "input_ids": batch["input_ids"][b : b + 1, am],
        "attention_mask": batch["attention_mask"][b : b + 1, am],
        "pixel_values": batch["pixel_values"][first : first + tiles[b]],
    }


@pytest.fixture
def internvl_factory() -> Callable:
    def make(attn: str = "sdpa", seed: int = 0, **kwargs):
        return build_tiny_internvl(seed=seed, attn_implementation=attn, **kwargs)

    return make


@pytest.fixture
def make_internvl_batch() -> Callable:
    return build_internvl_batch
