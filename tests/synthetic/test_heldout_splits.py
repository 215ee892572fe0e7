"""The held-out splits: deterministic, disjoint from training, and different in the way each claims."""

import numpy as np
import pytest

from tpkit.cli import SYNTHETIC_SPLITS
from tpkit.synthetic.questions import make_record, named_objects, reword
from tpkit.synthetic.scenes import (
    ALT_PALETTE,
    ALT_QUESTION_TEMPLATES,
    COLORS,
    HELDOUT_SPLITS,
    PALETTE,
    QUESTION_TEMPLATES,
    SPLITS,
    SyntheticConfig,
)

N = 24  # records per split: enough for every claim below, a fraction of a second each


def _records(split, n=N, seed=0):
    return [make_record(i, split, seed) for i in range(n)]


@pytest.fixture(scope="module")
def records():
    return {split: _records(split) for split in ("test", *HELDOUT_SPLITS)}


def _object_area(rec) -> float:
    mask = np.zeros((96, 96), dtype=bool)
    for x0, y0, x1, y1 in (o["box"] for o in rec["objects"]):
        mask[y0:y1, x0:x1] = True
    return float(mask.mean())


def _background(rec, img):
    """Pixels outside every object box (and 1 px around it)."""
    free = np.ones(img.shape[:2], dtype=bool)
    for x0, y0, x1, y1 in (o["box"] for o in rec["objects"]):
        free[max(y0 - 1, 0) : y1 + 1, max(x0 - 1, 0) : x1 + 1] = False
    return img[free].astype(int)


def test_heldout_splits_are_deterministic_and_disjoint_from_training(records):
    train = {make_record(i, "train", 0)[1].tobytes() for i in range(N)}
    for split in HELDOUT_SPLITS:
        again = _records(split, n=3)
        for (r, img), (r2, img2) in zip(records[split][:3], again):
            assert r == r2 and np.array_equal(img, img2)
        assert make_record(0, split, 1)[0] != records[split][0][0]  # another seed, other records
        assert not train & {img.tobytes() for _, img in records[split]}
        for r, _ in records[split]:
            assert r["id"].startswith(f"{split}-") and r["image"].startswith(f"images/{split}/")
            assert r["named_objects"] == named_objects(r)


def test_fill_crowd_small_differ_in_area_count_and_size(records):
    def mean(split, f):
        return float(np.mean([f(r) for r, _ in records[split]]))

    n_objects = lambda r: len(r["objects"])  # noqa: E731
    side = lambda r: max(max(o["box"][2] - o["box"][0], o["box"][3] - o["box"][1]) for o in r["objects"])  # noqa: E731
    assert mean("fill", _object_area) > 2.5 * mean("test", _object_area)
    assert mean("fill", _object_area) > 0.2 and mean("test", _object_area) < 0.1
    assert min(n_objects(r) for r, _ in records["crowd"]) >= 7
    assert max(n_objects(r) for r, _ in records["test"]) <= 5
    assert max(side(r) for r, _ in records["small"]) <= 9 < min(side(r) for r, _ in records["fill"])


def test_palette_split_paints_other_shades_on_saturated_backgrounds(records):
    def nearest(split):
        """Per object, whether its median pixel is nearer its ALT_PALETTE colour than its PALETTE one."""
        out = []
        for rec, img in records[split]:
            for o in rec["objects"]:
                x0, y0, x1, y1 = o["box"]
                cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
                px = img[cy - 1 : cy + 2, cx - 1 : cx + 2].reshape(-1, 3).astype(float)
                colour = np.median(px, axis=0)
                d_alt = np.linalg.norm(colour - ALT_PALETTE[o["color"]])
                d_base = np.linalg.norm(colour - PALETTE[o["color"]])
                out.append(d_alt < d_base)
        return np.mean(out)

    assert set(ALT_PALETTE) == set(COLORS) and all(ALT_PALETTE[c] != PALETTE[c] for c in COLORS)
    assert nearest("palette") > 0.8 and nearest("test") < 0.2

    def background_chroma(split):
        return np.mean([np.median(np.ptp(_background(r, img), axis=1)) for r, img in records[split]])

    assert background_chroma("palette") > 2 * background_chroma("test")


def test_clutter_split_is_busier(records):
    def saturated_background(split):  # background pixels as colourful as an object
        return np.mean([(np.ptp(_background(r, img), axis=1) > 120).mean() for r, img in records[split]])

    def texture(split):  # the background's spread of brightness
        return np.mean([_background(r, img).mean(axis=1).std() for r, img in records[split]])

    assert saturated_background("clutter") > 2 * saturated_background("test")
    assert texture("clutter") > 1.5 * texture("test")


def test_wording_split_asks_the_same_questions_in_other_words(records):
    alt = {q: t.split("{")[0] for q, t in ALT_QUESTION_TEMPLATES.items()}
    base = {q: t.split("{")[0] for q, t in QUESTION_TEMPLATES.items()}
    for rec, _ in records["wording"]:
        q = rec["conversations"][0]["value"]
        assert alt[rec["qtype"]] in q and base[rec["qtype"]] not in q
        assert rec["named_objects"] is not None or rec["conversations"][1]["value"] in ("no", "zero")
    for rec, _ in records["test"]:  # rewording is a bijection on the questions
        q = rec["conversations"][0]["value"]
        assert reword(q, "base") == q
        reworded = reword(q, "alt")
        assert reworded != q and named_objects(
            {**rec, "conversations": [{"value": reworded}]}
        ) == named_objects(rec)
    with pytest.raises(ValueError, match="matches none"):
        reword("Describe the image.", "alt")


def test_split_configs_validate_and_the_cli_lists_every_split():
    assert list(SYNTHETIC_SPLITS) == list(SPLITS)
    for split in SPLITS:
        SyntheticConfig.for_split(split).validate()
    for key in ("palette", "background", "wording"):
        with pytest.raises(ValueError, match=key):
            SyntheticConfig(**{key: "neon"}).validate()
