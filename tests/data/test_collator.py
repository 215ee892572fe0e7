"""LlavaCollator: answer masks are exactly the answer tokens, left padding, image runs, eval prompts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests.data.test_llava_json import good_record, write_png, write_set
from tests.data.test_processor import make_processor
from tpkit.data.collator import LlavaCollator
from tpkit.data.llava_json import load_llava_json
from tpkit.data.processor import DEFAULT_SYSTEM_PROMPT


@pytest.fixture(scope="module")
def processor():
    return make_processor(image_size=32, patch_size=8)  # 16 image tokens


def multi_turn(i: int) -> dict:
    rec = good_record(i, qtype="color", neg_type=None)
    rec["conversations"] = [
        {"from": "human", "value": "<image>\nWhat color is the circle?"},
        {"from": "gpt", "value": "red"},
        {"from": "human", "value": "How many squares are there?"},
        {"from": "gpt", "value": "two circles"},
        {"from": "human", "value": "Is there a blue triangle in the image?"},
        {"from": "gpt", "value": "yes"},
    ]
    return rec


@pytest.fixture()
def records(tmp_path):
    recs = [
        good_record(0, qtype="color", neg_type=None),
        multi_turn(1),
        good_record(2, qtype="exist", neg_type="random"),
    ]
    recs[2]["conversations"][1]["value"] = "no"
    recs[2]["conversations"][0]["value"] = "<image>\nIs there a blue triangle in the image?"
    ds, _ = load_llava_json(write_set(tmp_path, recs))
    return [ds[i] for i in range(len(ds))]


def answers_of(rec: dict) -> list[str]:
    return [t["value"] for t in rec["conversations"] if t["from"] == "gpt"]


def runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of each run of True."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def test_answer_mask_is_exactly_the_answers(processor, records):
    batch = LlavaCollator(processor)(records)
    tok = processor.tokenizer
    ids, mask, labels = batch["input_ids"], batch["answer_mask"], batch["labels"]
    assert mask.dtype == torch.bool
    assert torch.equal(labels[mask], ids[mask]) and bool((labels[~mask] == -100).all())
    for b, rec in enumerate(records):
        spans = runs(mask[b].numpy())
        decoded = [tok.decode(ids[b, s:e].tolist()) for s, e in spans]
        assert decoded == [a + "</s>" for a in answers_of(rec)]  # one run per turn, multi-turn included
        for s, _ in spans:  # every answer directly follows the prompt's "ASSISTANT:"
            assert tok.convert_ids_to_tokens(int(ids[b, s - 1])) == "▁ASSISTANT:"
    assert batch["ids"] == ["rec-0", "rec-1", "rec-2"]
    assert set(batch) == {"input_ids", "attention_mask", "pixel_values", "labels", "answer_mask", "ids"}


def test_left_padding_and_image_run(processor, records):
    batch = LlavaCollator(processor)(records)
    ids, am = batch["input_ids"], batch["attention_mask"]
    B, T = ids.shape
    assert tuple(batch["pixel_values"].shape) == (B, 3, 32, 32)
    for b in range(B):
        n = int(am[b].sum())
        assert am[b].tolist() == [0] * (T - n) + [1] * n
        assert bool((ids[b, : T - n] == 0).all())
        assert int(ids[b, T - n]) == 1  # <s> starts every sequence
        image_pos = torch.nonzero(ids[b] == 3).flatten()
        assert len(image_pos) == (32 // 8) ** 2
        assert image_pos.tolist() == list(range(int(image_pos[0]), int(image_pos[0]) + 16))  # one run
    assert int(am[1].sum()) == T  # the longest (multi-turn) sample is unpadded


def test_ids_equal_stock_processor(processor, records):
    """The collator's own placeholder expansion gives the same ids and pixels as LlavaProcessor.__call__."""
    coll = LlavaCollator(processor)
    batch = coll(records)
    for b, rec in enumerate(records):
        text = processor.tokenizer.apply_chat_template(coll.messages(rec), tokenize=False)
        ref = processor(text=[text], images=[Image.open(rec["image_path"])], return_tensors="pt")
        n = int(batch["attention_mask"][b].sum())
        assert batch["input_ids"][b, -n:].tolist() == ref["input_ids"][0].tolist()
        assert torch.equal(batch["pixel_values"][b], ref["pixel_values"][0])


