"""Questions and records: balanced types, answers that follow from the objects, named objects."""

from collections import Counter

import numpy as np
import pytest

from tpkit.synthetic.questions import make_record, named_objects, relation, synthetic_processor, text_corpus
from tpkit.synthetic.scenes import (
    ANSWER_SUFFIX,
    COLORS,
    COUNT_WORDS,
    NEG_TYPES,
    QTYPES,
    SHAPE_PLURALS,
    SHAPES,
    SyntheticConfig,
)


@pytest.fixture(scope="module")
def train_records():
    # Planning only (no pixels): 4000 records = 1000 questions of each type.
    return [make_record(i, "train", 0, render=False)[0] for i in range(4000)]


def _question(rec, turn=0):
    q = rec["conversations"][2 * turn]["value"].removeprefix("<image>\n")
    assert q.endswith("\n" + ANSWER_SUFFIX)
    return q.removesuffix("\n" + ANSWER_SUFFIX)


def _expected_answer(qtype, question, objects):
    """Recompute an answer from the objects, independently of the generator's code."""
    plural_to_shape = {v: k for k, v in SHAPE_PLURALS.items()}
    words = question.rstrip("?").split()
    if qtype == "color":  # What color is the <shape>?
        matches = [o for o in objects if o["shape"] == words[-1]]
        assert len(matches) == 1, "colour question about a shape that is not unique"
        return matches[0]["color"]
    if qtype == "count":  # How many <shapes> are there?
        return COUNT_WORDS[sum(o["shape"] == plural_to_shape[words[2]] for o in objects)]
    if qtype == "exist":  # Is there a <color> <shape> in the image?
        color, shape = words[3], words[4]
        return "yes" if any(o["color"] == color and o["shape"] == shape for o in objects) else "no"
    if qtype == "position":  # Where is the <a> relative to the <b>?
        (a,) = [o["box"] for o in objects if o["shape"] == words[3]]
        (b,) = [o["box"] for o in objects if o["shape"] == words[-1]]
        rel = {
            "left": a[2] <= b[0],
            "right": b[2] <= a[0],
            "above": a[3] <= b[1],
            "below": b[3] <= a[1],
        }
        assert sum(rel.values()) == 1, f"ambiguous relation {a} vs {b}"
        return next(k for k, v in rel.items() if v)
    raise AssertionError(qtype)


def test_splits_use_different_streams_and_records_do_not_depend_on_n():
    tr = make_record(5, "train", 0)
    te = make_record(5, "test", 0)
    assert tr[0]["objects"] != te[0]["objects"]
    assert not np.array_equal(tr[1], te[1])
    again = make_record(5, "train", 0)
    assert again[0] == tr[0] and np.array_equal(again[1], tr[1])


def test_yes_no_balance_and_negative_types(train_records):
    exist = [r for r in train_records if r["qtype"] == "exist"]
    assert len(exist) == 1000
    yes = sum(r["conversations"][1]["value"] == "yes" for r in exist)
    assert abs(yes / len(exist) - 0.5) <= 0.02
    negs = Counter(r["neg_type"] for r in exist if r["conversations"][1]["value"] == "no")
    assert set(negs) == set(NEG_TYPES)
    assert min(negs.values()) >= 160


def test_every_qtype_and_answer_consistent_with_objects(train_records):
    assert Counter(r["qtype"] for r in train_records) == {q: 1000 for q in QTYPES}
    answers = Counter()
    for r in train_records:
        got = r["conversations"][1]["value"]
        assert got == _expected_answer(r["qtype"], _question(r), r["objects"]), r
        answers[r["qtype"], got] += 1
    for q, values in [
        ("color", COLORS),
        ("count", COUNT_WORDS[:5]),
        ("position", ("left", "right", "above", "below")),
    ]:
        assert all(answers[q, v] > 0 for v in values), (q, answers)


