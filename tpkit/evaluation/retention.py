"""Do the kept patches include the objects the question is about?

A record may say which objects its (first) question names, with their pixel boxes:
``"named_objects": [{"box": [x0, y0, x1, y1], ...}, ...]`` (exclusive ends; the synthetic benchmark
writes it). A method's kept visual tokens can then be checked directly: after stage 1
(the patches the LLM sees at all) and after stage 2 (the patches the layers from ``stage2.layer`` on
see). Each is compared with a random choice of the same number of patches from the same pool (all
patches for stage 1, the stage-1 kept set for stage 2), computed exactly, not sampled: a stage that
keeps the named objects no more often than chance is not using the question or the image.

An object counts as kept when at least one of its patches is kept; its patches are those its box
covers by at least ``COVERED`` (the premise report's definition), or the most covered patch of an
object too small to cover any patch that much.
"""

from __future__ import annotations

from collections.abc import Sequence
from math import comb
from typing import Any

import numpy as np
import torch
from PIL import Image

__all__ = [
    "COVERED",
    "patch_coverage",
    "object_cells",
    "named_cells",
    "dataset_cells",
    "p_all_hit",
    "retention",
]

# A patch "is" an object patch when object boxes cover at least this fraction of it: thinner slivers
# are not asked for (the premise report and stage-1 recall count the same way).
COVERED = 0.25


def patch_coverage(
    boxes: Sequence[Sequence[int]] | np.ndarray, image_size: int | tuple[int, int], patch_size: int
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


def object_cells(box: Sequence[int], image_size: int, patch_size: int, scale: float = 1.0) -> frozenset[int]:
    """Patch indices (row-major, the tower's order) of one object box given in source-image pixels.

    ``scale`` maps source pixels to the tower's input (tower side / source side).
    """
    b = [int(round(v * scale)) for v in box]
    cov = patch_coverage([b], image_size, patch_size)  # (N,)
    cells = np.flatnonzero(cov >= COVERED)
    if cells.size == 0 and cov.max() > 0:
        cells = np.flatnonzero(cov == cov.max())
    return frozenset(int(c) for c in cells)


def named_cells(
    records: Sequence[dict[str, Any]], image_size: int, patch_size: int, source_size: int | None = None
) -> list[list[frozenset[int]] | None]:
    """Per record, the patch sets of the objects its question names (``record["named_objects"]``;
    None where a record has none).

    ``source_size``: side of the records' images in pixels (None = ``image_size``).
    """
    scale = image_size / source_size if source_size else 1.0
    out: list[list[frozenset[int]] | None] = []
    for r in records:
        objs = r.get("named_objects")
        if not objs:
            out.append(None)
            continue
        cells = [object_cells(o["box"], image_size, patch_size, scale) for o in objs]
        out.append([c for c in cells if c] or None)
    return out


def p_all_hit(objects: Sequence[frozenset[int]], pool: frozenset[int], k: int) -> float:
    """Probability that ``k`` patches drawn uniformly without replacement from ``pool`` hit every object.

    Inclusion-exclusion over the objects missed: sum over subsets S of (-1)^|S| C(P - |U_S|, k) / C(P, k),
    with U_S the union of S's patches inside the pool.
    """
    p = len(pool)
    k = min(max(k, 0), p)
    sets = [c & pool for c in objects]
    total = comb(p, k)
    if total == 0:
        return 0.0
    acc = 0.0
    n = len(sets)
    for mask in range(1 << n):
        union: set[int] = set()
        bits = 0
        for i in range(n):
            if mask >> i & 1:
                union |= sets[i]
                bits += 1
        acc += (-1) ** bits * comb(p - len(union), k) / total
    return max(0.0, min(1.0, acc))


def retention(
    cells: Sequence[list[frozenset[int]] | None],
    kept: Sequence[torch.Tensor | None],
    pool: Sequence[torch.Tensor | None] | int,
    qtypes: Sequence[str | None] | None = None,
) -> dict[str, Any] | None:
    """How often every named object keeps a patch, vs a random choice of as many from ``pool``.

    ``cells``: per sample, the named objects' patch sets (``named_cells``); ``kept``: per sample, the
    kept patch indices (None: sample not pruned); ``pool``: per sample, the indices chosen from, or the
    patch count N (all patches). Returns ``n`` (samples counted), ``all_kept`` (share of samples whose
    named objects all keep a patch), ``random_all_kept`` (its expectation for the random choice),
    ``object_recall`` (share of named objects that keep a patch), ``kept_patches`` (mean), and the
    same per question type under ``by_qtype``; None when no sample applies.
    """
    rows: list[tuple[str | None, float, float, float, int, int]] = []
    every = frozenset(range(pool)) if isinstance(pool, int) else None
    for i, objs in enumerate(cells):
        if objs is None or i >= len(kept) or kept[i] is None:
            continue
        k = set(kept[i].tolist())
        if every is not None:
            pl = every
        elif pool[i] is None:
            continue
        else:
            pl = frozenset(pool[i].tolist())
        hit = [bool(c & k) for c in objs]
        rows.append(
            (
                qtypes[i] if qtypes else None,
                float(all(hit)),
                p_all_hit(objs, pl, len(k & pl)),
                sum(hit) / len(hit),
                len(k),
                len(objs),
            )
        )
    if not rows:
        return None

    def summary(rs: list[tuple]) -> dict[str, Any]:
        objects = sum(r[5] for r in rs)
        return {
            "n": len(rs),
            "all_kept": float(np.mean([r[1] for r in rs])),
            "random_all_kept": float(np.mean([r[2] for r in rs])),
            "object_recall": sum(r[3] * r[5] for r in rs) / objects,
            "kept_patches": float(np.mean([r[4] for r in rs])),
        }

    out = summary(rows)
    types = sorted({r[0] for r in rows if r[0] is not None})
    if types:
        out["by_qtype"] = {q: summary([r for r in rows if r[0] == q]) for q in types}
    return out


def dataset_cells(ds, vision_config) -> tuple[list | None, int]:
    """Per sample, the patch sets of the objects its question names, and the patch count N.

    (None, N) unless the records (a ``datasets.Dataset``) carry ``named_objects``.
    """
    vc = vision_config
    n_patches = (vc.image_size // vc.patch_size) ** 2
    if "named_objects" not in ds.column_names or len(ds) == 0:
        return None, n_patches
    rows = ds.select_columns([c for c in ("named_objects", "image_path") if c in ds.column_names]).to_list()
    source = None
    if rows[0].get("image_path"):
        with Image.open(rows[0]["image_path"]) as im:
            source = im.size[0]
    cells = named_cells(rows, vc.image_size, vc.patch_size, source)
    return (cells if any(c is not None for c in cells) else None), n_patches