def test_eval_prompt(processor, records):
    train = LlavaCollator(processor)(records)
    ev = LlavaCollator(processor, mode="eval")(records)
    tok = processor.tokenizer
    assert set(ev) == {"input_ids", "attention_mask", "pixel_values", "answers", "qtypes", "ids", "neg_types"}
    assert ev["answers"] == ["red", "red", "no"]
    assert ev["qtypes"] == ["color", "color", "exist"]
    assert ev["neg_types"] == [None, None, "random"]
    assert ev["ids"] == ["rec-0", "rec-1", "rec-2"]
    assert torch.equal(ev["pixel_values"], train["pixel_values"])
    for b in range(len(records)):
        n = int(ev["attention_mask"][b].sum())
        prompt = ev["input_ids"][b, -n:].tolist()
        text = tok.decode(prompt, skip_special_tokens=False)
        assert text.endswith("ASSISTANT:")
        assert text.count("ASSISTANT:") == 1
        # the prompt is exactly the training sequence up to its first answer token
        m = int(train["attention_mask"][b].sum())
        full = train["input_ids"][b, -m:]
        first_answer = int(torch.nonzero(train["answer_mask"][b, -m:])[0])
        assert prompt == full[:first_answer].tolist()


def test_system_prompt_choices(processor, records):
    tok = processor.tokenizer

    def text(coll):
        b = coll(records[:1])
        return tok.decode(b["input_ids"][0].tolist(), skip_special_tokens=True)

    assert text(LlavaCollator(processor)).startswith(DEFAULT_SYSTEM_PROMPT)
    assert text(LlavaCollator(processor, system_prompt="")).startswith("USER:")
    assert text(LlavaCollator(processor, system_prompt="Answer briefly.")).startswith("Answer briefly. USER:")


def test_over_long_is_rejected_naming_the_id(processor, records):
    lengths = LlavaCollator(processor).sequence_lengths(records)
    limit = max(lengths[0], lengths[2])
    assert lengths[1] > limit  # the multi-turn record is the long one
    with pytest.raises(
        ValueError,
        match=rf"record id='rec-1': sequence of {lengths[1]} tokens \(16 image tokens\) exceeds max_length={limit}",
    ):
        LlavaCollator(processor, max_length=limit)(records)
    batch = LlavaCollator(processor, max_length=max(lengths))(records)
    assert lengths == batch["attention_mask"].sum(1).tolist()


def test_plain_dict_records(processor, tmp_path):
    """No datasets: relative paths with image_folder, absolute paths, and PIL images all work."""
    write_png(tmp_path / "a.png", seed=1)
    base = good_record(0)
    recs = [
        {**base, "id": "rel", "image": "a.png"},
        {**base, "id": "abs", "image": str(tmp_path / "a.png")},
        {**base, "id": "pil", "image": Image.open(tmp_path / "a.png").convert("L")},  # grey -> RGB
    ]
    batch = LlavaCollator(processor, image_folder=tmp_path)(recs)
    assert batch["ids"] == ["rel", "abs", "pil"]
    assert torch.equal(batch["pixel_values"][0], batch["pixel_values"][1])
    assert torch.equal(batch["input_ids"][0], batch["input_ids"][2])
    with pytest.raises(ValueError, match=r"record id='missing': cannot read image"):
        LlavaCollator(processor, image_folder=tmp_path)([{**base, "id": "missing", "image": "nope.png"}])
    with pytest.raises(
        ValueError, match=r"record id='x': 0 <image> placeholder\(s\) in the text but 1 image\(s\)"
    ):
        bad = {
            **base,
            "id": "x",
            "image": "a.png",
            "conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "a"}],
        }
        LlavaCollator(processor, image_folder=tmp_path)([bad])


def test_dataloader_over_dataset(processor, records, tmp_path):
    ds, _ = load_llava_json(write_set(tmp_path, [good_record(i) for i in range(6)]))
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=LlavaCollator(processor))
    sizes = [b["input_ids"].shape[0] for b in loader]
    assert sizes == [4, 2]


def test_full_size_image_run():
    """96 px / patch 8: 144 image tokens per sample, as the base model expects."""
    proc = make_processor(image_size=96, patch_size=8)
    rec = {**good_record(0), "image": Image.fromarray(np.zeros((120, 100, 3), dtype=np.uint8))}
    batch = LlavaCollator(proc)([rec])
    assert int((batch["input_ids"] == 3).sum()) == 144
    assert tuple(batch["pixel_values"].shape) == (1, 3, 96, 96)


