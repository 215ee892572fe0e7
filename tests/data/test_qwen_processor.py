"""The offline Qwen2-VL processor: it builds, saves and loads back with AutoProcessor on this
transformers (no torchvision), renders Qwen2-VL's chat template, and the collator's any-resolution
path turns LLaVA-JSON records into exactly what the processor and the stock model take."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, Qwen2VLForConditionalGeneration, Qwen2VLProcessor

from tpkit.data.collator import IGNORE_INDEX, LlavaCollator
from tpkit.data.qwen_processor import (
    SPECIAL_TOKENS,
    OfflineQwen2VLProcessor,
    build_qwen2_vl_processor,
    model_token_ids,
)
from tpkit.models.loading import load_processor
from tpkit.models.qwen2_vl.tiny import tiny_config

CORPUS = [
    "What color is the circle?\nAnswer with one word.",
    "How many squares are there?",
    "Is there a blue triangle in the image?",
    "red two yes no",
]


@pytest.fixture(scope="module")
def processor() -> OfflineQwen2VLProcessor:
    # 32 px, patch 4, merge 2: an 8 x 8 patch grid, 16 merged units per square image
    return build_qwen2_vl_processor(image_size=32, patch_size=4, merge_size=2, corpus=CORPUS)


def image(h: int, w: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def records() -> list[dict]:
    return [
        {
            "id": "a",
            "image": image(32, 32, 0),
            "conversations": [
                {"from": "human", "value": "<image>\nWhat color is the circle?"},
                {"from": "gpt", "value": "red"},
                {"from": "human", "value": "How many squares are there?"},
                {"from": "gpt", "value": "two"},
            ],
        },
        {  # not square: the processor resizes it to 40 x 24 (an area of ~32^2, sides multiples of 8)
            "id": "b",
            "image": image(48, 28, 1),
            "conversations": [
                {"from": "human", "value": "Is there a blue triangle in the image?\n<image>"},
                {"from": "gpt", "value": "no"},
            ],
        },
    ]


def test_it_is_a_qwen2_vl_processor_that_saves_and_loads_back(processor, tmp_path):
    assert isinstance(processor, Qwen2VLProcessor)
    assert type(processor.image_processor).__name__ == "Qwen2VLImageProcessorPil"
    ip = processor.image_processor
    assert (ip.patch_size, ip.merge_size, ip.temporal_patch_size) == (4, 2, 2)
    processor.save_pretrained(tmp_path)
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is it?"}]}],
        add_generation_prompt=True,
    )
    images = [image(32, 32, 2)]
    ref = processor(images=images, text=[text], return_tensors="pt")
    for loaded in (AutoProcessor.from_pretrained(tmp_path), load_processor(tmp_path)):
        assert type(loaded) is OfflineQwen2VLProcessor
        assert loaded.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
        assert loaded.chat_template == processor.chat_template
        out = loaded(images=images, text=[text], return_tensors="pt")
        assert set(out) == {
            "input_ids",
            "attention_mask",
            "mm_token_type_ids",
            "pixel_values",
            "image_grid_thw",
        }
        for key in out:
            assert torch.equal(out[key], ref[key]), key
    assert ref["image_grid_thw"].tolist() == [[1, 8, 8]]
    assert tuple(ref["pixel_values"].shape) == (64, 3 * 2 * 4 * 4)
    assert int((ref["input_ids"] == processor.image_token_id).sum()) == 16  # one per merged unit
    assert torch.equal(ref["mm_token_type_ids"], (ref["input_ids"] == processor.image_token_id).long())


def test_chat_template_and_tokenizer_are_qwens(processor):
    tok = processor.tokenizer
    msgs = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": "What color is the circle?"}],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
    ]
    assert processor.apply_chat_template(msgs, tokenize=False) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What color is the circle?<|im_end|>\n"
        "<|im_start|>assistant\nred<|im_end|>\n"
    )
    # Qwen's special tokens after the learned vocabulary, in their order; no BOS
    n = len(tok)
    assert tok.convert_tokens_to_ids(SPECIAL_TOKENS) == list(range(n - len(SPECIAL_TOKENS), n))
    assert (tok.eos_token, tok.pad_token, tok.bos_token) == ("<|im_end|>", "<|endoftext|>", None)
    assert tok.padding_side == "left"
    assert processor.image_token == "<|image_pad|>" and processor.video_token == "<|video_pad|>"
    # byte-level: any text encodes and decodes back, never an unknown token
    for text in ("What color is the circle?", "naïve — 漢字 ✓\ttab", "red, blue square"):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
    assert len(tok("What color is the circle?", add_special_tokens=False)["input_ids"]) == 6  # a word a token


def test_videos_go_through_the_pil_video_processor(processor, tmp_path):
    """Videos: the PIL stand-in for Qwen2VLVideoProcessor (tpkit/data/video.py, tested there), one
    <|video_pad|> per merged unit of each temporal patch; the video part is rebuilt on loading, with
    the saved pixel budget; Qwen2.5-VL's class adds second_per_grid_ts."""
    frames = np.stack([np.asarray(image(32, 32, k)) for k in range(3)])  # 3 frames: padded to 4
    out = processor(text=["<|video_pad|>"], videos=[frames], return_tensors="pt")
    assert out["video_grid_thw"].tolist() == [[2, 8, 8]]
    assert int((out["input_ids"] == processor.video_token_id).sum()) == 2 * 16
    assert torch.equal(out["mm_token_type_ids"], 2 * (out["input_ids"] == processor.video_token_id).long())
    assert processor.video_processor.get_num_of_video_patches(3, 32, 32) == 2 * 64
    assert processor._get_num_multimodal_tokens(image_sizes=[(32, 32), (48, 28)])["num_image_tokens"] == [
        16,
        15,
    ]
    processor.save_pretrained(tmp_path)
    loaded = load_processor(tmp_path)
    assert (loaded.video_min_pixels, loaded.video_max_pixels) == (32 * 32, 32 * 32)
    again = loaded(text=["<|video_pad|>"], videos=[frames], return_tensors="pt")
    assert all(torch.equal(again[k], out[k]) for k in out)
    q25 = build_qwen2_vl_processor(image_size=32, patch_size=4, corpus=CORPUS, variant="qwen2.5-vl")
    meta = {"total_num_frames": 30, "fps": 10.0, "frames_indices": [0, 15, 29]}  # 1 frame per second
    out = q25(text=["<|video_pad|>"], videos=[frames], video_metadata=[meta], return_tensors="pt")
    assert out["second_per_grid_ts"].tolist() == [2.0]  # a temporal patch of 2 frames: 2 seconds


