"""What a Qwen2-VL-kind model's vision tower encodes per merged unit, read by linear probes.

For each merged unit (the merger's output: the token the language model sees), the colour and the shape
of the synthetic object whose box holds the unit's centre; units on the background are left out. A multinomial
logistic regression is fitted on the units of the first 3/4 of the images and scored on the rest,
for each source of features:

* ``pixels``: the unit's own pixels (what a tower that learnt nothing beyond its patch could pass on);
* ``random init``: the same architecture with fresh weights (seed 0);
* each ``--model``: a saved model (``save_pretrained`` directory with its image processor), e.g. the
  second embedded model (`tpkit fixture --config configs/fixture/tiny_qwen2_vl_cpu.yaml`).

Colour sits in a unit's own pixels; shape needs the neighbouring patches (an object spans several
units), so a tower that learnt to see objects raises the shape column above the pixels' and the
random tower's. Chance is the share of the test units' most common class.

    python benchmarks/tower_probe.py --model assets/tiny-qwen2-vl        # the table on the last lines
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without install

from tpkit.models import load_processor  # noqa: E402
from tpkit.models.qwen2_vl.tower import run_tower  # noqa: E402
from tpkit.synthetic.questions import make_record  # noqa: E402
from tpkit.synthetic.scenes import SyntheticConfig  # noqa: E402


def scenes(n: int, split: str, seed: int) -> tuple[list[dict], np.ndarray]:
    """Records ``0..n-1`` of ``split`` (their objects) and their images (n, S, S, 3) uint8."""
    cfg = SyntheticConfig.for_split(split)
    recs, images = zip(*(make_record(i, split, seed, cfg) for i in range(n)))
    return list(recs), np.stack(images)


def unit_labels(records: list[dict], size: int, side: int) -> tuple[np.ndarray, np.ndarray, list, list]:
    """Per image and unit of a ``side`` x ``side`` grid over ``size`` px: (colour ids, shape ids), 0 on
    the background, and the colour and shape names (index 0 "background")."""
    colours = ["background"] + sorted({o["color"] for r in records for o in r["objects"]})
    shapes = ["background"] + sorted({o["shape"] for r in records for o in r["objects"]})
    ycol = np.zeros((len(records), side * side), np.int64)
    yshp = np.zeros_like(ycol)
    cell = size / side
    for i, r in enumerate(records):
        for u in range(side * side):
            cy, cx = (u // side + 0.5) * cell, (u % side + 0.5) * cell
            for o in r["objects"]:
                x0, y0, x1, y1 = o["box"]
                if x0 <= cx < x1 and y0 <= cy < y1:
                    ycol[i, u], yshp[i, u] = colours.index(o["color"]), shapes.index(o["shape"])
    return ycol, yshp, colours, shapes


@torch.no_grad()
def unit_embeddings(
    model: torch.nn.Module, image_processor, images: np.ndarray, batch: int = 64
) -> torch.Tensor:
    """(n, U, D) the merger's output per image, units row-major (one image = one grid)."""
    from PIL import Image

    out = []
    for s in range(0, len(images), batch):
        inputs = image_processor([Image.fromarray(a) for a in images[s : s + batch]], return_tensors="pt")
        run = run_tower(
            model, inputs["pixel_values"], inputs["image_grid_thw"], video=False, last_block=False
        )
        out.append(run.embeds.float().reshape(len(images[s : s + batch]), -1, run.embeds.shape[-1]))
    return torch.cat(out)


def unit_pixels(images: np.ndarray, side: int) -> torch.Tensor:
    """(n, side*side, cell*cell*3) each unit's pixels in [0, 1]."""
    n, size = images.shape[:2]
    cell = size // side
    x = torch.from_numpy(images[:, : side * cell, : side * cell]).float() / 255.0
    return x.reshape(n, side, cell, side, cell, 3).permute(0, 1, 3, 2, 4, 5).reshape(n, side * side, -1)


