"""The stage-1 premise report: do few patches resemble CLS, and are they the objects?

Over a split of the synthetic benchmark (records with object boxes), for the model's stage-1 score
(:mod:`tpkit.pruning`'s CLS cosine by default) cut at the default knee, it measures:

- the fraction of patches kept per image (mean, p10, p90);
- recall of object patches: of the patches at least 25% covered by an object box, how many are kept
  (and, for reference, of every patch a box touches);
- AUROC of the score for object patches (>= 25% covered vs the rest), per image then averaged, and
  pooled over all patches of all images;
- the same numbers for a pixel-level control, per-patch max chroma (max - min over RGB) with the
  same knee. The benchmark puts saturated clutter in the background so that this control is weak;
  the model's score must beat it.

Writes ``premise.json`` (numbers) and ``curves.png`` (16 sorted score curves with their knees and
object patches marked; ``curves_pixel.png`` for the control). Command line::

    tpkit data synthetic --out outputs/synth --split test --n 300 --seed 0
    tpkit premise --model assets/tiny-llava --data outputs/synth --n 300 --out outputs/premise
    tpkit premise --data outputs/synth --n 300 --out outputs/premise_pixel  # control only

Measured (2-core CPU, 2026-11-26): pixel control on that test split keeps 47.0% (p10 36.8%, p90
56.2%), recall 0.957 of >= 25%-covered patches, AUROC 0.771 per image (0.767 pooled); at a fixed
25% (``--selector ratio``) its recall is 0.48.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import AutoImageProcessor

from tpkit.data.processor import build_image_processor
from tpkit.evaluation.retention import COVERED, patch_coverage
from tpkit.models.loading import load_pretrained
from tpkit.models.registry import family_of
from tpkit.pruning.config import Stage1Config
from tpkit.pruning.stage1 import select_patches

__all__ = [
    "COVERED",
    "auroc",
    "chroma_scores",
    "tower_scores",
    "premise_stats",
    "load_records",
    "run_premise",
    "plot_curves",
    "format_report",
]

TARGETS = {"kept_mean_max": 0.30, "recall_min": 0.90, "auroc_min": 0.90}


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for binary ``labels`` (Mann-Whitney U, ties count half).

    NaN when one class is empty.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=bool).ravel()
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    # average 1-based ranks over runs of ties
    starts = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]])
    ends = np.r_[starts[1:], len(s)]
    avg = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(avg, ends - starts)
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def chroma_scores(images: np.ndarray, patch_size: int) -> np.ndarray:
    """Pixel control: per-patch max chroma of uint8 images (B, H, W, 3) -> (B, P) float32, row-major."""
    x = np.asarray(images)
    b, h, w, _ = x.shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"patch_size = {patch_size} must divide image size {h}x{w}")
    chroma = x.max(-1).astype(np.int16) - x.min(-1)  # (B, H, W)
    p = patch_size
    return chroma.reshape(b, h // p, p, w // p, p).max(axis=(2, 4)).reshape(b, -1).astype(np.float32)


def tower_scores(model: torch.nn.Module, pixel_values: torch.Tensor, cfg: Stage1Config) -> torch.Tensor:
    """The stage-1 score of every patch (B, P) of one square view per image (B, 3, S, S), computed by
    the pruner's own code for the model's family."""
    return family_of(model).view_scores(model, pixel_values, cfg)


def premise_stats(
    scores: np.ndarray, coverage: np.ndarray, cfg: Stage1Config, keep_counts: np.ndarray | None = None
) -> dict[str, Any]:
    """Numbers of the report for scores (B, P) and box coverage (B, P), with ``cfg``'s knee.

    ``keep_counts`` (B,) replaces the knee by fixed per-image counts (a matched-budget comparison).
    """
    s = torch.as_tensor(np.asarray(scores, dtype=np.float32))
    forced = None if keep_counts is None else torch.as_tensor(np.asarray(keep_counts), dtype=torch.long)
    keep, k = select_patches(s, cfg, forced)  # (B, P) bool, (B,)
    keep_np, k_np = keep.numpy(), k.numpy()
    cov = np.asarray(coverage, dtype=np.float64)
    obj = cov >= COVERED
    touched = cov > 0
    frac = k_np / s.shape[1]
    per_image = [auroc(si, oi) for si, oi in zip(scores, obj)]
    per_image = [a for a in per_image if not np.isnan(a)]
    srt = np.sort(np.asarray(scores, dtype=np.float64), axis=1)[:, ::-1]
    lo, hi = srt[:, -1:], srt[:, :1]
    norm = (srt - lo) / np.where(hi - lo > 0, hi - lo, 1.0)  # each curve min-max normalised
    deciles = norm[:, np.round(np.linspace(0, s.shape[1] - 1, 11)).astype(int)].mean(0)
    return {
        "n_images": int(s.shape[0]),
        "n_patches": int(s.shape[1]),
        "kept_mean": float(frac.mean()),
        "kept_p10": float(np.percentile(frac, 10)),
        "kept_p90": float(np.percentile(frac, 90)),
        "recall_covered": float((keep_np & obj).sum() / max(obj.sum(), 1)),
        "recall_touched": float((keep_np & touched).sum() / max(touched.sum(), 1)),
        "auroc_per_image": float(np.mean(per_image)) if per_image else float("nan"),
        "auroc_pooled": auroc(np.asarray(scores), obj),
        "object_patch_fraction": float(obj.mean()),
        "curve_deciles": [round(float(v), 4) for v in deciles],
        "k": k_np.tolist(),
    }


def load_records(data: str | Path, split: str = "test") -> tuple[list[dict[str, Any]], Path]:
    """Records of a LLaVA-JSON file with ``objects`` (or ``<dir>/<split>.json``) and the image root."""
    path = Path(data)
    if path.is_dir():
        path = path / f"{split}.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no such file; generate it with "
            f"`tpkit data synthetic --out {path.parent} --split {split} --n 300 --seed 0`"
        )
    records = json.loads(path.read_text())
    for i, r in enumerate(records):
        if "objects" not in r or "image" not in r:
            raise ValueError(f"{path}: record {i} (id {r.get('id')!r}) has no 'objects'/'image' key")
    return records, path.parent


def plot_curves(
    scores: np.ndarray, k: list[int], coverage: np.ndarray, path: str | Path, title: str, n: int = 16
) -> None:
    """A 4x4 grid of sorted score curves: knee as a vertical line, object patches as red dots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(n, len(scores))
    cols = 4
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
    for i, ax in enumerate(axes.ravel()):
        if i >= n:
            ax.axis("off")
            continue
        order = np.argsort(-np.asarray(scores[i]), kind="stable")
        srt = np.asarray(scores[i])[order]
        obj = np.asarray(coverage[i])[order] >= COVERED
        ax.plot(srt, color="0.3", lw=1.0)
        ax.scatter(np.flatnonzero(obj), srt[obj], s=6, color="red", zorder=3, label="object patch")
        ax.axvline(k[i] - 0.5, color="tab:blue", lw=1.0, ls="--", label="knee")
        rec = (obj[: k[i]]).sum() / max(obj.sum(), 1)
        ax.set_title(f"#{i}: keep {k[i]}/{len(srt)}, recall {rec:.2f}", fontsize=8)
        ax.tick_params(labelsize=6)
    axes[0, 0].legend(fontsize=6)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _load_model(model_dir: str | Path, device: str) -> tuple[torch.nn.Module, Any]:
    """The model and its saved image processor (None: none saved, or one that packs patches into rows,
    as Qwen's does: the premise then makes its square views with the kit's CLIP preprocessing, whose
    mean and std are also Qwen's). InternVL's returns one resized view per image (its processor asks
    for the tiles)."""
    model = load_pretrained(model_dir, dtype="float32", device=device)
    try:
        image_processor = AutoImageProcessor.from_pretrained(str(model_dir))
    except (OSError, ValueError, ImportError):  # a bare model directory, or a processor needing torchvision
        return model, None
    probe = image_processor(images=[Image.new("RGB", (16, 16))], return_tensors="pt")["pixel_values"]
    return model, image_processor if probe.dim() >= 4 else None  # (patches, values): packed