def test_collator_batch_is_what_the_processor_makes_of_the_rendered_conversation(processor):
    coll = LlavaCollator(processor, mode="train")
    batch = coll(records())
    tok = processor.tokenizer
    assert coll._parts  # Qwen's template marks the image up: the collator gives it parts
    T = batch["input_ids"].shape[1]
    pixels, grids = [], []
    for b, rec in enumerate(records()):
        text = processor.apply_chat_template(coll.messages(rec), tokenize=False)
        ref = processor(images=[rec["image"]], text=[text], return_tensors="pt")
        n = int(batch["attention_mask"][b].sum())
        assert batch["attention_mask"][b].tolist() == [0] * (T - n) + [1] * n
        assert batch["input_ids"][b, -n:].tolist() == ref["input_ids"][0].tolist()
        assert batch["mm_token_type_ids"][b, -n:].tolist() == ref["mm_token_type_ids"][0].tolist()
        assert int(batch["mm_token_type_ids"][b, : T - n].sum()) == 0
        pixels.append(ref["pixel_values"])
        grids.append(ref["image_grid_thw"])
        # the supervised tokens are each answer and the turn's end, as Qwen's SFT masks them
        ids, labels = batch["input_ids"][b], batch["labels"][b]
        answers = [t["value"] for t in rec["conversations"] if t["from"] == "gpt"]
        assert tok.decode(ids[labels != IGNORE_INDEX]) == "".join(a + "<|im_end|>\n" for a in answers)
    assert torch.equal(batch["pixel_values"], torch.cat(pixels))
    assert torch.equal(batch["image_grid_thw"], torch.cat(grids))
    assert batch["image_grid_thw"].tolist() == [[1, 8, 8], [1, 10, 6]]  # 16 and 15 merged units
    counts = (batch["input_ids"] == processor.image_token_id).sum(1).tolist()
    assert counts == [16, 15]
    # the second record's image comes after its question in LLaVA-JSON: Qwen's parts put it first
    second = tok.decode(batch["input_ids"][1][batch["attention_mask"][1].bool()])
    assert "<|vision_start|>" + "<|image_pad|>" * 15 + "<|vision_end|>Is there a blue triangle" in second


def test_collated_batches_run_the_stock_model(processor):
    """The left-padded train batch gives the stock Qwen2-VL the logits of each record alone, and the
    eval batch generates."""
    tok = processor.tokenizer
    ids = model_token_ids(tok)
    assert ids["image_token_id"] == processor.image_token_id and ids["eos_token_id"] == len(tok) - 5
    cfg = tiny_config("qwen2-vl", vocab_size=len(tok), **ids, image_size=32, patch_size=4, vision_hidden=32,
                      vision_heads=2, hidden_size=64, num_heads=4)  # fmt: skip
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(cfg).eval()
    coll = LlavaCollator(processor, mode="train")
    batch = coll(records())
    inputs = {k: v for k, v in batch.items() if torch.is_tensor(v) and k not in ("labels", "answer_mask")}
    with torch.no_grad():
        logits = model(**inputs).logits
        for b, rec in enumerate(records()):
            alone = coll([rec])
            one = {
                k: v for k, v in alone.items() if torch.is_tensor(v) and k not in ("labels", "answer_mask")
            }
            ref = model(**one).logits[0]
            torch.testing.assert_close(logits[b, -ref.shape[0] :], ref, rtol=1e-4, atol=1e-4)
        ev = LlavaCollator(processor, mode="eval")(records())
        assert tok.decode(ev["input_ids"][0]).endswith("<|im_start|>assistant\n")
        gen = {k: v for k, v in ev.items() if torch.is_tensor(v)}
        out = model.generate(**gen, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape == (2, ev["input_ids"].shape[1] + 3)
