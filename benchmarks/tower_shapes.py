"""How fast a fixture config's Qwen2-VL tower learns the six shapes when it is told them directly.

The second embedded model must learn shapes from the answers alone, through its language model. This
script asks the easier question first: trained from fresh weights with a linear head on each merged
unit (the merger's output) and cross-entropy against the shape of the object whose box holds the
unit's centre (the labels of ``tower_probe.py``; background units left out), how many steps does the
tower need? Scored on the object units of held-back images of the same kind, every ``--every`` steps.

Scenes: ``train`` (the train split: 1-5 objects of 11-19 px on textured backgrounds with clutter) or
``one-large`` (one object of 30-40 px on a plain background, no clutter, little noise: the easiest
case). A tower that needs thousands of directly supervised steps here needs far more from the answers.

    python benchmarks/tower_shapes.py --config configs/fixture/tiny_qwen2_vl_cpu.yaml --scenes one-large
    python benchmarks/tower_shapes.py --config configs/fixture/tiny_qwen2_vl_cpu.yaml \\
        --set tower.hidden_size=128 tower.intermediate_size=512 tower.num_heads=4
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without install
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tower_probe's labels

from tower_probe import unit_labels  # noqa: E402

from tpkit.config import load_config  # noqa: E402
from tpkit.models.qwen2_vl.tower import run_tower  # noqa: E402
from tpkit.synthetic.fixture.config import FixtureConfig  # noqa: E402
from tpkit.synthetic.fixture.data import image_norm  # noqa: E402
from tpkit.synthetic.fixture.loop import autocast_for  # noqa: E402
from tpkit.synthetic.fixture.qwen import Qwen2VLModel  # noqa: E402
from tpkit.synthetic.questions import make_record  # noqa: E402
from tpkit.synthetic.scenes import SyntheticConfig  # noqa: E402

# one object of 30-40 px on a plain background: no texture, no clutter of any kind, little noise
ONE_LARGE = dict(
    min_objects=1,
    max_objects=1,
    max_count=1,
    min_size=30,
    max_size=40,
    texture_amp=0.0,
    noise_std=3.0,
    min_lines=0,
    max_lines=0,
    min_dim_lines=0,
    max_dim_lines=0,
    min_blobs=0,
    max_blobs=0,
    min_partials=0,
    max_partials=0,
    min_dots=0,
    max_dots=0,
)


def images_and_labels(
    scenes: str, n_train: int, n_val: int, side: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """uint8 images and per-unit shape ids (0 = background) of ``n_train`` train and ``n_val`` val
    records -> (train images, train labels, val images, val labels, shape names)."""
    cfg = SyntheticConfig.for_split("train", **(ONE_LARGE if scenes == "one-large" else {}))
    recs, ims = [], []
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            r, im = make_record(i, split, 0, cfg)
            recs.append(r)
            ims.append(im)
    _, shapes, _, names = unit_labels(recs, ims[0].shape[0], side)  # one vocabulary for both
    x, y = torch.from_numpy(np.stack(ims)), torch.from_numpy(shapes)
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:], names


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="a fixture config with model: qwen2-vl")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides of --config")
    ap.add_argument("--scenes", choices=["train", "one-large"], default="train")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=6e-4)
    ap.add_argument("--every", type=int, default=100, help="score the val images every N steps")
    ap.add_argument("--n-train", type=int, default=8192)
    ap.add_argument("--n-val", type=int, default=256)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    cfg = load_config(FixtureConfig, args.config, args.set)
    if cfg.model != "qwen2-vl":
        raise SystemExit(f"{args.config}: model = {cfg.model!r}; this benchmark trains a qwen2-vl tower")
    if args.threads:
        torch.set_num_threads(args.threads)
    kind = Qwen2VLModel()
    processor = kind.processor(cfg)
    torch.manual_seed(cfg.seed)
    model = kind.model_class(kind.config(cfg, processor))
    side = cfg.tower.image_size // (cfg.tower.patch_size * cfg.tower.merge_size)
    xt, yt, xv, yv, names = images_and_labels(args.scenes, args.n_train, args.n_val, side)
    tower = model.model.visual
    head = torch.nn.Linear(model.config.text_config.hidden_size, len(names))
    params = list(tower.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=cfg.lm.weight_decay)
    cpu = torch.device("cpu")
    norm = image_norm(processor, cpu)

    def logits(images: torch.Tensor) -> torch.Tensor:  # (B, U, classes)
        visual = kind.pixels(cfg, images, norm)
        with autocast_for(cpu, cfg.precision):
            units = run_tower(model, visual["pixel_values"], visual["image_grid_thw"], False, False).embeds
        return head(units.float().reshape(len(images), side * side, -1))

    @torch.no_grad()
    def val_accuracy() -> float:
        tower.eval()
        pred = torch.cat([logits(xv[s : s + 64]).argmax(-1) for s in range(0, len(xv), 64)])
        tower.train()
        obj = yv > 0
        return float((pred[obj] == yv[obj]).float().mean())

    obj = yv[yv > 0]
    chance = float(torch.bincount(obj).max()) / len(obj)
    print(
        f"{args.scenes} scenes: {args.n_train} train / {args.n_val} val images, {side} x {side} units, "
        f"{len(names) - 1} shapes, {len(obj)} val object units (chance {chance:.3f}); "
        f"{sum(p.numel() for p in tower.parameters()):,} tower parameters"
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    tower.train()
    t0, curve, losses = time.perf_counter(), [], []
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(xt), (args.batch,), generator=gen)
        out, y = logits(xt[idx]), yt[idx]
        loss = F.cross_entropy(out[y > 0], y[y > 0])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.lm.grad_clip)
        opt.step()
        losses.append(loss.item())
        if step % args.every == 0 or step == args.steps:
            acc, mean_loss = val_accuracy(), sum(losses) / len(losses)  # the loss since the last line
            curve.append({"step": step, "loss": mean_loss, "val_shape_acc": acc})
            losses.clear()
            print(
                f"step {step:>5}  loss {mean_loss:.3f}  val shape accuracy {acc:.3f}  "
                f"{time.perf_counter() - t0:.0f} s",
                flush=True,
            )
    print(f"HEADLINE tower shape accuracy after {args.steps} steps: {curve[-1]['val_shape_acc']:.3f} "
          f"(chance {chance:.3f})")  # fmt: skip
    return {"curve": curve, "chance": chance}


if __name__ == "__main__":
    main()