def probe(x: torch.Tensor, y: np.ndarray, n_fit: int, steps: int = 300) -> tuple[float, float]:
    """Logistic regression on the object units of images ``:n_fit``, scored on the others' ->
    (accuracy, chance). x (n, U, D); y (n, U), 0 = background (left out)."""
    yt = torch.from_numpy(y)
    x = (x - x[:n_fit].mean((0, 1))) / (x[:n_fit].std((0, 1)) + 1e-5)
    obj = yt > 0
    xf, yf = x[:n_fit][obj[:n_fit]], yt[:n_fit][obj[:n_fit]]
    xs, ys = x[n_fit:][obj[n_fit:]], yt[n_fit:][obj[n_fit:]]
    if len(yf) == 0 or len(ys) == 0:
        raise ValueError("no object unit to fit or to score: use more images (--n)")
    k = int(yt.max()) + 1
    torch.manual_seed(0)
    w = torch.zeros(x.shape[-1], k, requires_grad=True)
    b = torch.zeros(k, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(xf @ w + b, yf) + 1e-4 * w.square().sum()
        loss.backward()
        opt.step()
    with torch.no_grad():
        acc = float(((xs @ w + b).argmax(-1) == ys).float().mean())
    chance = float(torch.bincount(ys, minlength=k).max()) / len(ys)
    return acc, chance


def probe_both(x: torch.Tensor, ycol: np.ndarray, yshp: np.ndarray, n_fit: int) -> dict[str, float]:
    """The colour and the shape probes of one source of features, each with its chance."""
    (colour, colour_chance), (shape, shape_chance) = probe(x, ycol, n_fit), probe(x, yshp, n_fit)
    return {"colour": colour, "colour_chance": colour_chance, "shape": shape, "shape_chance": shape_chance}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", required=True, help="a saved model directory (repeatable)")
    ap.add_argument("--n", type=int, default=512, help="images (3/4 fit the probes, 1/4 score them)")
    ap.add_argument("--split", default="test", help="synthetic split the images come from")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    from transformers import AutoConfig, AutoModelForImageTextToText

    if args.threads:
        torch.set_num_threads(args.threads)
    records, images = scenes(args.n, args.split, args.seed)
    n_fit = (3 * args.n) // 4
    rows: dict[str, dict[str, float]] = {}
    labels = None
    for i, path in enumerate(args.model):
        image_processor = load_processor(path).image_processor  # the one the model was trained with
        model = AutoModelForImageTextToText.from_pretrained(path).float().eval()
        if not hasattr(model.model, "visual"):
            raise SystemExit(
                f"{path}: {type(model).__name__} has no Qwen2-VL-kind tower (model.model.visual)"
            )
        x = unit_embeddings(model, image_processor, images)
        side = int(round(x.shape[1] ** 0.5))
        if side * side != x.shape[1]:
            raise SystemExit(f"{path}: {x.shape[1]} units per image is no square grid")
        if labels is None:
            labels = unit_labels(records, images.shape[1], side)
            ycol, yshp = labels[0], labels[1]
            px = unit_pixels(images, side)
            rows["pixels"] = probe_both(px, ycol, yshp, n_fit)
        if i == 0:
            torch.manual_seed(0)
            fresh = type(model)(AutoConfig.from_pretrained(path)).float().eval()
            xr = unit_embeddings(fresh, image_processor, images)
            rows["random init"] = probe_both(xr, ycol, yshp, n_fit)
        rows[path] = probe_both(x, ycol, yshp, n_fit)
    n_obj = int((labels[0][n_fit:] > 0).sum())
    print(
        f"{args.n} {args.split} images, {side} x {side} units, {len(labels[2]) - 1} colours, "
        f"{len(labels[3]) - 1} shapes; {n_obj} object units scored (images {n_fit}..{args.n - 1})"
    )
    print("| features | colour | shape |")
    print("|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['colour']:.3f} | {r['shape']:.3f} |")
    first = next(iter(rows.values()))
    print(f"| chance (most common class) | {first['colour_chance']:.3f} | {first['shape_chance']:.3f} |")
    return {"rows": rows, "n_object_units": n_obj, "side": side}


if __name__ == "__main__":
    main()
