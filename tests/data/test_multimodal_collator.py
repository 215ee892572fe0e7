"""The collator on records with several images, videos or none (the any-res and OneVision offline
processors): ids and tensors are the processor's own for the rendered conversation, lengths are
known before decoding, and the stock model takes the batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from tests.data.test_processor import make_processor
from tests.models.internvl.processor import build_internvl_processor, offline_video_processor
from tpkit.data.collator import LlavaCollator
from tpkit.data.processor import (
    OfflineLlavaOnevisionProcessor,
    build_next_processor,
    build_onevision_processor,
)
from tpkit.data.qwen_processor import build_qwen2_vl_processor
from tpkit.data.video import Video
from tpkit.models.internvl.tiny import build_tiny_internvl
from tpkit.models.llava_next.tiny import tiny_next_config, tiny_onevision_config
from tpkit.models.qwen2_vl.tiny import tiny_config as tiny_qwen_config

RNG = np.random.default_rng(0)


def image(w: int, h: int) -> Image.Image:
    return Image.fromarray(RNG.integers(0, 255, (h, w, 3), dtype=np.uint8))


def record(rid: str, question: str, images=(), video=None) -> dict:
    conv = [{"from": "human", "value": question}, {"from": "gpt", "value": "red"}]
    return {"id": rid, "image": list(images), "video": video, "conversations": conv}


def records(with_video: bool) -> list[dict]:
    out = [
        record("two", "<image>\n<image>\nWhich one is larger?", [image(64, 32), image(32, 32)]),
        record("text", "What is two plus two?"),
        record("one", "<image>\nWhat color is the circle?", [image(64, 64)]),
        record(
            "three", "<image>\n<image>\n<image>\nHow many?", [image(40, 30), image(32, 64), image(32, 32)]
        ),
    ]
    if with_video:
        frames = RNG.integers(0, 255, (4, 32, 32, 3), dtype=np.uint8)
        out.append(record("video", "<video>\nWhat happens?", video=Video(frames, 12, 4.0, [0, 4, 7, 11])))
        out.append(record("both", "<image>\n<video>\nSame scene?", [image(64, 32)], frames[::-1]))
    return out


@pytest.fixture(scope="module")
def processors():
    qwen = {
        v: build_qwen2_vl_processor(image_size=16, patch_size=2, variant=v)
        for v in ("qwen2-vl", "qwen2.5-vl")
    }
    with offline_video_processor():
        internvl = build_internvl_processor()
    return {"next": build_next_processor(), "ov": build_onevision_processor(), **qwen, "internvl": internvl}


def qwen_ids(processor) -> dict[str, int]:
    tok = processor.tokenizer
    ids = {k: tok.convert_tokens_to_ids(t) for k, t in (("vision_start_token_id", "<|vision_start|>"),
                                                        ("vision_end_token_id", "<|vision_end|>"))}  # fmt: skip
    return dict(ids, video_token_id=processor.video_token_id, eos_token_id=tok.eos_token_id)


def _stock(kind: str, processor):
    tok = processor.tokenizer
    kw = dict(vocab_size=len(tok), image_token_id=processor.image_token_id, pad_token_id=tok.pad_token_id)
    if kind == "next":
        return transformers.LlavaNextForConditionalGeneration(tiny_next_config(**kw)).eval()
    if kind == "internvl":
        return build_tiny_internvl(vocab_size=len(tok), pad_token_id=tok.pad_token_id)
    if kind.startswith("qwen"):
        cls = {
            "qwen2-vl": transformers.Qwen2VLForConditionalGeneration,
            "qwen2.5-vl": transformers.Qwen2_5_VLForConditionalGeneration,
        }
        return cls[kind](tiny_qwen_config(kind, **kw, **qwen_ids(processor))).eval()
    cfg = tiny_onevision_config(video_token_id=processor.video_token_id, **kw)
    return transformers.LlavaOnevisionForConditionalGeneration(cfg).eval()


@pytest.mark.parametrize("kind", ["next", "ov", "qwen2-vl", "qwen2.5-vl", "internvl"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_ids_and_visuals_are_the_processors(processors, kind, mode):
    processor = processors[kind]
    recs = records(with_video=kind != "next")
    coll = LlavaCollator(processor, max_length=1024, mode=mode)
    batch = coll(recs)
    assert coll.sequence_lengths(recs) == batch["attention_mask"].sum(1).tolist()
    images = [r["image"] for r in recs if r["image"]]
    at = vi = tile = 0  # the record's first image (video; InternVL: tile) in the batch's visual inputs
    for b, r in enumerate(recs):
        full, _, prompt = coll._texts(r)
        kw = {}
        if r["image"]:
            kw["images"] = [r["image"]]  # one sample: OneVision sees its images as one multi-image sample
        if r["video"] is not None:
            v = (
                r["video"]
                if isinstance(r["video"], Video)
                else Video(r["video"], len(r["video"]), None, None)
            )
            kw["videos"], kw["video_metadata"] = [v.frames], [v.metadata()]
        ref = processor(text=[prompt if mode == "eval" else full], return_tensors="pt", **kw)
        n = int(batch["attention_mask"][b].sum())
        assert batch["input_ids"][b, -n:].tolist() == ref["input_ids"][0].tolist(), r["id"]
        if kind == "internvl":  # tiles of images and video frames, in prompt order over the batch
            n = ref["pixel_values"].shape[0] if "pixel_values" in ref else 0
            torch.testing.assert_close(
                batch["pixel_values"][tile : tile + n],
                ref.get("pixel_values", batch["pixel_values"][:0]),
                rtol=0,
                atol=0,
            )
            tile += n
        elif kind.startswith("qwen"):  # patches packed across the batch: the record's rows, by its grids
            for key, grids in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
                if key in ref:
                    first = int(batch[grids][: (at if key == "pixel_values" else vi)].prod(-1).sum())
                    n = int(ref[grids].prod(-1).sum())
                    torch.testing.assert_close(batch[key][first : first + n], ref[key], rtol=0, atol=0)
            if "second_per_grid_ts" in ref:
                assert batch["second_per_grid_ts"][vi].item() == ref["second_per_grid_ts"][0].item()
        else:
            if r["image"]:
                views = ref["pixel_values"].shape[1]
                got = batch["pixel_values"][at : at + len(r["image"]), :views]
                torch.testing.assert_close(got, ref["pixel_values"], rtol=0, atol=0)
            if r["video"] is not None:
                got = batch["pixel_values_videos"][vi]
                torch.testing.assert_close(got, ref["pixel_values_videos"][0], rtol=0, atol=0)
        at += len(r["image"])
        vi += r["video"] is not None
    if kind == "qwen2.5-vl":  # times a video by its sampled frame rate: 2 / (4 of 12 frames at 4 fps);
        # frames given as an array: 24 fps, as stock assumes
        assert batch["second_per_grid_ts"].tolist() == pytest.approx([1.5, 2 / 24])
    if kind in ("next", "ov"):
        assert batch["image_sizes"].tolist() == [[im.height, im.width] for ims in images for im in ims]
    if kind == "ov":
        assert batch["batch_num_images"].tolist() == [2, 1, 3, 1]  # text and video records have none
        assert tuple(batch["pixel_values_videos"].shape) == (2, 4, 3, 32, 32)
    # the text-only record's prompt holds no placeholder; the stock model takes the whole batch
    placeholders = [processor.image_token_id, getattr(processor, "video_token_id", processor.image_token_id)]
    assert not torch.isin(batch["input_ids"][1], torch.tensor(placeholders)).any()
    keys = ("input_ids", "attention_mask", "pixel_values", "image_sizes", "pixel_values_videos", "batch_num_images",
            "image_grid_thw", "video_grid_thw", "second_per_grid_ts", "mm_token_type_ids")  # fmt: skip
    torch.manual_seed(0)
    with torch.no_grad():
        out = _stock(kind, processor)(**{k: batch[k] for k in keys if k in batch})
    assert out.logits.shape[:2] == batch["input_ids"].shape


def test_video_frames_of_one_count_stack(processors):
    """Videos of one frame count stack into (videos, frames, 3, H, W); the per-video count is
    frames x pooled cells + one newline, as OneVision's processor counts it."""
    processor = processors["ov"]
    frames = RNG.integers(0, 255, (4, 32, 32, 3), dtype=np.uint8)
    recs = [record(f"v{i}", "<video>\nWhat happens?", video=frames) for i in range(2)]
    batch = LlavaCollator(processor, mode="eval")(recs)
    assert tuple(batch["pixel_values_videos"].shape) == (2, 4, 3, 32, 32)
    n_video = (batch["input_ids"] == processor.video_token_id).sum(1).tolist()
    assert n_video == [4 * 2 * 2 + 1] * 2  # 4x4 patches pooled to 2x2 per frame


