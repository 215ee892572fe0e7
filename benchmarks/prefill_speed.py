"""CPU prefill benchmark: dense vs ours at ~22% token-layer fraction, side by side in one run.

    python benchmarks/prefill_speed.py            # ~1 minute on a 2-core box (1 torch thread)
    python benchmarks/prefill_speed.py --arch internvl3-8b --scale-down 16 --batch-size 1   # a family's
                                                  # full-size shape, widths divided by 16
    python benchmarks/prefill_speed.py --arch gemma-3-4b --scale-down 16 --reuse-tower   # widths / 16
    python benchmarks/prefill_speed.py --arch qwen3.5-27b --scale-down 16 --reuse-tower --stage2-layer 3
                                                  # stage 2 at a full-attention layer of a hybrid decoder

``--reuse-tower``: the vision tower runs once and every timed call reuses its output (as a training
step shares it between student and teacher), so the prefill timed is the projector and the language
model, dense vs ours, measured directly. Scaled-down shapes need it: dividing widths does not shorten
the tower's sequence (Gemma 3: 4,096 patches), whose attention then takes most of a CPU prefill.

Model (``cpu-bench`` in tpkit.models.registry.architectures(), random weights, fp32): LLaVA-1.5's
prompt shape (35 text + 576 visual + 29 text = 640 tokens), a small CLIP tower, a 512-d 8-layer
Llama LM; batch 8. Ours runs with fixed counts (random weights have no meaningful CLS): stage 1
keeps 1.5 x 22% of the prompt, stage 2 at layer 2 brings the token-layer fraction to 22%. Calls are
interleaved (dense, ours, dense, ours, ...) and the medians compared. The last line is the headline.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="cpu-bench")
    p.add_argument("--scale-down", type=int, default=1, help="divide the architecture's widths by N")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--budget", type=float, default=0.22)
    p.add_argument(
        "--stage2-layer", type=int, default=2, help="stage 2's layer (a hybrid's: an attention one)"
    )
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    # one thread by default: on a shared 2-core box OpenMP spin-waiting makes 2-thread timings swing 2x
    # (both methods run on the same single core, so the ratio measures compute)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0 = torch's default)")
    p.add_argument("--reuse-tower", action="store_true", help="time the prefill after the vision tower")
    p.add_argument("--out", default="runs/bench_prefill")
    args = p.parse_args(argv)

    from tpkit.evaluation.config import EvalConfig
    from tpkit.evaluation.random_init import build_speed_model, evaluate_speed_only
    from tpkit.evaluation.report import speed_markdown
    from tpkit.models.registry import family_of
    from tpkit.training.module import reuse_tower_output

    cfg = EvalConfig()
    cfg.device = args.device
    cfg.out_dir = args.out
    cfg.random_init.name = args.arch
    cfg.random_init.dtype = args.dtype
    cfg.random_init.budget = args.budget
    cfg.random_init.scale_down = args.scale_down
    cfg.pruning.stage2.layer = args.stage2_layer
    cfg.speed.batch_size = args.batch_size
    cfg.speed.repeats = args.repeats
    cfg.speed.warmup = args.warmup
    cfg.speed.generation = False
    cfg.speed.threads = args.threads  # 0: torch's default
    model = build_speed_model(cfg)
    family = family_of(model)
    share = reuse_tower_output(family.vision_tower(model), family.tower_call_key)
    with share if args.reuse_tower else contextlib.nullcontext():
        res = evaluate_speed_only(cfg, model)
    print(speed_markdown(res["speed"]))
    frac = res["achieved"]["token_layer_fraction"]["mean"]
    lm = res["lm"]
    name = args.arch + (f" / {args.scale_down}" if args.scale_down > 1 else "")
    print(
        f"model {name}: LM {lm['hidden']}-d x {lm['num_layers']} layers, "
        f"{res['prompt']['n_visual']} visual + {res['prompt']['n_text']} text tokens, batch {args.batch_size}, "
        f"{res['device']} {args.dtype}; ours k1={res['counts']['k1']} k2={res['counts']['k2']} "
        f"(stage 2 at layer {res['counts']['stage2_layer']}), FLOPs/sample "
        + ", ".join(f"{k} {v:.1f} GFLOP" for k, v in res["flops_gflops_per_sample"].items())
    )
    if res["lm_prefill_speedup"] is not None and not args.reuse_tower:
        print(
            f"visual encoder (run in full by both) {res['vision_ms']:.0f} ms; the language model's prefill "
            f"alone: {res['lm_prefill_speedup']:.2f}x"
        )
    d, o = (
        res["speed"]["dense"]["prefill"]["median_ms"],
        res["speed"][f"ours@{args.budget:g}"]["prefill"]["median_ms"],
    )
    what = "prefill after the vision tower" if args.reuse_tower else "prefill"
    print(
        f"{what} speedup ours@{100 * frac:.1f}% token-layer fraction vs dense: {res['prefill_speedup']:.2f}x "
        f"({d:.0f} ms -> {o:.0f} ms median, batch {args.batch_size}, {res['device']})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