def test_adversarial_negatives_are_colour_swaps(train_records):
    for r in train_records:
        if r["neg_type"] == "adversarial":
            words = _question(r).rstrip("?").split()
            color, shape = words[3], words[4]
            assert any(o["shape"] == shape for o in r["objects"])
            assert any(o["color"] == color for o in r["objects"])


def test_boxes_inside_image_and_disjoint(train_records):
    cfg = SyntheticConfig()
    for r in train_records[:1000]:
        objs = r["objects"]
        assert cfg.min_objects <= len(objs) <= cfg.max_objects
        for o in objs:
            x0, y0, x1, y1 = o["box"]
            assert 0 <= x0 < x1 <= 96 and 0 <= y0 < y1 <= 96
            assert max(x1 - x0, y1 - y0) <= cfg.max_size
            assert o["shape"] in SHAPES and o["color"] in COLORS
        for i, a in enumerate(objs):
            for b in objs[i + 1 :]:
                ax0, ay0, ax1, ay1 = a["box"]
                bx0, by0, bx1, by1 = b["box"]
                assert ax1 <= bx0 or bx1 <= ax0 or ay1 <= by0 or by1 <= ay0


def test_multi_turn_records():
    for i in range(20):
        rec, _ = make_record(i, "train", 0, SyntheticConfig(turns=3), render=False)
        conv = rec["conversations"]
        assert len(conv) in (4, 6)
        assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
        assert sum("<image>" in t["value"] for t in conv) == 1
        assert rec["qtypes"][0] == rec["qtype"] and len(set(rec["qtypes"])) == len(rec["qtypes"])
        for t, q in enumerate(rec["qtypes"]):
            assert conv[2 * t + 1]["value"] == _expected_answer(q, _question(rec, t), rec["objects"])


def test_ood_split_has_more_objects():
    n_ood = [len(make_record(i, "ood", 0, render=False)[0]["objects"]) for i in range(40)]
    assert min(n_ood) >= 5 and max(n_ood) > 5


def test_text_corpus_covers_generated_text():
    corpus = text_corpus(50, seed=0)
    assert corpus == text_corpus(50, seed=0)
    vocab = set(" ".join(corpus).replace("\n", " ").split())
    for i in range(100):
        for split in ("test", "ood"):
            rec, _ = make_record(i, split, 9, SyntheticConfig(turns=3), render=False)
            for t in rec["conversations"]:
                assert set(t["value"].replace("\n", " ").split()) <= vocab


def test_named_objects_agree_with_the_answers():
    seen = set()
    for i in range(160):
        r, _ = make_record(i, "test", 0)
        objs, answer, q = named_objects(r), r["conversations"][1]["value"], r["qtype"]
        seen.add(q)
        assert objs is not None, r["conversations"][0]["value"]
        if q == "color":
            assert len(objs) == 1 and objs[0]["color"] == answer
        elif q == "count":
            assert COUNT_WORDS[len(objs)] == answer
        elif q == "exist":
            assert bool(objs) == (answer == "yes")
        else:
            assert len(objs) == 2 and relation(objs[0]["box"], objs[1]["box"]) == answer
    assert seen == {"color", "count", "exist", "position"}
    assert named_objects({"conversations": [{"from": "human", "value": "<image>\nDescribe it."}]}) is None
    other = {"objects": [{"shape": "star", "color": "red", "box": [0, 0, 8, 8]}],
             "conversations": [{"from": "human", "value": "<image>\nWhat is this?"}]}  # fmt: skip
    assert named_objects(other) is None


def test_synthetic_processor_is_the_fixtures_tokenizer():
    """The processor trained on the benchmark's text is the one the committed base model was built
    with (the fixture recipe and its snapshots use it), and it needs no <unk> on its own text."""
    from pathlib import Path

    from transformers import AutoProcessor

    tok = synthetic_processor().tokenizer
    committed = AutoProcessor.from_pretrained(Path(__file__).parents[2] / "assets" / "tiny-llava").tokenizer
    assert tok.get_vocab() == committed.get_vocab()
    assert all(4 not in tok(line).input_ids for line in text_corpus()[:200])
