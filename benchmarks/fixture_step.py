"""The fixture recipe's VQA-phase training step, side by side: the language model's attention as
sdpa and as eager (``attention`` in configs/fixture/*.yaml), CPU; for either embedded model (the
config's ``model``: llava or qwen2-vl).

    python benchmarks/fixture_step.py [--config configs/fixture/tiny_cpu.yaml] [--batch 32] [--tokens 250]
    python benchmarks/fixture_step.py --config configs/fixture/tiny_qwen2_vl_cpu.yaml --batch 16 --tokens 300 --threads 1
                                   [--steps 8] [--threads 2]

One step = the recipe's own answer loss (``answer_loss``: tower, projector, LM, CE on the answer
tokens) with what trains in its VQA phase (the LLaVA's tower frozen, Qwen2-VL whole) under its
autocast + backward + AdamW, on one fixed left-padded batch shaped like the recipe's records (the
config's image tokens; every other row padded by 20 tokens). The two kernels are timed round-robin on
the same model (so machine noise hits them alike); medians of wall and of this process's CPU time
are reported (on a shared machine the CPU time is the steadier figure). The last line is the
headline: eager's step time over sdpa's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from tpkit.config import load_config
from tpkit.models.loading import resolve_device
from tpkit.synthetic.fixture.config import FixtureConfig
from tpkit.synthetic.fixture.data import image_norm
from tpkit.synthetic.fixture.loop import adamw, autocast_for
from tpkit.synthetic.fixture.recipe import fixture_model
from tpkit.synthetic.fixture.vqa import answer_loss

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "fixture" / "tiny_cpu.yaml"))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument(
        "--tokens", type=int, default=250, help="sequence length (the CPU config's records: 215-265)"
    )
    ap.add_argument(
        "--steps", type=int, default=8, help="timed steps per kernel (after 2 warm-up steps each)"
    )
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(FixtureConfig, args.config, ["device=cpu"])
    device = resolve_device(cfg.device)
    kind = fixture_model(cfg)
    processor = kind.processor(cfg)
    torch.manual_seed(0)
    model = kind.model_class(kind.config(cfg, processor))
    kind.train_mode(model, cfg)
    tc = cfg.tower
    n_img = (tc.image_size // tc.patch_size) ** 2  # image tokens: patches, or merged units
    if cfg.model == "qwen2-vl":
        n_img //= tc.merge_size**2
    b, t = args.batch, args.tokens
    pad = 20
    if t < pad + n_img + 40:
        ap.error(f"--tokens must be >= {pad + n_img + 40} (the image takes {n_img})")
    tok = processor.tokenizer
    ids = torch.randint(10, len(tok), (b, t))
    ids[torch.isin(ids, torch.tensor(tok.all_special_ids))] = 10  # text only, placeholders below
    ids[:, pad + 5 : pad + 5 + n_img] = model.config.image_token_id
    mask = torch.ones(b, t, dtype=torch.long)
    mask[::2, :pad] = 0  # left padding in every other row
    labels = torch.full_like(ids, -100)
    labels[:, -12:] = ids[:, -12:]
    images = torch.randint(0, 256, (b, tc.image_size, tc.image_size, 3), dtype=torch.uint8)
    inputs = kind.inputs(model, ids, mask, kind.pixels(cfg, images, image_norm(processor, device)))
    opt = adamw(model, 1e-4, 0.0, device)

    def step(kernel: str) -> tuple[float, float]:
        model.set_attn_implementation({"text_config": kernel})
        t0, c0 = time.perf_counter(), time.process_time()
        with autocast_for(device, cfg.precision):
            loss, _, _ = answer_loss(model, ids, mask, labels, inputs)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - t0, time.process_time() - c0

    kernels = ("sdpa", "eager")
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in kernels}
    for i in range(args.steps + 2):
        for k in kernels:
            dt = step(k)
            if i >= 2:
                times[k].append(dt)
    med = {k: statistics.median(w for w, _ in v) for k, v in times.items()}
    cpu = {k: statistics.median(c for _, c in v) for k, v in times.items()}
    print(
        f"base recipe {cfg.model} VQA step, {args.config}: batch {b} x {t} tokens ({n_img} image tokens), "
        f"precision {cfg.precision}, {torch.get_num_threads()} threads, median of {args.steps}"
    )
    for k in kernels:
        print(f"  {k:6s} {med[k] * 1000:8.0f} ms wall {cpu[k] * 1000:8.0f} ms CPU")
    print(f"eager / sdpa step time: {med['eager'] / med['sdpa']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
