"""A procedurally generated multimodal benchmark in LLaVA's conversation-JSON format.

Images are small coloured shapes (``SHAPES`` x ``COLORS``) on textured, noisy backgrounds. The
clutter is deliberately *saturated*: coloured lines, lumpy blobs, shapes cut in half or by the
border, and 1-2 px specks, half in jittered object-palette colours and half in vivid hues more
saturated than the objects. A pixel-level score (per-patch max chroma) then keeps ~47% of the
patches at the knee with AUROC ~0.77 for object patches: finding the objects needs the vision
tower to know what a whole shape looks like. Clutter never enters an object's box.

Questions (one per record by default, ``turns=2..3`` for multi-turn records), short one-word answers:

- ``color``    "What color is the star?" -> "red" (the named shape is unique in the image)
- ``count``    "How many crosses are there?" -> "two" (count words, ``COUNT_WORDS``; "zero" possible)
- ``exist``    "Is there a blue circle in the image?" -> "yes"/"no", balanced 50/50. POPE-style
  negatives (``neg_type``): ``random`` (shape absent, any colour), ``popular`` (shape absent, colour
  taken from an object in the image, so the colour alone does not answer), ``adversarial`` (a
  colour swap: the shape *and* the colour are both present, on different objects).
- ``position`` "Where is the circle relative to the square?" -> "left"/"right"/"above"/"below"
  (both shapes unique; unambiguous: the boxes are disjoint along one axis and overlap along the other).

Every record is generated from its own random stream ``(seed, split, index)``, so a record does not
depend on ``n`` and the splits never share a stream. The ``ood`` split has more objects and other
sizes. Each record carries ``objects`` (shape, colour, pixel box ``[x0, y0, x1, y1]`` with exclusive
ends), ``qtype`` and ``neg_type``; :func:`patch_coverage` turns boxes into per-patch coverage.

For vision-tower pretraining, :func:`render_scene` / :func:`sample_batch` render in memory
(numpy rasterisation, no files), and :func:`text_corpus` lists the text a tokenizer must know.

Command line::

    python -m tpkit.data.synthetic --out outputs/synth --split train --n 20000 --seed 0 --workers 2
    python -m tpkit.data.synthetic --out outputs/synth --split test --n 300 --seed 0 --turns 3
    python -m tpkit.data.synthetic --bench 5000      # images/s of sample_batch on one core
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import re
import shutil
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

__all__ = [
    "SHAPES",
    "SHAPE_PLURALS",
    "COLORS",
    "PALETTE",
    "QTYPES",
    "NEG_TYPES",
    "SPLITS",
    "COUNT_WORDS",
    "POSITIONS",
    "ANSWER_SUFFIX",
    "SyntheticConfig",
    "render_scene",
    "sample_batch",
    "object_patches",
    "OBJECT_PATCH_COVERAGE",
    "batch_stream",
    "make_record",
    "generate_split",
    "ensure_split",
    "text_corpus",
    "patch_coverage",
    "labels_of",
    "named_objects",
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
QTYPES: tuple[str, ...] = ("color", "count", "exist", "position")
NEG_TYPES: tuple[str, ...] = ("random", "popular", "adversarial")
SPLITS: tuple[str, ...] = ("train", "val", "test", "ood")
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

_SPLIT_STREAM = {"train": 0, "val": 1, "test": 2, "ood": 3}
_PALETTE_ARR = np.array([PALETTE[c] for c in COLORS], dtype=np.float32)  # (n_colours, 3)


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
        if not 5 <= self.min_size <= self.max_size <= self.image_size // 3:
            raise ValueError(
                f"need 5 <= min_size <= max_size <= image_size/3, got {self.min_size}, {self.max_size}"
            )
        if not 1 <= self.max_count <= self.max_objects:
            raise ValueError(f"max_count = {self.max_count} must be in [1, max_objects={self.max_objects}]")
        if not 1 <= self.turns <= 3:
            raise ValueError(f"turns = {self.turns} must be 1, 2 or 3")
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
        """The default config of a split: ``ood`` has 5-8 objects and sizes 8-24 px."""
        if split not in SPLITS:
            raise ValueError(f"split = {split!r} is not one of {list(SPLITS)}")
        base: dict[str, Any] = {}
        if split == "ood":
            base = dict(min_objects=5, max_objects=8, min_size=8, max_size=24, max_count=6)
        base.update(overrides)
        cfg = cls(**base)
        cfg.validate()
        return cfg


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


def _random_specs(
    rng: np.random.Generator, cfg: SyntheticConfig, n: int | None = None
) -> list[tuple[str, str]]:
    if n is None:
        n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    shapes = rng.integers(0, len(SHAPES), size=n)
    colors = rng.integers(0, len(COLORS), size=n)
    return [(SHAPES[s], COLORS[c]) for s, c in zip(shapes, colors)]


def _place(
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


def _render(rng: np.random.Generator, cfg: SyntheticConfig, objects: list[dict[str, Any]]) -> np.ndarray:
    """Rasterise a planned scene: background, clutter (kept out of object boxes), objects, noise."""
    s = cfg.image_size
    textures, noise = _banks()
    base = rng.uniform(75.0, 185.0) + rng.uniform(-25.0, 25.0, size=3).astype(np.float32)
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
    for o, jit in zip(objects, jitter):
        m = _shape_mask(o["shape"], o["_cell"])
        x0, y0 = o["box"][0], o["box"][1]
        img[y0 : y0 + m.shape[0], x0 : x0 + m.shape[1]][m] = _PALETTE_ARR[COLORS.index(o["color"])] + jit

    img += _crop(rng, noise, s) * np.float32(cfg.noise_std)
    np.clip(img, 0.0, 255.0, out=img)
    return img.astype(np.uint8)


def _public(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
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
        objects = _place(rng, cfg, specs if specs is not None else _random_specs(rng, cfg))
        if objects is not None:
            break
    return _render(rng, cfg, objects), _public(objects)


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
# Questions


def _question(qtype: str, **kw: str) -> str:
    return QUESTION_TEMPLATES[qtype].format(**kw) + "\n" + ANSWER_SUFFIX


def _template_regex(template: str) -> re.Pattern[str]:
    parts = re.split(r"\{(\w+)\}", template)  # literal, name, literal, name, ...
    body = "".join(re.escape(t) if i % 2 == 0 else f"(?P<{t}>\\w+)" for i, t in enumerate(parts))
    return re.compile(body)


_QUESTION_RES = {q: _template_regex(t) for q, t in QUESTION_TEMPLATES.items()}


def named_objects(record: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The objects of ``record`` that its (first) question is about, or None if it cannot tell.

    colour: the one object of the named shape; count: every object of the shape (none for "zero");
    exist: the named colour-and-shape object (none when the answer is "no"); position: both named
    objects. None for records without ``objects`` or a question the benchmark's templates do not
    match (real LLaVA data), so callers can skip them.
    """
    objects, conv = record.get("objects"), record.get("conversations")
    if not objects or not conv:
        return None
    text = conv[0]["value"].replace("<image>", " ")
    for qtype, rx in _QUESTION_RES.items():
        m = rx.search(text)
        if m is None:
            continue
        g = m.groupdict()
        if qtype == "count":
            shape = next((sh for sh, pl in SHAPE_PLURALS.items() if pl == g["shapes"]), None)
            return [o for o in objects if o["shape"] == shape]
        if qtype == "exist":
            return [o for o in objects if (o["color"], o["shape"]) == (g["color"], g["shape"])]
        names = [g["shape"]] + ([g["other"]] if qtype == "position" else [])
        found = [[o for o in objects if o["shape"] == sh] for sh in names]
        return [o for group in found for o in group] if all(len(f) == 1 for f in found) else None
    return None