def _base_views(image_processor: Any, images: list) -> torch.Tensor:
    """One square view per image (B, 3, S, S): the processed image, or an any-res processor's base
    view (its first; the crops that follow are left out of the premise)."""
    px = image_processor(images=images, return_tensors="pt")["pixel_values"]
    return px[:, 0] if px.dim() == 5 else px


def run_premise(
    data: str | Path,
    model_dir: str | Path | None = None,
    n: int = 300,
    out_dir: str | Path | None = None,
    cfg: Stage1Config | None = None,
    patch_size: int = 8,
    batch_size: int = 32,
    device: str = "cpu",
    progress: bool = False,
) -> dict[str, Any]:
    """The premise report over the first ``n`` records of ``data``; writes files if ``out_dir``.

    Without ``model_dir`` only the pixel control is measured (at ``patch_size``); with it, the grid
    is the one the family scores (the tower's patches; Qwen's merged units) and images are resized
    to the family's view (``Family.premise_view``) for the control and the boxes.
    """
    cfg = cfg or Stage1Config()
    records, root = load_records(data)
    records = records[:n]
    model = image_processor = None
    if model_dir is not None:
        model, image_processor = _load_model(model_dir, device)
        cfg = copy.copy(cfg)
        cfg.score = family_of(model).score_kind(model, cfg)  # the family's default, named
    size = None
    model_scores, pixel_scores, coverage = [], [], []
    batches = range(0, len(records), batch_size)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc="premise", unit="batch")
    for start in batches:
        chunk = records[start : start + batch_size]
        pil = []
        for r in chunk:
            path = root / r["image"]
            try:
                with Image.open(path) as im:
                    pil.append(im.convert("RGB"))
            except OSError as e:
                raise OSError(f"{path}: cannot read image of record {r.get('id')!r}: {e}") from e
        if size is None:  # the model's view (the tower's input, or for Qwen the images' own size)
            size = pil[0].size[0]
            if model is not None:
                size, patch_size = family_of(model).premise_view(model, size)
                image_processor = image_processor or build_image_processor(size)
        arrays = []
        for r, im in zip(chunk, pil):
            w0, h0 = im.size
            if (w0, h0) != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
            arrays.append(np.asarray(im))
            boxes = np.asarray([o["box"] for o in r["objects"]], dtype=np.float64).reshape(-1, 4)
            boxes *= np.array([size / w0, size / h0, size / w0, size / h0])
            coverage.append(patch_coverage(np.rint(boxes).astype(int), size, patch_size))
        pixel_scores.append(chroma_scores(np.stack(arrays), patch_size))
        if model is not None:
            px = _base_views(image_processor, pil).to(device)
            model_scores.append(tower_scores(model, px, cfg).float().cpu().numpy())
    cov = np.stack(coverage)  # (n, P)
    report: dict[str, Any] = {
        "data": str(data),
        "model": None if model_dir is None else str(model_dir),
        "n": len(records),
        "covered_threshold": COVERED,
        "stage1": {
            "score": cfg.score,
            "selector": cfg.selector,
            "min_keep": cfg.min_keep,
            "max_keep": cfg.max_keep,
        },
        "targets": TARGETS,
        "pixel_control": premise_stats(np.concatenate(pixel_scores), cov, cfg),
    }
    if model is not None:
        m = premise_stats(np.concatenate(model_scores), cov, cfg)
        p = report["pixel_control"]
        report["model_score"] = m
        # the control at the model's per-image kept counts: same budget, which score finds more objects
        report["pixel_control_matched"] = premise_stats(
            np.concatenate(pixel_scores), cov, cfg, np.array(m["k"])
        )
        report["checks"] = {
            "kept_mean<=0.30": m["kept_mean"] <= TARGETS["kept_mean_max"],
            "recall_covered>=0.90": m["recall_covered"] >= TARGETS["recall_min"],
            "auroc_per_image>=0.90": m["auroc_per_image"] >= TARGETS["auroc_min"],
            "beats_pixel_auroc": m["auroc_per_image"] > p["auroc_per_image"],
            "beats_pixel_recall_matched": m["recall_covered"]
            > report["pixel_control_matched"]["recall_covered"],
        }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "premise.json").write_text(json.dumps(report, indent=1) + "\n")
        p = report["pixel_control"]
        plot_curves(
            np.concatenate(pixel_scores),
            p["k"],
            cov,
            out / "curves_pixel.png",
            "pixel control: per-patch max chroma",
        )
        if model is not None:
            plot_curves(
                np.concatenate(model_scores),
                report["model_score"]["k"],
                cov,
                out / "curves.png",
                f"stage-1 {cfg.score} ({cfg.selector} knee)",
            )
    return report


