"""Evaluate token pruning: ``python evaluate.py --config configs/eval_tiny.yaml [--set key=value ...]``.

Compares dense, ours and matched-budget baselines on a LLaVA-JSON dataset (accuracy, token
accounting, speed, FLOPs) and writes results.json, results.md, plots and kept-patch overlays to
``out_dir``. ``--random-init llava-1.5-7b`` is a speed-only run on a random-weight full-size model.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file (configs/eval_*.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable), e.g. --set eval.limit=16")  # fmt: skip
    p.add_argument("--random-init", metavar="NAME",
                   help="speed-only run on a random-weight architecture (e.g. llava-1.5-7b)")  # fmt: skip
    p.add_argument(
        "--scale-down", type=int, metavar="N", help="with --random-init: divide widths by N (CPU check)"
    )
    p.add_argument("--device", help="cuda / cpu / auto (overrides the config)")
    p.add_argument("--out", help="output directory (overrides out_dir)")
    args = p.parse_args(argv)

    from tpkit.config import ConfigError
    from tpkit.evaluation.config import load_eval_config

    overrides = list(args.overrides)
    if args.random_init:
        overrides.append(f"random_init.name={args.random_init}")
    if args.scale_down:
        overrides.append(f"random_init.scale_down={args.scale_down}")
    if args.device:
        overrides.append(f"device={args.device}")
    if args.out:
        overrides.append(f"out_dir={args.out}")
    try:
        cfg = load_eval_config(args.config, overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from tpkit.evaluation.report import speed_markdown
    from tpkit.evaluation.runner import EvalError, evaluate

    try:
        results = evaluate(cfg)
    except (EvalError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if results.get("mode") == "random_init":
        print(speed_markdown(results["speed"]))
        ach = results["achieved"].get("token_layer_fraction", {}).get("mean")
        print(
            f"{results['architecture']} (random init, {results['device_name']}, {results['dtype']}, "
            f"batch {results['batch_size']}, {results['prompt']['n_dense']} tokens): "
            f"k1={results['counts']['k1']} k2={results['counts']['k2']} token-layer fraction "
            f"{ach if ach is None else round(ach, 4)}; results in {cfg.out_dir}/speed.json"
        )
        print(f"prefill speedup ours@{results['budget']:g} vs dense: {results['prefill_speedup']:.2f}x")
        return 0
    print(results["table"])
    print(f"report: {', '.join(results['files'].values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