def _unique_shapes(objects: list[dict[str, Any]]) -> list[str]:
    counts: dict[str, int] = {}
    for o in objects:
        counts[o["shape"]] = counts.get(o["shape"], 0) + 1
    return [sh for sh in SHAPES if counts.get(sh) == 1]


def _q_color(rng: np.random.Generator, objects: list[dict[str, Any]]) -> tuple[str, str, None] | None:
    unique = _unique_shapes(objects)
    if not unique:
        return None
    shape = unique[int(rng.integers(len(unique)))]
    color = next(o["color"] for o in objects if o["shape"] == shape)
    return _question("color", shape=shape), color, None


def _q_count(
    rng: np.random.Generator, objects: list[dict[str, Any]], shape: str | None = None
) -> tuple[str, str, None]:
    if shape is None:
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
    k = sum(o["shape"] == shape for o in objects)
    return _question("count", shapes=SHAPE_PLURALS[shape]), COUNT_WORDS[k], None


def _q_exist(
    rng: np.random.Generator, objects: list[dict[str, Any]], yes: bool, neg_type: str | None
) -> tuple[str, str, str | None] | None:
    present = {(o["color"], o["shape"]) for o in objects}
    if yes:
        o = objects[int(rng.integers(len(objects)))]
        return _question("exist", color=o["color"], shape=o["shape"]), "yes", None
    shapes_in = {o["shape"] for o in objects}
    colors_in = sorted({o["color"] for o in objects}, key=COLORS.index)
    absent = [sh for sh in SHAPES if sh not in shapes_in]
    if neg_type == "random":
        cands = [(c, sh) for sh in absent for c in COLORS]
    elif neg_type == "popular":
        cands = [(c, sh) for sh in absent for c in colors_in]
    elif neg_type == "adversarial":  # both attributes present, never on the same object
        cands = [(c, sh) for sh in SHAPES if sh in shapes_in for c in colors_in if (c, sh) not in present]
    else:
        raise ValueError(f"neg_type = {neg_type!r} is not one of {list(NEG_TYPES)}")
    if not cands:
        return None
    color, shape = cands[int(rng.integers(len(cands)))]
    return _question("exist", color=color, shape=shape), "no", neg_type