PARTS_ONLY_TEMPLATE = (  # hub-style: content must be a list of typed parts
    "{% for m in messages %}{% if m['role'] != 'system' %}{{ m['role'] | upper }}: {% endif %}"
    "{% for c in m['content'] if c['type'] == 'image' %}<image>\n{% endfor %}"
    "{% for c in m['content'] if c['type'] == 'text' %}{{ c['text'] }}{% endfor %}"
    "{% if m['role'] == 'assistant' %}</s>{% else %} {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def test_list_of_parts_chat_template(records):
    proc = make_processor(image_size=32, patch_size=8)
    proc.chat_template = PARTS_ONLY_TEMPLATE
    coll = LlavaCollator(proc)
    assert coll._parts
    batch = coll(records)
    tok = proc.tokenizer
    for b, rec in enumerate(records):
        decoded = [
            tok.decode(batch["input_ids"][b, s:e].tolist()) for s, e in runs(batch["answer_mask"][b].numpy())
        ]
        assert decoded == [a + "</s>" for a in answers_of(rec)]
    ev = LlavaCollator(proc, mode="eval")(records)
    text = tok.decode(ev["input_ids"][0].tolist(), skip_special_tokens=True)
    assert text.endswith("USER: \nWhat color is the circle? ASSISTANT:")


def truncate_image(path) -> None:
    """Keep the header (PIL still opens the file), cut the pixel data: fails only when decoded."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_an_image_that_fails_to_decode_at_batch_time(processor, records):
    from tpkit.data.errors import LlavaDataError

    truncate_image(__import__("pathlib").Path(records[1]["image_path"]))
    with Image.open(records[1]["image_path"]) as im:  # the load-time check ("open") passes it
        assert im.size == (48, 40)
    with pytest.raises(
        LlavaDataError,
        match=r"record id='rec-1': cannot read image .*001\.png: OSError: image file is truncated",
    ):
        LlavaCollator(processor)(records)
    batch = LlavaCollator(processor, on_error="skip")(records)
    assert batch["ids"] == ["rec-0", "rec-2"] and batch["input_ids"].shape[0] == 2
    assert [(e.id, e.index) for e in batch["skipped"]] == [("rec-1", None)]
    assert "cannot read image" in batch["skipped"][0].reason
    alone = LlavaCollator(processor, on_error="skip", mode="eval")([records[1]])
    assert alone["ids"] == [] and len(alone["skipped"]) == 1 and "input_ids" not in alone


def test_over_long_records_are_skipped_in_skip_mode(processor, records):
    lengths = LlavaCollator(processor).sequence_lengths(records)
    batch = LlavaCollator(processor, max_length=max(lengths[0], lengths[2]), on_error="skip")(records)
    assert batch["ids"] == ["rec-0", "rec-2"] and batch["pixel_values"].shape[0] == 2
    assert "exceeds max_length" in batch["skipped"][0].reason


def test_score_mode_is_the_eval_prompt_then_the_answer_as_given(processor, records):
    """loglikelihood requests: eval prompt + the continuation's text, labels on it only, no closing token."""
    ev = LlavaCollator(processor, mode="eval")(records)
    sc = LlavaCollator(processor, mode="score")(records)
    tok = processor.tokenizer
    for b, rec in enumerate(records):
        prompt = ev["input_ids"][b][ev["attention_mask"][b].bool()].tolist()
        full = sc["input_ids"][b][sc["attention_mask"][b].bool()].tolist()
        mask = sc["answer_mask"][b][sc["attention_mask"][b].bool()]
        assert full[: len(prompt)] == prompt  # the same prompt tokens, the answer's after them
        assert runs(mask.numpy()) == [(len(prompt), len(full))]
        assert (
            tok.decode(full[len(prompt) :]).strip() == answers_of(rec)[0]
        )  # the first answer, nothing closes it
        labels = sc["labels"][b][sc["attention_mask"][b].bool()]
        assert labels[mask].tolist() == full[len(prompt) :] and (labels[~mask] == -100).all()


def test_eval_record_ending_with_a_question_is_rendered_whole(processor, records):
    """multi-round requests: earlier turns are chat history, the last question gets the generation prompt."""
    rec = dict(records[1])
    rec["conversations"] = rec["conversations"][:3]  # q1, a1, q2
    coll = LlavaCollator(processor, mode="eval")
    batch = coll([rec])
    text = processor.tokenizer.decode(batch["input_ids"][0][batch["attention_mask"][0].bool()])
    assert "What color is the circle?" in text and "How many squares are there?" in text
    assert text.index("red") < text.index("How many squares")
    assert batch["answers"] == ["red"]  # the first answer, as for any eval record
    first = coll([{**rec, "conversations": rec["conversations"][:2]}])  # q1, a1: the prompt of a1 only
    assert int(first["attention_mask"][0].sum()) < int(batch["attention_mask"][0].sum())


def test_a_truncated_image_fails_even_where_a_library_allowed_truncated_images(
    processor, records, monkeypatch
):
    """PIL's LOAD_TRUNCATED_IMAGES is process-wide and lmms-eval turns it on when imported: the
    collator still refuses a cut file instead of decoding it padded with grey."""
    from PIL import ImageFile

    from tpkit.data.errors import LlavaDataError

    truncate_image(__import__("pathlib").Path(records[0]["image_path"]))
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(LlavaDataError, match="image file is truncated"):
        LlavaCollator(processor)(records)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # given back as it was
