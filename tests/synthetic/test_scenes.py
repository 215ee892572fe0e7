"""Scenes: objects drawn in their boxes, batches deterministic per seed, saturated clutter."""

import numpy as np

from tpkit.evaluation.retention import patch_coverage
from tpkit.synthetic.questions import make_record
from tpkit.synthetic.scenes import (
    COLORS,
    PALETTE,
    SHAPES,
    SyntheticConfig,
    batch_stream,
    render_scene,
    sample_batch,
)


def test_objects_are_drawn_in_their_boxes():
    for i in range(40):
        rec, img = make_record(i, "test", 1)
        for o in rec["objects"]:
            if o["shape"] in ("circle", "square", "diamond", "cross"):  # their box centre is inside them
                x0, y0, x1, y1 = o["box"]
                cy, cx = (y0 + y1) // 2, (x0 + x1) // 2
                patch = img[cy - 1 : cy + 2, cx - 1 : cx + 2].reshape(-1, 3).astype(float)
                assert np.abs(np.median(patch, 0) - PALETTE[o["color"]]).max() < 45, (rec["id"], o)


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