def test_text_only_batch_has_no_visual_inputs(processors):
    for processor in (*processors.values(), make_processor()):
        batch = LlavaCollator(processor, mode="eval")([record("t", "What is two plus two?")])
        assert set(batch) == {"input_ids", "attention_mask", "answers", "qtypes", "ids", "neg_types"}


def test_what_a_processor_cannot_take_is_refused(processors):
    llava = LlavaCollator(make_processor(), mode="eval")
    video = RNG.integers(0, 255, (2, 32, 32, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="LlavaProcessor takes no videos"):
        llava([record("v", "What happens?", video=video)])
    with pytest.raises(
        ValueError, match=r"record id='x': 1 <image> placeholder\(s\) in the text but 2 image\(s\)"
    ):
        LlavaCollator(processors["next"], mode="eval")([record("x", "<image>\nQ?", [image(32, 32)] * 2)])


def test_onevision_processor_round_trip(processors, tmp_path):
    processor = processors["ov"]
    processor.save_pretrained(tmp_path)
    loaded = transformers.AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, OfflineLlavaOnevisionProcessor)
    assert (loaded.image_token_id, loaded.video_token_id) == (
        processor.image_token_id,
        processor.video_token_id,
    )
    frames = RNG.integers(0, 255, (2, 32, 32, 3), dtype=np.uint8)
    a = processor(text=["<video>"], videos=[frames], return_tensors="pt")
    b = loaded(text=["<video>"], videos=[frames], return_tensors="pt")
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(
        a["pixel_values_videos"], b["pixel_values_videos"]
    )
