"""Qwen3-VL through the whole pipeline with tpkit's offline ``Qwen3VLProcessor``
(:class:`tpkit.data.qwen_processor.OfflineQwen3VLProcessor`: the stock class, its PIL image processor, a PIL
video processor in place of the torchvision one): the collator's ids, pixels, grids and
``mm_token_type_ids`` are the processor's; a video's frames each carry their timestamp and markers, as
Qwen3-VL's processor writes them; ``tpkit evaluate`` runs on a ``save_pretrained`` checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tpkit.data.collator import LlavaCollator
from tpkit.data.qwen_processor import build_qwen2_vl_processor, model_token_ids
from tpkit.data.video import Video
from tpkit.models.qwen3_vl.tiny import build_tiny_qwen3

from ..pipeline import assert_keep_all_is_stock, evaluate_saved, image_records, premise_report

KEYS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")


@pytest.fixture(scope="module")
def processor():
    from tpkit.synthetic.questions import text_corpus

    # images at about 64 x 64 px: 4 x 4 patches of 16 px, 2 x 2 merged units; video frames at 32 x 32
    return build_qwen2_vl_processor(
        image_size=64, patch_size=16, corpus=text_corpus(), video_pixels=32 * 32, variant="qwen3-vl"
    )


def _model(processor, seed: int = 0, variant: str = "qwen3-vl"):
    return build_tiny_qwen3(variant, seed=seed, patch_size=16, image_size=64, vocab_size=len(processor.tokenizer),
                            **model_token_ids(processor.tokenizer))  # fmt: skip


def _records() -> list[dict]:  # record 1 holds two images
    return image_records([[(64, 64)], [(64, 96), (64, 96)], [(64, 128)]])


@pytest.mark.parametrize("variant", ["qwen3-vl", "qwen3.5"])  # Qwen3.5 takes Qwen3-VL's processor
def test_collator_ids_pixels_and_types_are_the_processors(processor, variant):
    records = _records()
    collator = LlavaCollator(processor, max_length=512, mode="train")
    batch = collator(records)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    starts = (ids == processor.vision_start_token_id).sum(1).tolist()
    assert starts == [1, 2, 1] and bool(((ids == processor.image_token_id).sum(1) > 0).all())
    assert collator.sequence_lengths(records) == mask.sum(1).tolist()
    rows = 0
    for b, r in enumerate(records):  # what the processor makes of the rendered conversation
        text = collator._texts(r)[0]
        ref = processor(text=[text], images=r["image"], return_tensors="pt")
        row = mask[b].bool()
        assert torch.equal(ids[b][row], ref["input_ids"][0])
        assert torch.equal(batch["mm_token_type_ids"][b][row], ref["mm_token_type_ids"][0])
        n = int(ref["image_grid_thw"].prod(-1).sum())
        assert torch.equal(batch["pixel_values"][rows : rows + n], ref["pixel_values"])
        rows += n
        answer = ids[b][row][batch["answer_mask"][b][row]]
        assert processor.tokenizer.decode(answer).startswith("red")
    assert_keep_all_is_stock(_model(processor, variant=variant), {k: batch[k] for k in KEYS})


def test_video_frames_carry_their_timestamps_and_markers(processor):
    """Four frames sampled at 2 per second: two temporal patches, each ``<t seconds>`` (the mean time of
    its frames) + ``<|vision_start|>`` + its units + ``<|vision_end|>``, and no markers around the whole
    video (Qwen3-VL's processor drops the chat template's); the model runs the batch."""
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 255, (4, 32, 48, 3), dtype=np.uint8)
    record = {"id": "v", "video": Video(frames, 4, 2.0, [0, 1, 2, 3]),
              "conversations": [{"from": "human", "value": "<video>\nWhat happens?"}, {"from": "gpt", "value": "red"}]}  # fmt: skip
    collator = LlavaCollator(processor, max_length=512, mode="train")
    batch = collator([record])
    text = processor.tokenizer.decode(batch["input_ids"][0])
    units = "<|video_pad|>"  # a 32 x 48 frame at the 32 x 32 px budget: 2 x 2 patches, one merged unit
    frame = "<{:.1f} seconds><|vision_start|>" + units + "<|vision_end|>"
    # frames (0, 1) and (2, 3) at 2 per second: 0.25 s and 1.25 s, written with one decimal as stock does
    assert "user\n" + frame.format(0.25) + frame.format(1.25) + "What happens?" in text
    assert text.count("<|vision_start|>") == 2 and collator.sequence_lengths([record]) == [
        batch["input_ids"].shape[1]
    ]
    assert processor.tokenizer.decode(batch["input_ids"][0][batch["answer_mask"][0]]).startswith("red")
    keys = ("input_ids", "attention_mask", "pixel_values_videos", "video_grid_thw", "mm_token_type_ids")
    assert_keep_all_is_stock(_model(processor, seed=1), {k: batch[k] for k in keys})


@pytest.mark.parametrize("variant", ["qwen3-vl", "qwen3.5"])
def test_evaluate_on_a_saved_checkpoint(processor, tmp_path, capsys, variant):
    """``tpkit evaluate`` on a tiny Qwen3-VL (Qwen3.5) written by ``save_pretrained`` with its processor
    (no CLS: the CLS-less score, no topk-cls)."""
    methods = ["dense", "ours", "random", "fastv"]
    model = _model(processor, variant=variant)
    evaluate_saved(
        model, processor, tmp_path, methods, "pruning.stage1.score=null", "pruning.stage1.min_keep=1"
    )
    assert "report:" in capsys.readouterr().out


def test_a_video_files_length_is_known_before_it_is_decoded(processor, tmp_path):
    """``sequence_lengths`` (batching by length, before decoding) reads the file's frame rate and the
    sampled indices from its container, so the run it plans is the decoded video's: 40 frames at 4 per
    second, 4 sampled (0, 13, 26, 39), temporal patches at 1.6 s and 8.1 s."""
    from tests.data.test_video import write_video

    path = write_video(tmp_path / "clip.mp4", 40, rate=4)
    record = {"id": "f", "video": path,
              "conversations": [{"from": "human", "value": "<video>\nWhat happens?"}, {"from": "gpt", "value": "red"}]}  # fmt: skip
    collator = LlavaCollator(processor, max_length=512, mode="train", max_frames=4)
    batch = collator([record])
    text = processor.tokenizer.decode(batch["input_ids"][0])
    assert "<1.6 seconds>" in text and "<8.1 seconds>" in text  # frames (0, 13) and (26, 39) at 4 per second
    assert collator.sequence_lengths([record]) == [batch["input_ids"].shape[1]]
    planned = processor.tokenizer.decode(collator._counts_from_sizes([record])[0].video[0].tolist())
    assert planned.startswith("<1.6 seconds>") and "<8.1 seconds>" in planned


def test_premise_report_runs_on_qwen3_vls_tower(processor, tmp_path):
    """The premise report on Qwen3-VL's ViT, scored per merged unit (96 px images at the 64 x 64 budget:
    3 x 3 units), the CLS-less default score."""
    text, units = premise_report(_model(processor), processor, tmp_path)
    assert units == 9 and "model (mean_distance)" in text
