"""LLaVA-JSON loading: round trip, one error per kind of bad record (naming file and id), skip-and-report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.data.test_processor import make_processor
from tpkit.data.llava_json import LlavaDataError, load_llava_json


def write_png(path: Path, seed: int = 0, size: tuple[int, int] = (40, 48)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)


def good_record(i: int, **extra) -> dict:
    return {
        "id": f"rec-{i}",
        "image": f"images/{i:03d}.png",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat color is the circle?"},
            {"from": "gpt", "value": "red"},
        ],
        **extra,
    }


def write_set(root: Path, records: list, name: str = "data.json") -> Path:
    for i in range(len(records) + 2):
        if not (root / f"images/{i:03d}.png").exists():
            write_png(root / f"images/{i:03d}.png", seed=i)
    path = root / name
    path.write_text(json.dumps(records))
    return path


def _bad(i: int, **changes) -> dict:
    rec = good_record(i)
    rec.update(changes)
    return {k: v for k, v in rec.items() if v is not _DROP}


_DROP = object()
H, G = "human", "gpt"

# kind -> (record builder taking the index, expected substring of the reason)
BAD_KINDS = {
    "missing_image_file": (lambda i: _bad(i, image="images/nope.png"), "image file not found"),
    "unreadable_image": (lambda i: _bad(i, image="garbage.png"), "unreadable image"),
    "no_image_field": (lambda i: _bad(i, image=_DROP), "no 'image' field"),
    "no_placeholder": (
        lambda i: _bad(i, conversations=[{"from": H, "value": "What color?"}, {"from": G, "value": "red"}]),
        "no <image> placeholder",
    ),
    "placeholder_in_later_turn": (
        lambda i: _bad(
            i,
            conversations=[
                {"from": H, "value": "What color?"},
                {"from": G, "value": "red"},
                {"from": H, "value": "<image>\nAnd?"},
                {"from": G, "value": "blue"},
            ],
        ),
        "outside the first human turn",
    ),
    "two_placeholders": (
        lambda i: _bad(
            i, conversations=[{"from": H, "value": "<image><image>\nQ?"}, {"from": G, "value": "red"}]
        ),
        "2 <image> placeholders",
    ),
    "gpt_first": (
        lambda i: _bad(i, conversations=[{"from": G, "value": "<image>\nQ?"}, {"from": H, "value": "red"}]),
        "turn 0: expected role 'human'",
    ),
    "not_alternating": (
        lambda i: _bad(
            i,
            conversations=[
                {"from": H, "value": "<image>\nQ?"},
                {"from": H, "value": "Q2?"},
                {"from": G, "value": "red"},
            ],
        ),
        "turn 1: expected role 'gpt'",
    ),
    "unknown_role": (
        lambda i: _bad(
            i, conversations=[{"from": H, "value": "<image>\nQ?"}, {"from": "bot", "value": "red"}]
        ),
        "unknown role 'bot'",
    ),
    "empty_answer": (
        lambda i: _bad(i, conversations=[{"from": H, "value": "<image>\nQ?"}, {"from": G, "value": "  "}]),
        "turn 1: empty answer",
    ),
    "ends_with_question": (
        lambda i: _bad(i, conversations=[{"from": H, "value": "<image>\nQ?"}]),
        "ends with a human turn",
    ),
    "conversations_not_list": (
        lambda i: _bad(i, conversations={"from": H, "value": "<image>\nQ?"}),
        "'conversations' must be a list of turns, got dict",
    ),
    "conversations_empty": (lambda i: _bad(i, conversations=[]), "'conversations' is empty"),
    "turn_not_dict": (lambda i: _bad(i, conversations=["<image>\nQ?", "red"]), "turn 0 must be a dict"),
    "missing_id": (lambda i: _bad(i, id=_DROP), "missing 'id'"),
    "not_an_object": (lambda i: ["not", "a", "record"], "must be a JSON object"),
}


def _prepare(tmp_path: Path, records: list) -> Path:
    path = write_set(tmp_path, records)
    (tmp_path / "garbage.png").write_bytes(b"this is not a png at all")
    return path


def test_round_trip_hand_written(tmp_path):
    records = [
        good_record(i, qtype="color", neg_type=None, objects=[{"shape": "circle", "box": [1, 2, 3, 4]}])
        for i in range(5)
    ]
    records[2]["conversations"] += [{"from": "human", "value": "Is it big?"}, {"from": "gpt", "value": "no"}]
    records[3]["id"] = 1234  # real LLaVA ids are sometimes ints
    ds, report = load_llava_json(write_set(tmp_path, records))
    assert (report.n_records, report.n_loaded, report.errors) == (5, 5, [])
    assert ds["id"] == ["rec-0", "rec-1", "rec-2", "1234", "rec-4"]
    for row, rec in zip(ds, records):
        assert row["conversations"] == rec["conversations"]
        assert row["image"] == rec["image"]
        assert (row["qtype"], row["neg_type"], row["objects"]) == ("color", None, rec["objects"])
        assert Path(row["image_path"]) == (tmp_path / rec["image"]).resolve()


def test_round_trip_generated_split(tmp_path):
    from tpkit.synthetic.splits import generate_split

    json_path = generate_split(tmp_path, split="test", n=12, seed=0)
    raw = json.loads(Path(json_path).read_text())
    ds, report = load_llava_json(json_path)
    assert (report.n_records, report.n_loaded, report.n_skipped) == (12, 12, 0)
    assert len(ds) == 12
    for row, rec in zip(ds, raw):
        assert {k: row[k] for k in rec} == {**rec, "id": str(rec["id"])}
        assert Path(row["image_path"]).is_file()


@pytest.mark.parametrize("kind", sorted(BAD_KINDS))
def test_bad_record_raises_naming_file_and_id(tmp_path, kind):
    build, reason = BAD_KINDS[kind]
    records = [good_record(0), good_record(1), build(2)]
    path = _prepare(tmp_path, records)
    with pytest.raises(LlavaDataError) as err:
        load_llava_json(path)
    msg = str(err.value)
    assert str(path) in msg
    assert "record #2" in msg
    expected_id = "id=None" if kind in ("missing_id", "not_an_object") else "id='rec-2'"
    assert expected_id in msg
    assert reason in msg
    assert err.value.index == 2


def test_over_long_record_is_rejected_at_load_time(tmp_path):
    long_q = "<image>\n" + " ".join(["What color is the circle?"] * 30)
    records = [
        good_record(0),
        _bad(1, conversations=[{"from": H, "value": long_q}, {"from": G, "value": "red"}]),
    ]
    path = write_set(tmp_path, records)
    proc = make_processor()  # 16 image tokens
    with pytest.raises(
        LlavaDataError, match=r"record #1 \(id='rec-1'\): sequence of \d+ tokens exceeds max_length=64"
    ):
        load_llava_json(path, processor=proc, max_length=64)
    ds, report = load_llava_json(path, on_error="skip", processor=proc, max_length=64)
    assert ds["id"] == ["rec-0"]
    assert [(e.index, e.id) for e in report.errors] == [(1, "rec-1")]
    ds, report = load_llava_json(path, processor=proc, max_length=512)
    assert len(ds) == 2


def test_skip_and_report_keeps_every_good_record(tmp_path):
    kinds = sorted(BAD_KINDS)
    records, good_ids, bad = [], [], {}
    for kind in kinds:  # interleave good and bad records
        i = len(records)
        records.append(good_record(i, qtype="color"))
        good_ids.append(f"rec-{i}")
        records.append(BAD_KINDS[kind][0](i + 1))
        bad[i + 1] = kind
    records.append(good_record(len(records), qtype="count"))
    good_ids.append(f"rec-{len(records) - 1}")
    path = _prepare(tmp_path, records)
    ds, report = load_llava_json(path, on_error="skip")
    assert ds["id"] == good_ids
    assert (report.n_records, report.n_loaded, report.n_skipped) == (len(records), len(good_ids), len(kinds))
    assert [e.index for e in report.errors] == sorted(bad)
    for e in report.errors:
        assert BAD_KINDS[bad[e.index]][1] in e.reason
    assert f"{len(good_ids)}/{len(records)} records loaded" in report.summary()


def test_max_records_and_image_folder(tmp_path):
    records = [good_record(i) for i in range(6)]
    path = write_set(tmp_path / "imgs", records)
    moved = tmp_path / "elsewhere" / "data.json"
    moved.parent.mkdir()
    path.rename(moved)
    with pytest.raises(LlavaDataError, match="image file not found"):
        load_llava_json(moved)
    ds, report = load_llava_json(moved, image_folder=tmp_path / "imgs", max_records=4)
    assert ds["id"] == [f"rec-{i}" for i in range(4)] and report.n_records == 4


def test_file_level_errors(tmp_path):
    with pytest.raises(LlavaDataError, match="file not found"):
        load_llava_json(tmp_path / "missing.json")
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('[{"id": 1,\n  "image": }]')
    with pytest.raises(LlavaDataError, match=r"bad\.json: invalid JSON at line 2"):
        load_llava_json(bad_json)
    not_list = tmp_path / "obj.json"
    not_list.write_text('{"id": 1}')
    with pytest.raises(LlavaDataError, match="top level must be a list"):
        load_llava_json(not_list)
    with pytest.raises(ValueError, match="on_error"):
        load_llava_json(not_list, on_error="ignore")


def test_jsonl_and_heterogeneous_extra_keys(tmp_path):
    records = [good_record(0), good_record(1, qtype="count", model="x")]
    write_set(tmp_path, records)
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    ds, _ = load_llava_json(path)
    assert ds["qtype"] == [None, "count"] and ds["model"] == [None, "x"]


def test_real_llava_layouts(tmp_path):
    """LLaVA-Instruct style: int ids, images under a COCO-like folder, <image> after the text, long chats."""
    write_png(tmp_path / "coco/train2017/000000033471.jpg".replace(".jpg", ".png"), seed=3)
    rec = {
        "id": 33471,
        "image": "coco/train2017/000000033471.png",
        "conversations": [
            {"from": "human", "value": "What are the colors of the bus in the image?\n<image>"},
            {"from": "gpt", "value": "The bus in the image is white and red."},
            {"from": "human", "value": "What feature can be seen on the back of the bus?"},
            {"from": "gpt", "value": "The back of the bus features an advertisement."},
        ],
    }
    path = tmp_path / "llava_instruct.json"
    path.write_text(json.dumps([rec]))
    ds, report = load_llava_json(path)
    assert ds["id"] == ["33471"] and report.n_loaded == 1


def test_a_file_that_is_not_utf8_names_the_file_and_the_byte(tmp_path):
    records = [good_record(0, note="caf\u00e9")]
    path = write_set(tmp_path, records)
    path.write_bytes(json.dumps(records, ensure_ascii=False).encode("latin-1"))
    with pytest.raises(
        LlavaDataError, match=r"data\.json: not UTF-8 text \(byte 0xe9 at line 1, offset \d+\)"
    ):
        load_llava_json(path)
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(records).encode())  # a byte-order mark is fine
    assert load_llava_json(path)[0]["id"] == ["rec-0"]


def test_duplicate_ids_are_refused_naming_them_or_renamed(tmp_path):
    records = [good_record(0), good_record(1), good_record(2), good_record(3)]
    records[2]["id"] = records[3]["id"] = "rec-0"
    path = write_set(tmp_path, records)
    with pytest.raises(
        LlavaDataError, match=r"1 record ids occur more than once: 'rec-0' \(records #0, #2, #3\)"
    ):
        load_llava_json(path)
    with pytest.raises(LlavaDataError, match="duplicate_ids: rename"):
        load_llava_json(path, on_error="skip")  # not a bad record: skipping would lose data
    ds, report = load_llava_json(path, duplicate_ids="rename")
    assert ds["id"] == ["rec-0", "rec-1", "rec-0#2", "rec-0#3"]
    assert report.renamed == {"rec-0": ["rec-0#2", "rec-0#3"]}


def test_an_empty_or_all_bad_file_is_refused(tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(LlavaDataError, match=r"empty\.json: no usable records: the file holds no records"):
        load_llava_json(empty)
    path = _prepare(tmp_path, [BAD_KINDS["missing_image_file"][0](0), BAD_KINDS["no_image_field"][0](1)])
    with pytest.raises(LlavaDataError, match=r"no usable records: all 2 records are bad \(first: record #0"):
        load_llava_json(path, on_error="skip")


def test_confine_images_keeps_reads_inside_the_image_folder(tmp_path):
    outside = tmp_path / "secret.png"
    write_png(outside)
    records = [good_record(0), good_record(1, image="../secret.png"), good_record(2, image=str(outside))]
    path = write_set(tmp_path / "set", records)
    ds, _ = load_llava_json(path)  # the default reads absolute and ../ paths as given (real LLaVA files)
    assert len(ds) == 3
    (tmp_path / "set" / "images" / "link.png").symlink_to(outside)
    records.append(good_record(3, image="images/link.png"))
    path.write_text(json.dumps(records))
    ds, report = load_llava_json(path, confine_images=True, on_error="skip")
    assert ds["id"] == ["rec-0"] and [e.index for e in report.errors] == [1, 2, 3]
    assert all("outside the image folder" in e.reason for e in report.errors)
    with pytest.raises(LlavaDataError, match=r"record #1 .*'\.\./secret\.png' is outside the image folder"):
        load_llava_json(path, confine_images=True)