def _relation(a: list[int], b: list[int]) -> str | None:
    """Where box ``a`` is relative to box ``b``; None unless exactly one relation holds.

    "left" means ``a`` ends before ``b`` starts horizontally *and* their vertical extents overlap,
    so a diagonal pair (both left and above) is never asked about.
    """
    rel = [a[2] <= b[0], b[2] <= a[0], a[3] <= b[1], b[3] <= a[1]]
    return POSITIONS[rel.index(True)] if sum(rel) == 1 else None


def _q_position(rng: np.random.Generator, objects: list[dict[str, Any]]) -> tuple[str, str, None] | None:
    unique = set(_unique_shapes(objects))
    objs = [o for o in objects if o["shape"] in unique]
    pairs = []
    for a in objs:
        for b in objs:
            if a is not b and (rel := _relation(a["box"], b["box"])) is not None:
                pairs.append((a["shape"], b["shape"], rel))
    if not pairs:
        return None
    shape, other, rel = pairs[int(rng.integers(len(pairs)))]
    return _question("position", shape=shape, other=other), rel, None


def _ask(
    rng: np.random.Generator,
    qtype: str,
    objects: list[dict[str, Any]],
    yes: bool,
    neg_type: str | None,
    **kw: Any,
) -> tuple[str, str, str | None] | None:
    if qtype == "color":
        return _q_color(rng, objects)
    if qtype == "count":
        return _q_count(rng, objects, kw.get("shape"))
    if qtype == "exist":
        return _q_exist(rng, objects, yes, neg_type)
    if qtype == "position":
        return _q_position(rng, objects)
    raise ValueError(f"qtype = {qtype!r} is not one of {list(QTYPES)}")


