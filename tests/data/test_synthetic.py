import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from tpkit.data.synthetic import (
    ANSWER_SUFFIX,
    COLORS,
    COUNT_WORDS,
    NEG_TYPES,
    PALETTE,
    QTYPES,
    SHAPE_PLURALS,
    SHAPES,
    SyntheticConfig,
    batch_stream,
    ensure_split,
    generate_split,
    main,
    make_record,
    named_objects,
    patch_coverage,
    render_scene,
    sample_batch,
    text_corpus,
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


def test_generate_split_is_deterministic_per_seed(tmp_path):
    a = generate_split(tmp_path / "a", "test", n=12, seed=3)
    b = generate_split(tmp_path / "b", "test", n=12, seed=3)
    c = generate_split(tmp_path / "c", "test", n=12, seed=4)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    records = json.loads(a.read_text())
    assert len(records) == 12
    for r in records:
        ia, ib, ic = (p.parent / r["image"] for p in (a, b, c))
        assert ia.read_bytes() == ib.read_bytes()
        assert ia.read_bytes() != ic.read_bytes()
        with Image.open(ia) as im:
            assert im.size == (96, 96) and im.mode == "RGB"


def test_ensure_split_reuses_only_a_matching_split(tmp_path, capsys):
    path = ensure_split(tmp_path, "test", n=5, seed=1)
    assert len(json.loads(path.read_text())) == 5
    stamp = path.stat().st_mtime_ns
    assert ensure_split(tmp_path, "test", n=5, seed=1) == path and path.stat().st_mtime_ns == stamp
    assert capsys.readouterr().err == ""

    ensure_split(tmp_path, "test", n=3, seed=1)  # another size: written again, stale images removed
    assert "n 5 -> 3" in capsys.readouterr().err
    assert path.read_bytes() == generate_split(tmp_path / "ref", "test", n=3, seed=1).read_bytes()
    assert sorted(p.name for p in (tmp_path / "images" / "test").iterdir()) == [
        "000000.png",
        "000001.png",
        "000002.png",
    ]
    ensure_split(tmp_path, "test", n=3, seed=2)
    assert "seed 1 -> 2" in capsys.readouterr().err
    assert json.loads(path.read_text()) == json.loads(
        generate_split(tmp_path / "r2", "test", n=3, seed=2).read_text()
    )
    ensure_split(tmp_path, "test", n=3, seed=2, cfg=SyntheticConfig.for_split("ood"))
    assert "generator config" in capsys.readouterr().err

    own = tmp_path / "own"  # a file without the meta file is not ours: never rewritten
    own.mkdir()
    (own / "test.json").write_text("[]\n")
    assert ensure_split(own, "test", n=4, seed=0).read_text() == "[]\n"


def test_splits_use_different_streams_and_records_do_not_depend_on_n():
    tr = make_record(5, "train", 0)
    te = make_record(5, "test", 0)
    assert tr[0]["objects"] != te[0]["objects"]
    assert not np.array_equal(tr[1], te[1])
    again = make_record(5, "train", 0)
    assert again[0] == tr[0] and np.array_equal(again[1], tr[1])


def test_record_format(tmp_path):
    path = generate_split(tmp_path, "val", n=8, seed=0)
    records = json.loads(path.read_text())
    for i, r in enumerate(records):
        assert r["id"] == f"val-{i:06d}"
        assert r["image"] == f"images/val/{i:06d}.png"
        conv = r["conversations"]
        assert [t["from"] for t in conv] == ["human", "gpt"]
        assert conv[0]["value"].startswith("<image>\n") and conv[0]["value"].count("<image>") == 1
        assert len(conv[1]["value"].split()) == 1
        assert r["qtype"] in QTYPES
        assert (r["neg_type"] is None) == (conv[1]["value"] != "no" or r["qtype"] != "exist")
    meta = json.loads((tmp_path / "val.meta.json").read_text())
    assert meta["n"] == 8 and meta["config"]["image_size"] == 96


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


def test_objects_are_drawn_in_their_boxes():
    for i in range(40):
        rec, img = make_record(i, "test", 1)
        for o in rec["objects"]:
            if o["shape"] in ("circle", "square", "diamond", "cross"):  # their box centre is inside them
                x0, y0, x1, y1 = o["box"]
                cy, cx = (y0 + y1) // 2, (x0 + x1) // 2
                patch = img[cy - 1 : cy + 2, cx - 1 : cx + 2].reshape(-1, 3).astype(float)
                assert np.abs(np.median(patch, 0) - PALETTE[o["color"]]).max() < 45, (rec["id"], o)


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


def test_sample_batch_shapes_labels_and_determinism():
    x, y = sample_batch(64, seed=0)
    assert x.shape == (64, 96, 96, 3) and x.dtype == np.uint8
    assert y.shape == (64, len(SHAPES) + len(COLORS)) and y.dtype == np.float32
    assert (y[:, : len(SHAPES)].sum(1) >= 1).all() and (y[:, len(SHAPES) :].sum(1) >= 1).all()
    x2, y2 = sample_batch(64, seed=0)
    assert np.array_equal(x, x2) and np.array_equal(y, y2)
    x3, _ = sample_batch(64, seed=1)
    assert not np.array_equal(x, x3)
    small, _ = sample_batch(4, seed=0, cfg=SyntheticConfig(image_size=64, max_size=16))
    assert small.shape == (4, 64, 64, 3)


def test_batch_stream_matches_sample_batch():
    got = list(batch_stream(4, seed=2, start=5, steps=2))
    assert len(got) == 2
    for i, (x, y) in zip((5, 6), got):
        ex, ey = sample_batch(4, (2, i))
        assert np.array_equal(x, ex) and np.array_equal(y, ey)
    assert not np.array_equal(got[0][0], got[1][0])
    it = batch_stream(2, seed=0)  # endless
    assert np.array_equal(next(it)[0], sample_batch(2, (0, 0))[0])


def test_render_scene_speed_sanity():
    rng = np.random.default_rng(0)
    for _ in range(300):  # a few hundred scenes in well under a second; no timing assert
        img, objs = render_scene(rng)
        assert img.shape == (96, 96, 3) and 1 <= len(objs) <= 5


def test_clutter_is_saturated():
    # Saturated clutter: many patches WITHOUT objects must reach object-like chroma.
    hits = []
    for i in range(20):
        rec, img = make_record(i, "test", 0)
        chroma = (img.max(-1).astype(int) - img.min(-1)).reshape(12, 8, 12, 8).max(axis=(1, 3)).reshape(-1)
        free = patch_coverage([o["box"] for o in rec["objects"]], 96, 8) == 0
        hits.append((chroma[free] > 120).sum())
    assert np.mean(hits) >= 10


def test_text_corpus_covers_generated_text():
    corpus = text_corpus(50, seed=0)
    assert corpus == text_corpus(50, seed=0)
    vocab = set(" ".join(corpus).replace("\n", " ").split())
    for i in range(100):
        for split in ("test", "ood"):
            rec, _ = make_record(i, split, 9, SyntheticConfig(turns=3), render=False)
            for t in rec["conversations"]:
                assert set(t["value"].replace("\n", " ").split()) <= vocab


def test_patch_coverage_hand_made():
    cov = patch_coverage([[0, 0, 8, 8]], 16, 8)
    assert cov.tolist() == [1.0, 0.0, 0.0, 0.0]
    cov = patch_coverage([[4, 4, 12, 12]], 16, 8)
    assert cov.tolist() == [0.25, 0.25, 0.25, 0.25]
    # overlapping boxes count once; row-major patch order
    cov = patch_coverage([[8, 0, 16, 4], [8, 0, 16, 2], [0, 8, 2, 16]], 16, 8)
    assert cov.tolist() == [0.0, 0.5, 0.25, 0.0]
    assert patch_coverage([], (16, 24), 8).shape == (6,)
    with pytest.raises(ValueError, match="must divide"):
        patch_coverage([], 20, 8)


def test_config_validation_and_cli(tmp_path, capsys):
    with pytest.raises(ValueError, match="max_objects"):
        SyntheticConfig(min_objects=3, max_objects=2).validate()
    with pytest.raises(ValueError, match="split"):
        SyntheticConfig.for_split("dev")
    assert main(["--out", str(tmp_path), "--split", "test", "--n", "4", "--seed", "1"]) == 0
    assert len(json.loads((tmp_path / "test.json").read_text())) == 4
    assert main(["--out", str(tmp_path), "--split", "test", "--n", "4", "--turns", "7"]) == 2
    assert "turns" in capsys.readouterr().err
    assert main(["--bench", "20"]) == 0
    assert "images/s" in capsys.readouterr().out


def test_named_objects_agree_with_the_answers():
    from tpkit.data.synthetic import _relation

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
            assert len(objs) == 2 and _relation(objs[0]["box"], objs[1]["box"]) == answer
    assert seen == {"color", "count", "exist", "position"}
    assert named_objects({"conversations": [{"from": "human", "value": "<image>\nDescribe it."}]}) is None
    other = {"objects": [{"shape": "star", "color": "red", "box": [0, 0, 8, 8]}],
             "conversations": [{"from": "human", "value": "<image>\nWhat is this?"}]}  # fmt: skip
    assert named_objects(other) is None
