"""Scenes of the synthetic benchmark: small coloured shapes on textured, noisy backgrounds.

Images are shapes (``SHAPES`` x ``COLORS``) on textured, noisy backgrounds. The clutter is
deliberately *saturated*: coloured lines, lumpy blobs, shapes cut in half or by the border, and 1-2
px specks, half in jittered object-palette colours and half in vivid hues more saturated than the
objects. A pixel-level score (per-patch max chroma) then keeps ~47% of the patches at the knee with
AUROC ~0.77 for object patches: finding the objects needs the vision tower to know what a whole shape
looks like. Clutter never enters an object's box.

For vision-tower pretraining, :func:`render_scene` / :func:`sample_batch` render in memory (numpy
rasterisation, no files). Questions and records are in :mod:`tpkit.synthetic.questions`, split files
in :mod:`tpkit.synthetic.splits`.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from PIL import Image

from tpkit.evaluation.retention import COVERED, patch_coverage

__all__ = [
    "SHAPES",
    "SHAPE_PLURALS",
    "COLORS",
    "PALETTE",
    "QTYPES",
    "NEG_TYPES",
    "SPLITS",
    "HELDOUT_SPLITS",
    "ALT_PALETTE",
    "COUNT_WORDS",
    "POSITIONS",
    "ANSWER_SUFFIX",
    "QUESTION_TEMPLATES",
    "ALT_QUESTION_TEMPLATES",
    "SyntheticConfig",
    "render_scene",
    "sample_batch",
    "object_patches",
    "batch_stream",
    "labels_of",
    "place_objects",
    "random_specs",
    "render_objects",
    "public_objects",
]

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross", "star")
SHAPE_PLURALS: dict[str, str] = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "diamond": "diamonds",
    "cross": "crosses",
    "star": "stars",
}
COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange", "cyan")
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (45, 75, 225),
    "yellow": (235, 215, 35),
    "purple": (145, 55, 195),
    "orange": (245, 135, 25),
    "cyan": (35, 200, 215),
}
# Other shades of the same seven names (crimson, lime, navy, mustard, violet, burnt orange, pale cyan):
# the held-out ``palette`` split paints its objects with these, so a colour is named as in training but
# its pixels were never seen there.
ALT_PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (160, 20, 70),
    "green": (120, 215, 40),
    "blue": (25, 35, 125),
    "yellow": (205, 190, 90),
    "purple": (205, 110, 235),
    "orange": (195, 95, 20),
    "cyan": (150, 235, 240),
}
QTYPES: tuple[str, ...] = ("color", "count", "exist", "position")
NEG_TYPES: tuple[str, ...] = ("random", "popular", "adversarial")
# Held-out splits: built to differ from what the embedded model was trained on (train/val/test share
# one generator config), each in one way, so that stage 1 is measured where its tower was not shaped
# for the images (SyntheticConfig.for_split says how each differs).
HELDOUT_SPLITS: tuple[str, ...] = ("fill", "clutter", "palette", "crowd", "small", "wording")
SPLITS: tuple[str, ...] = ("train", "val", "test", "ood", *HELDOUT_SPLITS)
COUNT_WORDS: tuple[str, ...] = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
)
POSITIONS: tuple[str, ...] = ("left", "right", "above", "below")
# LLaVA-1.5's short-answer instruction.
ANSWER_SUFFIX = "Answer the question using a single word or phrase."

QUESTION_TEMPLATES: dict[str, str] = {
    "color": "What color is the {shape}?",
    "count": "How many {shapes} are there?",
    "exist": "Is there a {color} {shape} in the image?",
    "position": "Where is the {shape} relative to the {other}?",
}
# The held-out ``wording`` split asks the same questions in other words (same answers).
ALT_QUESTION_TEMPLATES: dict[str, str] = {
    "color": "Which color does the {shape} have?",
    "count": "Count the {shapes} in this picture.",
    "exist": "Does this picture show a {color} {shape}?",
    "position": "Where can the {shape} be found compared to the {other}?",
}

_PALETTE_ARR = np.array([PALETTE[c] for c in COLORS], dtype=np.float32)  # (n_colours, 3)
_ALT_PALETTE_ARR = np.array([ALT_PALETTE[c] for c in COLORS], dtype=np.float32)


@dataclass
class SyntheticConfig:
    """Scene and question parameters. Defaults: 96x96 images, patch 8 (144 patches)."""

    image_size: int = 96
    patch_size: int = 8  # only used for coverage/reports; rendering is patch-agnostic
    min_objects: int = 1
    max_objects: int = 5
    min_size: int = 11  # object side in pixels (tight box of the shape mask at most this)
    max_size: int = 19
    object_gap: int = 3  # free pixels between object boxes (clutter stays out of this margin too)
    max_count: int = 4  # largest target count of a "count" question
    color_jitter: int = 18  # per-channel uniform jitter of an object's colour
    noise_std: float = 9.0  # pixel noise over the whole image (objects included)
    texture_amp: float = 1.0  # amplitude of the smooth background texture (x ~45 grey levels)
    min_lines: int = 2  # saturated clutter lines (palette colours)
    max_lines: int = 4
    min_dim_lines: int = 1  # low-chroma clutter lines
    max_dim_lines: int = 3
    min_blobs: int = 1  # saturated lumpy blobs
    max_blobs: int = 3
    min_partials: int = 1  # saturated partial shapes (half shapes, border-cut shapes)
    max_partials: int = 2
    min_dots: int = 10  # saturated 1-2 px specks: one saturated pixel is enough to fool a chroma score
    max_dots: int = 30
    turns: int = 1  # QA turns per record (2-3 for multi-turn records)
    palette: Literal["base", "alt"] = "base"  # object colours: PALETTE, or ALT_PALETTE (other shades)
    # background colour: base (a grey-ish level with a small tint); vivid (a saturated hue: the
    # background is as colourful as the objects)
    background: Literal["base", "vivid"] = "base"
    wording: Literal["base", "alt"] = "base"  # questions: QUESTION_TEMPLATES or ALT_QUESTION_TEMPLATES

    def validate(self) -> None:
        if not 32 <= self.image_size <= _BANK:
            raise ValueError(f"image_size = {self.image_size} must be in [32, {_BANK}]")
        if self.patch_size < 1 or self.image_size % self.patch_size:
            raise ValueError(f"patch_size = {self.patch_size} must divide image_size = {self.image_size}")
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(
                f"need 1 <= min_objects <= max_objects, got {self.min_objects}, {self.max_objects}"
            )
        if self.max_objects > 10:
            raise ValueError(f"max_objects = {self.max_objects} must be <= 10 (count words)")
        if not 5 <= self.min_size <= self.max_size <= self.image_size // 2:
            raise ValueError(
                f"need 5 <= min_size <= max_size <= image_size/2, got {self.min_size}, {self.max_size}"
            )
        if not 1 <= self.max_count <= self.max_objects:
            raise ValueError(f"max_count = {self.max_count} must be in [1, max_objects={self.max_objects}]")
        if not 1 <= self.turns <= 3:
            raise ValueError(f"turns = {self.turns} must be 1, 2 or 3")
        for key, allowed in (("palette", ("base", "alt")), ("background", ("base", "vivid")),
                             ("wording", ("base", "alt"))):  # fmt: skip
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key} = {getattr(self, key)!r} must be one of {list(allowed)}")
        for lo, hi in (
            ("min_lines", "max_lines"),
            ("min_dim_lines", "max_dim_lines"),
            ("min_blobs", "max_blobs"),
            ("min_partials", "max_partials"),
            ("min_dots", "max_dots"),
        ):
            if not 0 <= getattr(self, lo) <= getattr(self, hi):
                raise ValueError(f"need 0 <= {lo} <= {hi}, got {getattr(self, lo)}, {getattr(self, hi)}")

    @classmethod
    def for_split(cls, split: str, **overrides: Any) -> SyntheticConfig:
        """The default config of a split (train, val and test share the defaults; the others differ
        from them in the ways :data:`SPLIT_CHANGES` lists)."""
        if split not in SPLITS:
            raise ValueError(f"split = {split!r} is not one of {list(SPLITS)}")
        base: dict[str, Any] = dict(SPLIT_CHANGES.get(split, {}))
        base.update(overrides)
        cfg = cls(**base)
        cfg.validate()
        return cfg


# How each split's generator differs from the training one (``SyntheticConfig()``). ``ood``: more
# objects, other sizes (the fixture's own held-out check). The held-out splits, one change each:
SPLIT_CHANGES: dict[str, dict[str, Any]] = {
    "ood": dict(min_objects=5, max_objects=8, min_size=8, max_size=24, max_count=6),
    # objects that fill the image: 1-3 objects of 26-40 px (training: 11-19), ~4x the object area
    "fill": dict(min_objects=1, max_objects=3, min_size=26, max_size=40, max_count=3),
    # a busy, strongly textured background: 2.5x the texture, about 3x the clutter of every kind
    "clutter": dict(
        texture_amp=2.5,
        min_lines=5,
        max_lines=9,
        min_dim_lines=3,
        max_dim_lines=6,
        min_blobs=4,
        max_blobs=8,
        min_partials=3,
        max_partials=5,
        min_dots=40,
        max_dots=80,
    ),  # fmt: skip
    # other shades of the object colours on saturated backgrounds
    "palette": dict(palette="alt", background="vivid"),
    # crowded scenes: 7-10 smaller objects (8-13 px), counts up to 6
    "crowd": dict(min_objects=7, max_objects=10, min_size=8, max_size=13, max_count=6),
    # small objects: 6-9 px, about one patch each
    "small": dict(min_size=6, max_size=9),
    # the same scenes as training, the questions in other words
    "wording": dict(wording="alt"),
}


# --------------------------------------------------------------------------------------------
# Shape masks (cached per shape and size)


def _polygon_mask(verts: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test for every (u, v); verts (K, 2)."""
    inside = np.zeros(u.shape, dtype=bool)
    k = len(verts)
    for i in range(k):
        (x1, y1), (x2, y2) = verts[i], verts[(i + 1) % k]
        if y1 == y2:
            continue
        crosses = (y1 > v) != (y2 > v)
        x_at = x1 + (v - y1) * (x2 - x1) / (y2 - y1)
        inside ^= crosses & (u < x_at)
    return inside


