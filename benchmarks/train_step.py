"""Training step time, side by side: plain LoRA, LoRA + pruning, LoRA + pruning + KD with the online
teacher, and with the teacher read from a teacher cache (tiny model, CPU).

    python benchmarks/train_step.py [--model assets/tiny-llava] [--batch 8] [--steps 10] [--threads 2]

One step = student forward + loss (+ teacher forward or cache read) + backward + AdamW step on one fixed
batch; the setups are timed round-robin (so machine noise hits them alike) and the median is reported.
The cache is built first (``tpkit teacher-cache``, full vocabulary, so its KD equals the online
KD); its build time per batch is reported too: it is paid once per record, shared by every epoch and
every run on the same base model and data. The last lines are the headline: KD's cost over
LoRA + pruning (target <= 1.6x), online and cached.
Default model: assets/tiny-llava when present, else a random model of the same shape.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from tpkit.config import from_dict
from tpkit.data.collator import LlavaCollator
from tpkit.models.loading import load_processor_for
from tpkit.synthetic.questions import synthetic_processor
from tpkit.training.config import TrainConfig
from tpkit.training.recipe import build_module, build_student

ROOT = Path(__file__).resolve().parents[1]

# the embedded base model's shape (configs/fixture/tiny_gpu.yaml): 96 px / patch 8 = 144 visual tokens
FIXTURE_SHAPE = {
    "hidden_size": 256,
    "num_layers": 4,
    "num_heads": 4,
    "num_kv_heads": 2,
    "intermediate_size": 512,
    "vision_hidden": 128,
    "vision_layers": 4,
    "vision_heads": 4,
}


def setups(model: dict) -> dict[str, dict]:
    off = {"stage1": {"enabled": False}, "stage2": {"enabled": False}}
    on = {"stage1": {"enabled": True}, "stage2": {"enabled": True, "layer": 2}}
    return {
        "lora": {"model": model, "pruning": off, "distill": {"alpha": 0.0}},
        "lora+prune": {"model": model, "pruning": on, "distill": {"alpha": 0.0}},
        "lora+prune+kd": {"model": model, "pruning": on, "distill": {"alpha": 1.0}},
        "lora+prune+kd(cache)": {"model": model, "pruning": on, "distill": {"alpha": 1.0}},
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="model dir (default: assets/tiny-llava, else random tiny)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch's default)")
    ap.add_argument(
        "--clock",
        choices=["cpu", "wall"],
        default="cpu",
        help="cpu: process CPU time (stable on a shared machine; use with --threads 1), wall: perf_counter",
    )
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    path = args.model or (
        str(ROOT / "assets" / "tiny-llava") if (ROOT / "assets" / "tiny-llava").is_dir() else None
    )
    model = {"path": path} if path else {"path": "tiny:llama", "tiny": FIXTURE_SHAPE}
    base_cfg = {"data": {"train_json": "unused.json"}, "lora": {"r": 8, "alpha": 16.0}}
    cfgs = {k: from_dict(TrainConfig, {**base_cfg, **v}) for k, v in setups(model).items()}
    processor = load_processor_for(next(iter(cfgs.values())).model) if path else synthetic_processor()

    from tpkit.data.llava_json import load_llava_json
    from tpkit.synthetic.splits import generate_split
    from tpkit.training.teacher_cache.build import build_teacher_cache

    tmp_cache = tempfile.TemporaryDirectory()
    with tempfile.TemporaryDirectory() as tmp:
        ds, _ = load_llava_json(generate_split(tmp, split="train", n=args.batch, seed=0))
        ds = [ds[i] for i in range(args.batch)]  # images are decoded by the collator below
        batch = LlavaCollator(processor, max_length=512, mode="train")(ds)
        # the cache: built twice, timed the second time (the first pays one-off warm-up costs)
        cache_cfg = cfgs["lora+prune+kd(cache)"]
        build_times = []
        for i in range(2):
            out = Path(tmp_cache.name) / f"cache{i}"
            t0 = clock()
            build_teacher_cache(
                cache_cfg,
                out,
                dataset=ds,
                processor=processor,
                batch_size=args.batch,
                device="cpu",
                progress=False,
            )
            build_times.append(clock() - t0)
        cfgs["lora+prune+kd(cache)"] = from_dict(
            TrainConfig,
            {
                **base_cfg,
                **setups(model)["lora+prune+kd(cache)"],
                "distill": {"alpha": 1.0, "teacher_cache": str(out)},
            },
        )

    runs = {}
    for name, cfg in cfgs.items():
        peft_model, attached = build_student(cfg, processor)
        module = build_module(cfg, peft_model, attached)
        module.model.train()
        opt = torch.optim.AdamW([p for p in module.model.parameters() if p.requires_grad], lr=1e-4)
        runs[name] = (module, opt, [])

    def step(module, opt) -> dict:
        parts = module.losses(batch)
        opt.zero_grad(set_to_none=True)
        parts["loss"].backward()
        opt.step()
        return parts

    kept = {}
    for i in range(args.warmup + args.steps):
        for name, (module, opt, times) in runs.items():
            t0 = clock()
            parts = step(module, opt)
            dt = clock() - t0
            if i >= args.warmup:
                times.append(dt)
            kept[name] = float(parts.get("kept_frac", torch.tensor(1.0)))

    T = batch["input_ids"].shape[1]
    print(
        f"model {path or 'random tiny (fixture shape)'}, batch {args.batch} x {T} tokens, "
        f"{torch.get_num_threads()} threads, {args.clock} clock, median of {args.steps} steps"
    )
    med = {name: statistics.median(times) for name, (_, _, times) in runs.items()}
    base = med["lora"]
    print(f"{'setup':<22}{'step ms':>10}{'vs lora':>10}{'token-layer frac':>18}")
    for name, m in med.items():
        print(f"{name:<22}{m * 1e3:>10.1f}{m / base:>10.2f}{kept[name]:>18.3f}")
    build = build_times[-1]
    print(
        f"{'teacher cache build':<22}{build * 1e3:>10.1f}{build / base:>10.2f}   (once per record, this batch)"
    )
    online = med["lora+prune+kd"] / med["lora+prune"]
    cached = med["lora+prune+kd(cache)"] / med["lora+prune"]
    print(f"KD step time over LoRA+pruning, online teacher: {online:.2f}x (target <= 1.6x)")
    print(f"KD step time over LoRA+pruning, teacher cache:  {cached:.2f}x (target <= 1.6x)")
    print("  counting the cache build, over the passes that share it (epochs x runs of a sweep):")
    for passes in (1, 2, 3, 5):
        total = (passes * med["lora+prune+kd(cache)"] + build) / (passes * med["lora+prune"])
        print(f"    {passes} pass(es): {total:.2f}x")
    tmp_cache.cleanup()


if __name__ == "__main__":
    main()
