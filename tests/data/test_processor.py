"""The offline LlavaProcessor: fixed special ids, deterministic training, template, image tokens, round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaProcessor

from tpkit.data.processor import (
    CHAT_TEMPLATE,
    DEFAULT_SYSTEM_PROMPT,
    build_processor,
    num_image_tokens,
)

CORPUS = [
    "What color is the circle?",
    "How many squares are there?",
    "Is there a blue triangle in the image?",
    "Where is the red star relative to the green circle?",
    "red",
    "green",
    "blue",
    "yes",
    "no",
    "2",
    "left",
    "two circles",
] * 20

CONVERSATION = [
    {"role": "user", "content": "<image>\nWhat color is the circle?"},
    {"role": "assistant", "content": "red"},
    {"role": "user", "content": "How many squares are there?"},
    {"role": "assistant", "content": "2"},
]


def make_processor(image_size: int = 32, patch_size: int = 8) -> LlavaProcessor:
    return build_processor(image_size=image_size, patch_size=patch_size, corpus=CORPUS, vocab_size=300)


def make_image(h: int = 40, w: int = 50, seed: int = 0) -> Image.Image:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr)


@pytest.fixture(scope="module")
def processor() -> LlavaProcessor:
    return make_processor()


def test_special_token_ids(processor):
    tok = processor.tokenizer
    ids = [tok.convert_tokens_to_ids(t) for t in ["<pad>", "<s>", "</s>", "<image>", "<unk>"]]
    assert ids == [0, 1, 2, 3, 4]
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, processor.image_token_id) == (0, 1, 2, 3)
    assert tok.padding_side == "left"
    assert tok("red").input_ids[0] == 1  # <s> prepended
    assert 4 not in tok("Any ASCII text: ~{}[]|\\ 123 & more!\nok").input_ids  # no <unk>


def test_training_is_deterministic(processor):
    again = make_processor()
    assert processor.tokenizer.backend_tokenizer.to_str() == again.tokenizer.backend_tokenizer.to_str()


def test_chat_template_llava15_layout(processor):
    tok = processor.tokenizer
    full = tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert full == (
        f"{DEFAULT_SYSTEM_PROMPT} USER: <image>\nWhat color is the circle? ASSISTANT: red</s>"
        "USER: How many squares are there? ASSISTANT: 2</s>"
    )
    prompt = tok.apply_chat_template(CONVERSATION[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == f"{DEFAULT_SYSTEM_PROMPT} USER: <image>\nWhat color is the circle? ASSISTANT:"
    assert full.startswith(prompt)
    no_system = [{"role": "system", "content": ""}] + CONVERSATION[:2]
    assert tok.apply_chat_template(no_system, tokenize=False) == (
        "USER: <image>\nWhat color is the circle? ASSISTANT: red</s>"
    )
    parts = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": "What color is the circle?"}],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
    ]
    assert tok.apply_chat_template(parts, tokenize=False) == tok.apply_chat_template(
        CONVERSATION[:2], tokenize=False
    )


def test_decoding_is_lossless(processor):
    tok = processor.tokenizer
    text = tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text
    assert tok.decode(tok(" two circles</s>", add_special_tokens=False).input_ids) == "two circles</s>"


def test_generation_block_marks_answers(processor):
    tok = processor.tokenizer
    out = tok.apply_chat_template(CONVERSATION, return_dict=True, return_assistant_tokens_mask=True)
    ids = np.array(out["input_ids"])
    mask = np.array(out["assistant_masks"], dtype=bool)
    assert tok.convert_ids_to_tokens(ids[mask].tolist()) == ["▁red", "</s>", "▁2", "</s>"]


@pytest.mark.parametrize("image_size,patch_size", [(32, 8), (96, 8), (48, 16)])
def test_image_placeholder_expands_to_patch_count(image_size, patch_size):
    proc = make_processor(image_size, patch_size)
    text = proc.tokenizer.apply_chat_template(CONVERSATION[:2], tokenize=False)
    out = proc(text=[text], images=[make_image(70, 45)], return_tensors="pt")
    n = (image_size // patch_size) ** 2
    assert int((out["input_ids"] == 3).sum()) == n
    assert num_image_tokens(proc, image_size, image_size) == n
    assert tuple(out["pixel_values"].shape) == (1, 3, image_size, image_size)


def test_save_pretrained_round_trip(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    for loaded in (LlavaProcessor.from_pretrained(tmp_path), AutoProcessor.from_pretrained(tmp_path)):
        assert isinstance(loaded, LlavaProcessor)
        assert (loaded.patch_size, loaded.num_additional_image_tokens) == (8, 1)
        assert loaded.vision_feature_select_strategy == "default"
        assert loaded.chat_template == CHAT_TEMPLATE
        assert loaded.tokenizer.padding_side == "left"
        for conv in (CONVERSATION, CONVERSATION[:1]):
            gen = len(conv) == 1
            a = processor.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
            b = loaded.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
            assert a == b
        text = processor.tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
        images = [make_image(40, 50, seed=1)]
        x = processor(text=[text], images=images, return_tensors="pt")
        y = loaded(text=[text], images=images, return_tensors="pt")
        assert x["input_ids"].tolist() == y["input_ids"].tolist()
        assert torch.equal(x["pixel_values"], y["pixel_values"])


def test_default_processor_encodes_any_ascii_text():
    """Without a corpus (a tiny model with no processor of its own) the tokenizer still knows every
    printable character: no <unk>, and answers decode back to themselves."""
    tok = build_processor(image_size=32, patch_size=8).tokenizer
    text = "Is there a blue ~circle~ at (3, 4)? Answer: {yes} | no & 100% #1"
    ids = tok(text).input_ids
    assert 4 not in ids  # <unk>
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_building_the_processor_prints_no_backend_warning():
    """Where torchvision is absent, transformers warns on every ``CLIPImageProcessor`` access that it
    falls back to the PIL backend; the kit names that backend itself, so its commands stay quiet."""
    import subprocess
    import sys

    code = "from tpkit.data.processor import build_processor; build_processor(image_size=32, patch_size=8)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "falling back" not in out.stderr + out.stdout
