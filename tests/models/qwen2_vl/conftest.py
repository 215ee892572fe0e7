"""Tiny random Qwen2-VL / Qwen2.5-VL models and left-padded batches laid out as Qwen's processor does.

* ``qwen_factory(variant="qwen2.5-vl", attn="sdpa", seed=0, **config_kwargs)`` -> a fresh tiny model
  (eval, fp32): patch 2, 2x2 merge, 4 tower blocks, 4 LM layers of width 64.
* ``build_qwen_batch(model, samples, seed=0, answer=None, frame_text=None)``: ``samples`` is one list of
  segments per sample, each ``("text", n)``, ``("image", (h, w))`` or ``("video", (t, h, w))`` in
  patches; a visual segment becomes ``<|vision_start|>`` + one placeholder per merged unit +
  ``<|vision_end|>``, or, with ``frame_text`` (Qwen3-VL's layout), a video is one such run per frame
  (temporal patch), each after ``frame_text`` text tokens (its timestamp, ``<0.5 seconds>``). Returns
  ``input_ids``, ``attention_mask``, ``mm_token_type_ids`` (B, T) left-padded, the pixels of every image
  (``pixel_values`` (patches, 24), ``image_grid_thw``) and video in batch order, ``second_per_grid_ts``
  for Qwen2.5-VL videos, and ``answer_mask`` when ``answer`` gives per-sample answer lengths (the last
  tokens).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import torch

from tpkit.models.qwen2_vl.tiny import build_tiny_qwen

PAD, FIRST_TEXT_ID, LAST_TEXT_ID = 0, 4, 149  # the tiny vocabulary's ordinary ids (specials at 150..153)


def build_qwen_batch(
    model,
    samples: Sequence[Sequence[tuple]],
    seed: int = 0,
    answer: Sequence[int] | None = None,
    frame_text: int | None = None,
):
    cfg = model.config
    vc = cfg.vision_config
    merge = vc.spatial_merge_size
    width = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
    g = torch.Generator().manual_seed(seed)
    rows, types = [], []
    images, image_grids, videos, video_grids = [], [], [], []
    for i, segments in enumerate(samples):
        ids: list[int] = []
        kind: list[int] = []
        segments = list(segments) + ([("text", answer[i])] if answer is not None else [])
        for what, size in segments:
            if what == "text":
                ids += torch.randint(FIRST_TEXT_ID, LAST_TEXT_ID + 1, (size,), generator=g).tolist()
                kind += [0] * size
                continue
            t, h, w = (1, *size) if what == "image" else size
            units = t * (h // merge) * (w // merge)
            token, code = (cfg.image_token_id, 1) if what == "image" else (cfg.video_token_id, 2)
            framed = what == "video" and frame_text is not None
            runs = t if framed else 1
            for _ in range(runs):
                if framed:
                    ids += torch.randint(FIRST_TEXT_ID, LAST_TEXT_ID + 1, (frame_text,), generator=g).tolist()
                    kind += [0] * frame_text
                ids += [cfg.vision_start_token_id] + [token] * (units // runs) + [cfg.vision_end_token_id]
                kind += [0] + [code] * (units // runs) + [0]
            pixels = torch.randn(t * h * w, width, generator=g)
            (images if what == "image" else videos).append(pixels)
            (image_grids if what == "image" else video_grids).append([t, h, w])
        rows.append(ids)
        types.append(kind)
    b, t = len(rows), max(len(r) for r in rows)
    input_ids = torch.full((b, t), PAD, dtype=torch.long)
    attention_mask = torch.zeros(b, t, dtype=torch.long)
    mm_types = torch.zeros(b, t, dtype=torch.int32)
    answer_mask = torch.zeros(b, t, dtype=torch.bool)
    for i, (r, k) in enumerate(zip(rows, types)):
        input_ids[i, t - len(r) :] = torch.tensor(r)
        attention_mask[i, t - len(r) :] = 1
        mm_types[i, t - len(r) :] = torch.tensor(k, dtype=torch.int32)
        if answer is not None and answer[i]:
            answer_mask[i, t - answer[i] :] = True
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "mm_token_type_ids": mm_types}
    if images:
        batch["pixel_values"] = torch.cat(images)
        batch["image_grid_thw"] = torch.tensor(image_grids)
    if videos:
        batch["pixel_values_videos"] = torch.cat(videos)
        batch["video_grid_thw"] = torch.tensor(video_grids)
        if type(model).__name__.startswith("Qwen2_5"):
            batch["second_per_grid_ts"] = torch.tensor([1.0] * len(videos))
    if answer is not None:
        batch["answer_mask"] = answer_mask
    return batch


@pytest.fixture
def qwen_factory() -> Callable:
    def make(variant: str = "qwen2.5-vl", attn: str = "sdpa", seed: int = 0, **kwargs):
        return build_tiny_qwen(variant, seed=seed, attn_implementation=attn, **kwargs)

    return make


@pytest.fixture
def make_qwen_batch() -> Callable:
    return build_qwen_batch