def _plan_first(
    rng: np.random.Generator, cfg: SyntheticConfig, qtype: str, yes: bool, neg_type: str | None
) -> tuple[list[dict[str, Any]], tuple[str, str, str | None]]:
    """Sample scenes until the first question of the record can be asked about them."""
    for _ in range(500):
        kw: dict[str, Any] = {}
        if qtype == "count":  # target count uniform over 0..max_count; other objects other shapes
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            k = int(rng.integers(0, cfg.max_count + 1))
            n = int(rng.integers(max(cfg.min_objects, k, 1), cfg.max_objects + 1))
            others = [sh for sh in SHAPES if sh != shape]
            specs = [(shape, COLORS[int(rng.integers(len(COLORS)))]) for _ in range(k)]
            specs += [
                (others[int(rng.integers(len(others)))], COLORS[int(rng.integers(len(COLORS)))])
                for _ in range(n - k)
            ]
            specs = [specs[j] for j in rng.permutation(len(specs))]
            kw["shape"] = shape
        else:
            lo = 2 if qtype == "position" or (qtype == "exist" and neg_type == "adversarial") else 1
            n = int(rng.integers(max(cfg.min_objects, lo), max(cfg.max_objects, lo) + 1))
            specs = _random_specs(rng, cfg, n)
        objects = _place(rng, cfg, specs)
        if objects is None:
            continue
        qa = _ask(rng, qtype, objects, yes, neg_type, **kw)
        if qa is not None:
            return objects, qa
    raise RuntimeError(
        f"could not sample a scene for a {qtype!r} question (neg_type={neg_type}); check the config"
    )


