"""Stage 1 inside Qwen2.5-VL's tower (``stage1.in_tower_block``) against stage 1 after it, on random
weights: what it saves in the tower and how much it changes the outputs.

Model: ``qwen2.5-vl-7b`` from :func:`tpkit.models.registry.architectures` with widths divided by
``--scale-down`` (depth, windows and token counts kept: 32 tower blocks, full attention in 7/15/23/31,
one 1036 x 1036 image = 1,369 merged units), fp32, sdpa, random weights; stage 2 off, so that only the
visual tokens differ.

* keep-all: in-tower stage 1 keeping every unit reproduces stock's unit embeddings (bit for bit?).
* same kept units (score ``random``, one seed, so both modes keep the same ``--keep`` units): the kept
  units' embeddings (relative L2 distance to post-tower's, mean cosine) and the last position's
  next-token distribution (KL(post || in-tower), top-1 agreement over ``--prompts`` prompts). This is
  the cost of the kept units no longer seeing the dropped ones in the later blocks.
* scores: the overlap (Jaccard) of the units that ``cosine_mean`` keeps at block K and after the tower,
  at the same budget.
* tower time: median ms of the visual path (tower + stage-1 scoring and selection) per mode.

    python benchmarks/qwen_in_tower.py              # the summary on the last lines
    python benchmarks/qwen_in_tower.py --model assets/tiny-qwen2-vl --blocks 1 2 --keep 29
                                                    # a trained checkpoint (fp32) instead of random weights
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without install

from tpkit.evaluation.speed import model_inputs, random_prompt_batch, summarize_times, time_calls  # noqa: E402
from tpkit.models import attach_pruner  # noqa: E402
from tpkit.models.core.state import state_of  # noqa: E402
from tpkit.models.loading import load_pretrained  # noqa: E402
from tpkit.models.registry import build_random_init  # noqa: E402
from tpkit.pruning import PruningConfig, Stage1Config, Stage2Config  # noqa: E402


def _config(block: int | None, score: str, keep: int, seed: int = 0) -> PruningConfig:
    s1 = Stage1Config(score=score, selector="budget", budget=keep, seed=seed, in_tower_block=block)
    return PruningConfig(stage1=s1, stage2=Stage2Config(enabled=False))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model", default=None, help="a saved Qwen2-VL / Qwen2.5-VL directory (default: random weights)"
    )
    ap.add_argument("--scale-down", type=int, default=16)
    ap.add_argument("--blocks", type=int, nargs="+", default=[7, 15], help="in-tower blocks to compare")
    ap.add_argument("--keep", type=int, default=342, help="units kept of 1369 (342 = 25%%)")
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model:
        model = load_pretrained(args.model, dtype="float32", device="cpu")
        what = f"{args.model} (saved weights)"
    else:
        model = build_random_init("qwen2.5-vl-7b", "cpu", "float32", scale_down=args.scale_down)
        what = f"qwen2.5-vl-7b / {args.scale_down}, random weights"
    attach_pruner(model, _config(None, "random", args.keep))
    family = state_of(model).family
    results: dict = {"model": what, "keep": args.keep, "threads": torch.get_num_threads()}

    with torch.no_grad():
        batch = random_prompt_batch(model, 1, seed=0)
        inputs = model_inputs(model, batch)
        ids = batch["input_ids"]
        n_units = int((ids == model.config.image_token_id).sum())

        # keep-all in the tower = stock (the stock tower run: stage 1 off)
        stock = family.encode(model, ids, inputs, Stage1Config(enabled=False)).projected
        for block in args.blocks:
            cfg = Stage1Config(selector="ratio", ratio=1.0, in_tower_block=block)
            got = family.encode(model, ids, inputs, cfg).projected
            results[f"keep_all_bitwise_b{block}"] = bool(torch.equal(got, stock))

        # same kept units (random scores, one seed): embeddings and next-token distributions
        for block in args.blocks:
            rel, cos, kl, agree, dmax = [], [], [], [], []
            for p in range(args.prompts):
                b = random_prompt_batch(model, 1, seed=p)
                x = model_inputs(model, b)
                outs = {}
                for mode in (None, block):
                    attach_pruner(model, _config(mode, "random", args.keep, seed=p))
                    vis = family.encode(model, b["input_ids"], x, state_of(model).config.stage1)
                    logits = model(**x, use_cache=False, logits_to_keep=1).logits[0, -1].float()
                    outs[mode] = (vis.keep, vis.projected.float(), logits)
                (k0, e0, l0), (k1, e1, l1) = outs[None], outs[block]
                assert torch.equal(k0, k1)  # the same units
                rel.append(float((e1 - e0).norm() / e0.norm()))
                cos.append(float(torch.nn.functional.cosine_similarity(e1, e0, dim=-1).mean()))
                lp0, lp1 = l0.log_softmax(-1), l1.log_softmax(-1)
                kl.append(float((lp0.exp() * (lp0 - lp1)).sum()))
                agree.append(float(l0.argmax() == l1.argmax()))
                dmax.append(float((l1 - l0).abs().max()))
            results.setdefault("same_units", []).append(
                {
                    "block": block,
                    "rel_l2": statistics.mean(rel),
                    "cosine": statistics.mean(cos),
                    "kl": statistics.mean(kl),
                    "max_abs_logit_diff": max(dmax),
                    "top1_agree": statistics.mean(agree),
                }
            )

        # which units cosine_mean keeps at block K vs after the tower
        post = family.encode(model, ids, inputs, _config(None, "cosine_mean", args.keep).stage1).keep
        results["jaccard_cosine_mean"] = {}
        for block in args.blocks:
            k = family.encode(model, ids, inputs, _config(block, "cosine_mean", args.keep).stage1).keep
            results["jaccard_cosine_mean"][block] = float((k & post).sum() / (k | post).sum())

        # time of the visual path per mode (tower + scoring + selection; stage 1 at the same budget),
        # the modes interleaved round by round
        fns = {"stock tower (stage 1 off)": Stage1Config(enabled=False)}
        fns["post-tower stage 1"] = _config(None, "cosine_mean", args.keep).stage1
        for block in args.blocks:
            fns[f"in-tower stage 1 @ block {block}"] = _config(block, "cosine_mean", args.keep).stage1
        calls = {name: (lambda cfg=cfg: family.encode(model, ids, inputs, cfg)) for name, cfg in fns.items()}
        timed = time_calls(calls, "cpu", args.repeats, warmup=1)
        times = {name: summarize_times(t)["median_ms"] for name, t in timed.items()}
        results["visual_ms"] = times

    print(f"{what}, 1 image of {n_units} units, keep {args.keep}, "
          f"{results['threads']} CPU threads, stage 2 off")  # fmt: skip
    for block in args.blocks:
        print(
            f"keep-all in-tower @ block {block} == stock embeddings bit for bit: {results[f'keep_all_bitwise_b{block}']}"
        )
    print("same kept units (random scores), in-tower vs post-tower, mean over prompts:")
    print(
        "| block | rel. L2 of kept embeddings | mean cosine | KL(next token) | max abs logit diff | top-1 agreement |"
    )
    print("|---|---|---|---|---|---|")
    for r in results["same_units"]:
        print(
            f"| {r['block']} | {r['rel_l2']:.3f} | {r['cosine']:.4f} | {r['kl']:.2e} | "
            f"{r['max_abs_logit_diff']:.2e} | {r['top1_agree']:.2f} |"
        )
    for block, j in results["jaccard_cosine_mean"].items():
        print(f"cosine_mean kept-set overlap (Jaccard) block {block} vs after the tower: {j:.3f}")
    base = times["stock tower (stage 1 off)"]
    for name, ms in times.items():
        print(f"visual path {name}: {ms:.0f} ms ({base / ms:.2f}x of stock)")
    return results


if __name__ == "__main__":
    main()
