"""CPU decoding benchmark: dense vs ours at ~22% token-layer fraction, tokens/s side by side in one run.

    python benchmarks/decode_speed.py            # ~1 minute on a 2-core box (1 torch thread)

Model (``cpu-bench`` in tpkit.models.registry.architectures(), random weights, fp32): LLaVA-1.5's prompt
shape (35 text + 576 visual + 29 text = 640 tokens), a small CLIP tower, a 512-d 8-layer Llama LM.
Both methods run transformers' ``generate`` for exactly ``--new-tokens`` greedy tokens (no eos); ours
prunes the prefill (stage 1 keeps 1.5 x 22% of the prompt, stage 2 at layer 2 brings the token-layer
fraction to 22%) and then decodes on its shorter cache. Decode tokens/s = batch x new tokens over
the time from the first new token to the last (noted by a stopping criterion inside one generate call);
calls are interleaved and the medians compared.
The last line is the headline.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="cpu-bench")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--budget", type=float, default=0.22)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0 = torch's default)")
    p.add_argument("--out", default="runs/bench_decode")
    args = p.parse_args(argv)

    from tpkit.evaluation.config import EvalConfig
    from tpkit.evaluation.random_init import evaluate_speed_only
    from tpkit.evaluation.report import speed_markdown

    cfg = EvalConfig()
    cfg.device = "cpu"
    cfg.out_dir = args.out
    cfg.random_init.name = args.arch
    cfg.random_init.dtype = "float32"
    cfg.random_init.budget = args.budget
    cfg.speed.batch_size = args.batch_size
    cfg.speed.repeats = args.repeats
    cfg.speed.warmup = args.warmup
    cfg.speed.decode_tokens = args.new_tokens
    cfg.speed.threads = args.threads  # 0: torch's default
    cfg.eval.progress = False
    res = evaluate_speed_only(cfg)
    print(speed_markdown(res["speed"]))
    dense, ours = res["speed"]["dense"], res["speed"][f"ours@{args.budget:g}"]
    print(
        f"model {args.arch}: {res['prompt']['n_dense']}-token prompt, batch {args.batch_size}, "
        f"{args.new_tokens} new tokens; ours k1={res['counts']['k1']} k2={res['counts']['k2']} "
        f"(its late layers cache {res['counts']['k2']} prompt tokens, dense {res['prompt']['n_dense']})"
    )
    print(
        f"decode tokens/s ours vs dense: {ours['decode_tokens_per_s']:.1f} vs {dense['decode_tokens_per_s']:.1f} "
        f"= {ours['decode_speedup']:.2f}x (TTFT {ours['ttft_speedup']:.2f}x, batch {args.batch_size}, cpu)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