def make_record(
    index: int, split: str, seed: int, cfg: SyntheticConfig | None = None, render: bool = True
) -> tuple[dict[str, Any], np.ndarray | None]:
    """Record ``index`` of a split -> (LLaVA record, image uint8 (S, S, 3) or None if not ``render``).

    The first question's type cycles through ``QTYPES`` with the index; existence questions
    alternate yes/no and cycle the negative type, so a split is balanced exactly. Later turns of a
    multi-turn record ask other question types about the same image (random yes/no).
    """
    cfg = cfg or SyntheticConfig.for_split(split)
    if split not in _SPLIT_STREAM:
        raise ValueError(f"split = {split!r} is not one of {list(SPLITS)}")
    rng = np.random.default_rng([seed, _SPLIT_STREAM[split], index])
    qtype = QTYPES[index % len(QTYPES)]
    k = index // len(QTYPES)  # the k-th question of this type in the split
    yes = qtype == "exist" and k % 2 == 0
    neg_type = NEG_TYPES[(k // 2) % len(NEG_TYPES)] if qtype == "exist" and not yes else None
    objects, qa = _plan_first(rng, cfg, qtype, yes, neg_type)
    turns = [(qtype, *qa)]
    rest = [q for q in QTYPES if q != qtype]
    for j in rng.permutation(len(rest)):
        if len(turns) >= cfg.turns:
            break
        q = rest[j]
        y = bool(rng.random() < 0.5)
        nt = NEG_TYPES[int(rng.integers(len(NEG_TYPES)))]
        extra = _ask(rng, q, objects, y, None if y else nt)
        if extra is None and q == "exist":
            extra = _ask(rng, q, objects, False, "random") or _ask(rng, q, objects, True, None)
        if extra is not None:
            turns.append((q, *extra))

    image = _render(rng, cfg, objects) if render else None
    conversations = []
    for t, (_, question, answer, _) in enumerate(turns):
        conversations.append({"from": "human", "value": ("<image>\n" if t == 0 else "") + question})
        conversations.append({"from": "gpt", "value": answer})
    record: dict[str, Any] = {
        "id": f"{split}-{index:06d}",
        "image": f"images/{split}/{index:06d}.png",
        "conversations": conversations,
        "qtype": qtype,
        "neg_type": neg_type,
        "objects": _public(objects),
    }
    if cfg.turns > 1:
        record["qtypes"] = [t[0] for t in turns]
        record["neg_types"] = [t[3] for t in turns]
    return record, image


def _make_and_save(args: tuple[int, str, int, SyntheticConfig, str]) -> dict[str, Any]:
    index, split, seed, cfg, out_dir = args
    record, image = make_record(index, split, seed, cfg)
    Image.fromarray(image).save(Path(out_dir) / record["image"], format="PNG")
    return record


def _split_meta(split: str, n: int, seed: int, cfg: SyntheticConfig) -> dict[str, Any]:
    """What ``<split>.meta.json`` records: enough to tell whether a split on disk is the one asked for."""
    return {"split": split, "n": n, "seed": seed, "config": dataclasses.asdict(cfg)}


def generate_split(
    out_dir: str | Path,
    split: str = "train",
    n: int = 1000,
    seed: int = 0,
    cfg: SyntheticConfig | None = None,
    turns: int | None = None,
    workers: int = 1,
    progress: bool = False,
) -> Path:
    """Write ``out_dir/<split>.json`` (a list of LLaVA records) and ``out_dir/images/<split>/*.png``.

    Also writes ``out_dir/<split>.meta.json`` (config, seed, n). Returns the JSON path. Output is
    byte-identical for the same arguments, whatever ``workers``.
    """
    if split not in SPLITS:
        raise ValueError(f"split = {split!r} is not one of {list(SPLITS)}")
    if n < 1:
        raise ValueError(f"n = {n} must be >= 1")
    cfg = cfg or SyntheticConfig.for_split(split)
    if turns is not None:
        cfg = dataclasses.replace(cfg, turns=turns)
    cfg.validate()
    out_dir = Path(out_dir)
    (out_dir / "images" / split).mkdir(parents=True, exist_ok=True)
    jobs = [(i, split, seed, cfg, str(out_dir)) for i in range(n)]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n, desc=f"synthetic {split}", unit="img")
    records: list[dict[str, Any]] = []
    if workers > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(workers) as pool:
            for r in pool.imap(_make_and_save, jobs, chunksize=64):
                records.append(r)
                if bar is not None:
                    bar.update()
    else:
        for job in jobs:
            records.append(_make_and_save(job))
            if bar is not None:
                bar.update()
    if bar is not None:
        bar.close()
    json_path = out_dir / f"{split}.json"
    json_path.write_text(json.dumps(records, indent=1) + "\n")
    (out_dir / f"{split}.meta.json").write_text(json.dumps(_split_meta(split, n, seed, cfg), indent=1) + "\n")
    return json_path


def ensure_split(
    out_dir: str | Path,
    split: str,
    n: int,
    seed: int,
    cfg: SyntheticConfig | None = None,
) -> Path:
    """``out_dir/<split>.json`` as ``generate_split`` would write it, reusing an existing copy.

    A split that this module wrote (it has ``<split>.meta.json``) is reused only if it was written
    with the same ``n``, ``seed`` and generator config; otherwise it is written again (its images
    first removed), with a note on stderr naming what changed -- a config that asks for 8,000
    training records never trains on the 2,000 left by an earlier run. A JSON file without that
    meta file is someone's own data and is returned untouched.
    """
    out_dir = Path(out_dir)
    json_path = out_dir / f"{split}.json"
    meta_path = out_dir / f"{split}.meta.json"
    cfg = cfg or SyntheticConfig.for_split(split)
    if json_path.exists():
        if not meta_path.is_file():
            return json_path
        try:
            old = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError):
            old = {}
        want = json.loads(json.dumps(_split_meta(split, n, seed, cfg)))  # as read back: tuples -> lists
        changed = [k for k in ("n", "seed", "config") if old.get(k) != want[k]]
        if not changed:
            return json_path
        diff = ", ".join(
            f"{k} {old.get(k)!r} -> {want[k]!r}" if k != "config" else "generator config" for k in changed
        )
        print(f"note: rewriting {json_path} ({diff})", file=sys.stderr, flush=True)
        shutil.rmtree(out_dir / "images" / split, ignore_errors=True)
    return generate_split(out_dir, split=split, n=n, seed=seed, cfg=cfg)


# --------------------------------------------------------------------------------------------
# Text for tokenizer training