@functools.lru_cache(maxsize=512)
def _shape_mask(shape: str, size: int) -> np.ndarray:
    """Bool (h, w) mask of ``shape`` drawn in a ``size`` x ``size`` cell, cropped to its tight box."""
    c = (np.arange(size) + 0.5) / size * 2.0 - 1.0  # pixel centres in [-1, 1]
    v, u = np.meshgrid(c, c, indexing="ij")  # v: rows (down), u: columns (right)
    if shape == "circle":
        m = u * u + v * v <= 1.0
    elif shape == "square":
        m = (np.abs(u) <= 0.86) & (np.abs(v) <= 0.86)
    elif shape == "diamond":
        m = np.abs(u) + np.abs(v) <= 1.0
    elif shape == "triangle":
        m = _polygon_mask(np.array([[0.0, -1.0], [1.0, 0.9], [-1.0, 0.9]]), u, v)
    elif shape == "cross":
        m = ((np.abs(u) <= 0.3) | (np.abs(v) <= 0.3)) & (np.abs(u) <= 0.95) & (np.abs(v) <= 0.95)
    elif shape == "star":
        ang = -np.pi / 2 + np.arange(10) * np.pi / 5
        rad = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        verts = np.stack([rad * np.cos(ang), rad * np.sin(ang) + 0.1], axis=1)
        m = _polygon_mask(verts, u, v)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {list(SHAPES)}")
    rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
    m = m[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    m.setflags(write=False)
    return m


# --------------------------------------------------------------------------------------------
# Background banks: generated once from a fixed seed, cropped per image (fast and deterministic)

_BANK = 256


@functools.lru_cache(maxsize=1)
def _banks() -> tuple[np.ndarray, np.ndarray]:
    """(textures (K, B, B, 3) float32 zero-mean smooth fields, noise (B, B, 3) float32 N(0, 1))."""
    rng = np.random.default_rng(20261126)
    textures = []
    for cells in (6, 10, 16, 24):
        for _ in range(2):
            low = rng.integers(0, 256, size=(cells, cells, 3), dtype=np.uint8)
            up = np.asarray(Image.fromarray(low).resize((_BANK, _BANK), Image.BICUBIC), dtype=np.float32)
            up = (up - up.mean()) / (up.std() + 1e-6) * 15.0
            # Low-contrast stripes on part of the bank: textures are not only blobs of noise.
            if cells in (10, 24):
                yy, xx = np.mgrid[0:_BANK, 0:_BANK]
                up += (8.0 * np.sin(xx * rng.uniform(0.2, 0.6) + yy * rng.uniform(0.2, 0.6)))[..., None]
            textures += [up, np.ascontiguousarray(up[:, ::-1])]  # flips are precomputed, not per image
    noise = rng.standard_normal((_BANK, _BANK, 3)).astype(np.float32)
    return np.stack(textures), noise


def _crop(rng: np.random.Generator, arr: np.ndarray, size: int) -> np.ndarray:
    oy, ox = rng.integers(0, arr.shape[0] - size + 1, size=2)
    return arr[oy : oy + size, ox : ox + size]


# --------------------------------------------------------------------------------------------
# Scene planning (objects and boxes, no pixels)


def random_specs(
    rng: np.random.Generator, cfg: SyntheticConfig, n: int | None = None
) -> list[tuple[str, str]]:
    if n is None:
        n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    shapes = rng.integers(0, len(SHAPES), size=n)
    colors = rng.integers(0, len(COLORS), size=n)
    return [(SHAPES[s], COLORS[c]) for s, c in zip(shapes, colors)]


def place_objects(
    rng: np.random.Generator, cfg: SyntheticConfig, specs: list[tuple[str, str]], tries: int = 20
) -> list[dict[str, Any]] | None:
    """Non-overlapping placement (boxes ``object_gap`` apart); None if it fails ``tries`` times."""
    s, gap = cfg.image_size, cfg.object_gap
    for _ in range(tries):
        objects: list[dict[str, Any]] = []
        for shape, color in specs:
            cell = int(rng.integers(cfg.min_size, cfg.max_size + 1))
            h, w = _shape_mask(shape, cell).shape
            for _ in range(60):
                x0, y0 = int(rng.integers(0, s - w + 1)), int(rng.integers(0, s - h + 1))
                if all(
                    x0 >= o["box"][2] + gap
                    or o["box"][0] >= x0 + w + gap
                    or y0 >= o["box"][3] + gap
                    or o["box"][1] >= y0 + h + gap
                    for o in objects
                ):
                    objects.append(
                        {"shape": shape, "color": color, "box": [x0, y0, x0 + w, y0 + h], "_cell": cell}
                    )
                    break
            else:
                break
        if len(objects) == len(specs):
            return objects
    return None


# --------------------------------------------------------------------------------------------
# Rasterisation


def _line_pixels(rng: np.random.Generator, k: int, s: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixels of ``k`` straight lines 1-2 px wide across an ``s`` x ``s`` image, all at once.

    Returns (xs, ys, line index), unclipped.
    """
    ends = rng.uniform(-0.2 * s, 1.2 * s, size=(k, 4)).astype(np.float32)  # x0, y0, x1, y1
    wide = rng.random(k) < 0.5
    dx, dy = ends[:, 2] - ends[:, 0], ends[:, 3] - ends[:, 1]
    m = int(np.abs(np.stack([dx, dy])).max()) + 2  # samples per line: enough for 1-px steps
    t = np.arange(m, dtype=np.float32) / (m - 1)  # (m,)
    xs = np.rint(ends[:, :1] + t * dx[:, None]).astype(np.intp)  # (k, m)
    ys = np.rint(ends[:, 1:2] + t * dy[:, None]).astype(np.intp)
    line = np.broadcast_to(np.arange(k)[:, None], (k, m))
    horiz = (np.abs(dx) > np.abs(dy))[:, None]
    # the second pixel row of a wide line goes across the line's minor axis
    keep2 = np.broadcast_to(wide[:, None], (k, m))
    xs2, ys2 = (xs + ~horiz)[keep2], (ys + horiz)[keep2]
    return (
        np.concatenate([xs.ravel(), xs2]),
        np.concatenate([ys.ravel(), ys2]),
        np.concatenate([line.ravel(), line[keep2]]),
    )


def _paste(
    img: np.ndarray, free: np.ndarray | None, mask: np.ndarray, x0: int, y0: int, color: np.ndarray
) -> None:
    """Paint ``mask`` at (x0, y0), clipped by the image border (and by ``free`` if given)."""
    s = img.shape[0]
    h, w = mask.shape
    cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x0 + w, s), min(y0 + h, s)
    if cx0 >= cx1 or cy0 >= cy1:
        return
    m = mask[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0]
    if free is not None:
        m = m & free[cy0:cy1, cx0:cx1]
    img[cy0:cy1, cx0:cx1][m] = color


@functools.lru_cache(maxsize=1)
def _blob_bank() -> tuple[np.ndarray, ...]:
    """64 lumpy blobs (unions of 2-4 small discs), made once from a fixed seed."""
    rng = np.random.default_rng(7)
    c = np.arange(-7, 8, dtype=np.float32)
    yy, xx = c[:, None, None], c[None, :, None]
    out = []
    for _ in range(64):
        k = int(rng.integers(2, 5))
        r = rng.uniform(1.5, 3.5, size=k)
        cx, cy = rng.uniform(-3.0, 3.0, size=k), rng.uniform(-3.0, 3.0, size=k)
        m = (((xx - cx) ** 2 + (yy - cy) ** 2) <= r * r).any(-1)
        rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
        out.append(m[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1])
    return tuple(out)


def _blob_mask(rng: np.random.Generator) -> np.ndarray:
    """A lumpy blob from the bank, randomly transposed."""
    m = _blob_bank()[int(rng.integers(64))]
    return m.T if rng.random() < 0.5 else m


def _partial_mask(rng: np.random.Generator, cfg: SyntheticConfig) -> np.ndarray:
    """A shape with 35-60% of it cut away along a random side."""
    m = _shape_mask(SHAPES[int(rng.integers(len(SHAPES)))], int(rng.integers(cfg.min_size, cfg.max_size + 1)))
    side = int(rng.integers(4))
    frac = rng.uniform(0.4, 0.65)
    h, w = m.shape
    if side == 0:
        return m[:, : max(2, int(w * frac))]
    if side == 1:
        return m[:, w - max(2, int(w * frac)) :]
    if side == 2:
        return m[: max(2, int(h * frac))]
    return m[h - max(2, int(h * frac)) :]


def _hue_table() -> np.ndarray:
    """(360, 3) fully saturated RGB hues in [0, 1] (max channel 1, min channel 0)."""
    h = np.arange(360) / 60.0
    return np.clip(np.stack([np.abs(h - 3) - 1, 2 - np.abs(h - 2), 2 - np.abs(h - 4)], 1), 0.0, 1.0)


_HUES = _hue_table()


def _clutter_colors(rng: np.random.Generator, k: int) -> np.ndarray:
    """(k, 3) float32 saturated clutter colours: half jittered palette colours, half vivid random hues.

    The vivid hues (saturation 0.8-1, value 0.85-1) are often *more* saturated than the objects, so
    a chroma score ranks clutter above objects.
    """
    r = rng.random((k, 8))  # one draw for everything (speed)
    pal = _PALETTE_ARR[(r[:, 0] * len(COLORS)).astype(np.intp)] + (r[:, 1:4] - 0.5) * 60.0
    sat = 0.8 + 0.2 * r[:, 4:5]
    val = 255.0 * (0.85 + 0.15 * r[:, 5:6])
    vivid = val * (1.0 - sat + sat * _HUES[(r[:, 6] * 360).astype(np.intp)])
    return np.clip(np.where(r[:, 7:8] < 0.5, vivid, pal), 0.0, 255.0).astype(np.float32)


def _inside_boxes(x0: int, y0: int, w: int, h: int, boxes: list[list[int]], gap: int) -> bool:
    return any(
        not (x0 >= b[2] + gap or b[0] >= x0 + w + gap or y0 >= b[3] + gap or b[1] >= y0 + h + gap)
        for b in boxes
    )


def render_objects(
    rng: np.random.Generator, cfg: SyntheticConfig, objects: list[dict[str, Any]]
) -> np.ndarray:
    """Rasterise a planned scene: background, clutter (kept out of object boxes), objects, noise."""
    s = cfg.image_size
    textures, noise = _banks()
    base = rng.uniform(75.0, 185.0) + rng.uniform(-25.0, 25.0, size=3).astype(np.float32)
    if cfg.background == "vivid":  # a saturated hue (saturation 0.5-0.8) at a mid value
        sat, val = rng.uniform(0.5, 0.8), rng.uniform(110.0, 200.0)
        base = (val * (1.0 - sat + sat * _HUES[int(rng.integers(360))])).astype(np.float32)
    tex = _crop(rng, textures[int(rng.integers(len(textures)))], s)
    img = tex * np.float32(cfg.texture_amp * rng.uniform(0.5, 1.3))  # (S, S, 3) float32
    img += base.astype(np.float32)

    boxes = [o["box"] for o in objects]
    free = np.ones((s, s), dtype=bool)  # clutter never touches an object's box (+1 px)
    for x0, y0, x1, y1 in boxes:
        free[max(y0 - 1, 0) : y1 + 1, max(x0 - 1, 0) : x1 + 1] = False

    lo = (cfg.min_dim_lines, cfg.min_lines, cfg.min_blobs, cfg.min_partials, cfg.min_dots)
    hi = (cfg.max_dim_lines, cfg.max_lines, cfg.max_blobs, cfg.max_partials, cfg.max_dots)
    n_dim, n_sat, n_blobs, n_partials, n_dots = rng.integers(lo, np.add(hi, 1)).tolist()
    colors = _clutter_colors(rng, n_sat + n_blobs + n_partials + n_dots)
    pool = iter(colors[n_sat : n_sat + n_blobs + n_partials])
    for _ in range(n_blobs):
        m = _blob_mask(rng)
        for _ in range(20):
            x0, y0 = rng.integers(-4, s - m.shape[0] + 4, size=2).tolist()
            if not _inside_boxes(x0, y0, m.shape[1], m.shape[0], boxes, 1):
                _paste(img, free, m, x0, y0, next(pool))
                break
    for _ in range(n_partials):
        m = _partial_mask(rng, cfg)
        h, w = m.shape
        for _ in range(20):
            x0, y0 = rng.integers((-w // 3, -h // 3), (s - 2 * w // 3 + 1, s - 2 * h // 3 + 1)).tolist()
            if not _inside_boxes(x0, y0, w, h, boxes, cfg.object_gap):
                _paste(img, free, m, x0, y0, next(pool))
                break

    # Lines (dim, then saturated) and 1-2 px specks: pixel lists painted in one gated assignment.
    dim = rng.uniform(20.0, 235.0, size=(n_dim, 1)) + rng.uniform(-20.0, 20.0, size=(n_dim, 3))
    line_cols = np.concatenate([dim.astype(np.float32), colors[:n_sat]])
    xs, ys, idx = _line_pixels(rng, n_dim + n_sat, s) if len(line_cols) else (np.zeros(0, np.intp),) * 3
    cols = line_cols[idx]
    if n_dots:
        dy, dx = rng.integers(0, s - 1, size=(2, n_dots))
        big = rng.random(n_dots) < 0.5  # 2x2 specks
        dot_cols = colors[n_sat + n_blobs + n_partials :]
        xs = np.concatenate([xs, dx, dx[big] + 1, dx[big], dx[big] + 1])
        ys = np.concatenate([ys, dy, dy[big], dy[big] + 1, dy[big] + 1])
        cols = np.concatenate([cols, dot_cols, dot_cols[big], dot_cols[big], dot_cols[big]])
    ok = (xs >= 0) & (xs < s) & (ys >= 0) & (ys < s)
    xs, ys, cols = xs[ok], ys[ok], cols[ok]
    ok = free[ys, xs]
    img[ys[ok], xs[ok]] = cols[ok]

    jitter = rng.integers(-cfg.color_jitter, cfg.color_jitter + 1, size=(max(len(objects), 1), 3))
    palette = _ALT_PALETTE_ARR if cfg.palette == "alt" else _PALETTE_ARR
    for o, jit in zip(objects, jitter):
        m = _shape_mask(o["shape"], o["_cell"])
        x0, y0 = o["box"][0], o["box"][1]
        img[y0 : y0 + m.shape[0], x0 : x0 + m.shape[1]][m] = palette[COLORS.index(o["color"])] + jit

    img += _crop(rng, noise, s) * np.float32(cfg.noise_std)
    np.clip(img, 0.0, 255.0, out=img)
    return img.astype(np.uint8)


def public_objects(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Objects as written to records: shape, color, box (drops the private mask cell size)."""
    return [{"shape": o["shape"], "color": o["color"], "box": list(o["box"])} for o in objects]


# --------------------------------------------------------------------------------------------
# In-memory rendering (vision-tower pretraining)


def render_scene(
    rng: np.random.Generator, cfg: SyntheticConfig | None = None, specs: list[tuple[str, str]] | None = None
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Render one random scene -> (image uint8 (S, S, 3), objects [{shape, color, box}]).

    ``specs`` optionally fixes the objects as (shape, colour) pairs; positions and sizes stay random.
    """
    cfg = cfg or SyntheticConfig()
    while True:
        objects = place_objects(rng, cfg, specs if specs is not None else random_specs(rng, cfg))
        if objects is not None:
            break
    return render_objects(rng, cfg, objects), public_objects(objects)


def labels_of(objects: list[dict[str, Any]]) -> np.ndarray:
    """Multi-hot (n_shapes + n_colours,) float32: which shapes and which colours are present."""
    y = np.zeros(len(SHAPES) + len(COLORS), dtype=np.float32)
    for o in objects:
        y[SHAPES.index(o["shape"])] = 1.0
        y[len(SHAPES) + COLORS.index(o["color"])] = 1.0
    return y


def sample_batch(
    n: int, seed: int | Sequence[int], cfg: SyntheticConfig | None = None, patch_size: int | None = None
) -> tuple[np.ndarray, ...]:
    """``n`` random scenes -> (images uint8 (n, S, S, 3), multi-hot labels float32 (n, 6 + 7)), and
    with ``patch_size`` also which patches are object patches, bool (n, P) (:func:`object_patches`).

    Deterministic in ``seed`` (an int or a sequence of ints, e.g. ``(seed, step)``); use a different
    seed per step/worker for a stream of fresh images, or :func:`batch_stream`.
    """
    cfg = cfg or SyntheticConfig()
    rng = np.random.default_rng([*np.atleast_1d(seed).tolist(), 101])
    s = cfg.image_size
    images = np.empty((n, s, s, 3), dtype=np.uint8)
    labels = np.empty((n, len(SHAPES) + len(COLORS)), dtype=np.float32)
    patches = np.zeros((n, (s // patch_size) ** 2 if patch_size else 0), dtype=bool)
    for i in range(n):
        images[i], objects = render_scene(rng, cfg)
        labels[i] = labels_of(objects)
        if patch_size:
            patches[i] = object_patches([o["box"] for o in objects], s, patch_size)
    return (images, labels, patches) if patch_size else (images, labels)


def _batch_job(args: tuple[int, int, int, SyntheticConfig]) -> tuple[np.ndarray, np.ndarray]:
    batch_size, seed, step, cfg = args
    return sample_batch(batch_size, (seed, step), cfg)


def batch_stream(
    batch_size: int,
    seed: int = 0,
    cfg: SyntheticConfig | None = None,
    workers: int = 0,
    start: int = 0,
    steps: int | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Endless (or ``steps``-long) stream of :func:`sample_batch` batches; step ``i`` uses seed ``(seed, i)``.

    The same batches come out whatever ``workers`` (processes, spawned: safe beside CUDA); ``start``
    resumes a stream at a step.
    """
    cfg = cfg or SyntheticConfig()
    stop = None if steps is None else start + steps
    indices = itertools.count(start) if stop is None else range(start, stop)
    jobs = ((batch_size, seed, i, cfg) for i in indices)
    if workers <= 0:
        yield from map(_batch_job, jobs)
        return
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap(_batch_job, jobs, chunksize=1)


# --------------------------------------------------------------------------------------------
# Object patches


def object_patches(
    boxes: list[list[int]] | np.ndarray, image_size: int | tuple[int, int], patch_size: int
) -> np.ndarray:
    """(N_patches,) bool: patches the boxes cover at least :data:`tpkit.evaluation.retention.COVERED`."""
    return patch_coverage(boxes, image_size, patch_size) >= COVERED