def format_report(report: dict[str, Any]) -> str:
    """A fixed-width table of the report's numbers."""
    rows = [("pixel (max chroma)", report["pixel_control"])]
    if "model_score" in report:
        rows.insert(0, (f"model ({report['stage1']['score']})", report["model_score"]))
        rows.append(("pixel @ model's k", report["pixel_control_matched"]))
    first = rows[0][1]
    lines = [
        f"premise over {report['n']} images ({first['n_patches']} patches each), "
        f"selector {report['stage1']['selector']}, min_keep {report['stage1']['min_keep']}; "
        f"object patch = box covers >= {COVERED:.0%} ({first['object_patch_fraction']:.1%} of patches)",
        f"{'score':<20} {'kept':>6} {'p10':>6} {'p90':>6} {'rec>=25%':>9} {'rec>0':>6} "
        f"{'AUROC/img':>9} {'AUROC':>6}",
    ]
    for name, r in rows:
        lines.append(
            f"{name:<20} {r['kept_mean']:6.1%} {r['kept_p10']:6.1%} {r['kept_p90']:6.1%} "
            f"{r['recall_covered']:9.3f} {r['recall_touched']:6.3f} {r['auroc_per_image']:9.3f} "
            f"{r['auroc_pooled']:6.3f}"
        )
    for name, r in rows[:2]:
        lines.append(f"{name} sorted-curve deciles: " + " ".join(f"{v:.2f}" for v in r["curve_deciles"]))
    if "checks" in report:
        lines.append(
            "checks: " + ", ".join(f"{k} {'PASS' if v else 'FAIL'}" for k, v in report["checks"].items())
        )
    return "\n".join(lines)