def text_corpus(n: int = 1000, seed: int = 0) -> list[str]:
    """Every question and answer string the benchmark can produce, then ``n`` sampled QA lines.

    The first part enumerates all filled templates (with the answer suffix), all answers and the
    vocabulary words; the second is ``n`` records' "question answer" text (no images rendered),
    drawn from train and ood streams, so token frequencies look like the data.
    """
    out: list[str] = []
    for sh in SHAPES:
        out.append(_question("color", shape=sh))
        out.append(_question("count", shapes=SHAPE_PLURALS[sh]))
        for c in COLORS:
            out.append(_question("exist", color=c, shape=sh))
        for other in SHAPES:
            if other != sh:
                out.append(_question("position", shape=sh, other=other))
    out += list(COLORS) + list(COUNT_WORDS) + list(POSITIONS) + ["yes", "no"]
    out += list(SHAPES) + list(SHAPE_PLURALS.values()) + [ANSWER_SUFFIX, "<image>"]
    cfg_ood = SyntheticConfig.for_split("ood")
    for i in range(n):
        split = "ood" if i % 5 == 4 else "train"
        rec, _ = make_record(i, split, seed + 7919, cfg_ood if split == "ood" else None, render=False)
        conv = rec["conversations"]
        for t in range(0, len(conv), 2):
            out.append(conv[t]["value"].replace("<image>\n", "") + " " + conv[t + 1]["value"])
    return out


# --------------------------------------------------------------------------------------------
# Patch coverage


# A patch "is" an object patch when object boxes cover at least this fraction of it: what the
# premise report counts as the patches stage 1 must keep (thinner slivers are not asked for).
OBJECT_PATCH_COVERAGE = 0.25


def object_patches(
    boxes: list[list[int]] | np.ndarray, image_size: int | tuple[int, int], patch_size: int
) -> np.ndarray:
    """(N_patches,) bool: :func:`patch_coverage` >= :data:`OBJECT_PATCH_COVERAGE`."""
    return patch_coverage(boxes, image_size, patch_size) >= OBJECT_PATCH_COVERAGE


def patch_coverage(
    boxes: list[list[int]] | np.ndarray, image_size: int | tuple[int, int], patch_size: int
) -> np.ndarray:
    """Fraction of each patch covered by the union of ``boxes`` ([x0, y0, x1, y1], exclusive ends).

    Returns (N_patches,) float64 in row-major patch order (the vision tower's order).
    """
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    if h % patch_size or w % patch_size:
        raise ValueError(f"patch_size = {patch_size} must divide image size {h}x{w}")
    mask = np.zeros((h, w), dtype=np.float64)
    for x0, y0, x1, y1 in np.asarray(boxes, dtype=np.int64).reshape(-1, 4):
        mask[max(y0, 0) : min(y1, h), max(x0, 0) : min(x1, w)] = 1.0
    p = patch_size
    return mask.reshape(h // p, p, w // p, p).mean(axis=(1, 3)).reshape(-1)


# --------------------------------------------------------------------------------------------
# CLI


def _bench(n: int, seed: int) -> int:
    """Print sample_batch's rate (wall clock and per CPU-second of this process) on ``n`` images."""
    import time

    sample_batch(16, seed)  # warm the caches (masks, texture banks)
    wall, cpu = time.perf_counter(), time.process_time()
    sample_batch(n, seed)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(
        f"sample_batch: {n} images in {wall:.2f} s = {n / wall:.0f} images/s ({n / cpu:.0f} per CPU-second)"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m tpkit.data.synthetic", description="Write a split of the synthetic LLaVA benchmark."
    )
    ap.add_argument("--out", help="output directory (gets <split>.json and images/<split>/)")
    ap.add_argument("--split", default="train", choices=SPLITS)
    ap.add_argument("--n", type=int, default=1000, help="number of records")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--turns", type=int, default=None, help="QA turns per record (1-3; default 1)")
    ap.add_argument("--image-size", type=int, default=None, help="image side in pixels (default 96)")
    ap.add_argument("--workers", type=int, default=1, help="processes (output identical for any value)")
    ap.add_argument(
        "--bench",
        type=int,
        default=0,
        metavar="N",
        help="only time sample_batch on N images (no files written)",
    )
    args = ap.parse_args(argv)
    if args.bench:
        return _bench(args.bench, args.seed)
    if not args.out:
        ap.error("--out is required (unless --bench)")
    try:
        overrides = {} if args.image_size is None else {"image_size": args.image_size}
        cfg = SyntheticConfig.for_split(args.split, **overrides)
        path = generate_split(
            args.out,
            args.split,
            args.n,
            args.seed,
            cfg,
            turns=args.turns,
            workers=args.workers,
            progress=True,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.n} records to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
