"""The demo: prune the embedded tiny LLaVA to ~22% of its tokens and win the accuracy back.

    python -m tpkit.demo [--config configs/demo.yaml] [--set key=value ...]

On a 2-core CPU, in minutes, it

1. checks the base model (``assets/tiny-llava``, a committed fixture; see assets/README.md),
2. evaluates it training-free: dense, ours (stage 1, stage 1+2), the matched-budget baselines, the
   budget sweep and the ablations (stage 1 only / stage 2 only / both, knee detectors,
   ``prune_text``, ``prune_visual``, stage 2 mean or max over queries, stage 2's patches by score
   alone or diverse, stage-1 position ids;
   ``eval.variants`` of one run),
3. fine-tunes LoRA with the pruner in the forward path twice, with the same steps and data:
   distillation from the unpruned model (``distill.alpha > 0``) and plain pruned LoRA (``alpha = 0``),
4. evaluates both exports with the pruner on (``dense`` there is the base model without the adapter),
5. prints the result and ablation tables, and which question-named objects each method's kept
   patches hold (:mod:`tpkit.evaluation.retention`), and writes them (Markdown + JSON) to ``out_dir``.

Every step is the library's own entry point (:func:`tpkit.training.run.fit`,
:func:`tpkit.evaluation.runner.evaluate`), configured from ``train_config`` / ``eval_config`` plus
the overrides below, so what the demo shows is what ``train.py`` and ``evaluate.py`` do.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tpkit.config import ConfigError, load_config
from tpkit.evaluation.report import retention_table

__all__ = ["DemoConfig", "ABLATIONS", "run_demo", "main"]


@dataclass
class DemoConfig:
    """``configs/demo.yaml``: which recipes to run, and the few settings the demo changes."""

    out_dir: str = "runs/demo"
    base_model: str = "assets/tiny-llava"
    train_config: str = "configs/train_tiny.yaml"
    eval_config: str = "configs/eval_tiny.yaml"
    train_overrides: list[str] = field(default_factory=list)  # applied to both fine-tuning runs
    eval_overrides: list[str] = field(default_factory=list)  # applied to every evaluation
    max_steps: int = 2000
    distill_alpha: float = 1.0
    compare_plain_lora: bool = True  # also train alpha = 0 with the same steps and data
    ablations: bool = True  # the ABLATIONS rows, as eval.variants of the training-free evaluation
    threads: int | None = None  # torch CPU threads (None = torch's default)

    def validate(self) -> None:
        if self.max_steps < 1:
            raise ValueError(f"max_steps = {self.max_steps} must be >= 1")
        if self.distill_alpha <= 0:
            raise ValueError(
                f"distill_alpha = {self.distill_alpha} must be > 0 (alpha = 0 is the comparison)"
            )
        for key in ("train_config", "eval_config"):
            if not Path(getattr(self, key)).is_file():
                raise ValueError(f"{key} = {getattr(self, key)!r}: no such file")


# name -> the pruning settings an ablation changes in ours (training-free); {} = ours itself. They run
# as eval.variants of the training-free evaluation: one dense run serves them all.
ABLATIONS: dict[str, dict[str, object]] = {
    "stage 1 only (kneedle)": {"stage2.enabled": False},
    "stage 2 only": {"stage1.enabled": False},
    "stage 1 + 2 (kneedle, prune_text, diverse patches)": {},
    "stage 1 + 2, stage 2 patches by score alone": {"stage2.diversity": 0.0},
    "stage 1 + 2, prune_text off": {"stage2.prune_text": False},
    "stage 1 + 2, stage 2 prunes text only": {"stage2.prune_visual": False},
    "stage 1 curvature + 2": {"stage1.selector": "curvature"},
    "stage 1 iqr + 2": {"stage1.selector": "iqr"},
    "stage 1 + 2 curvature": {"stage2.selector": "curvature"},
    "stage 1 + 2, stage 2 max over queries": {"stage2.reduce": "max"},
    "stage 1 + 2, contiguous position ids": {"stage1.positions": "contiguous"},
}


def _log(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _eval(cfg: DemoConfig, name: str, extra: list[str]) -> dict:
    from tpkit.evaluation.config import load_eval_config
    from tpkit.evaluation.runner import evaluate

    overrides = [f"model.path={cfg.base_model}", f"out_dir={Path(cfg.out_dir) / name}"]
    overrides += list(cfg.eval_overrides) + extra
    ecfg = load_eval_config(cfg.eval_config, overrides)
    return evaluate(ecfg)


def _train(cfg: DemoConfig, name: str, alpha: float) -> tuple[Path, Any]:
    """One fine-tuning run -> (its export, its resolved distill config). ``alpha`` 0 is plain pruned
    LoRA: no teacher term of any kind, whatever the train config or ``train_overrides`` say."""
    from tpkit.training.run import fit, load_train_config

    overrides = [
        f"model.path={cfg.base_model}",
        f"trainer.out_dir={Path(cfg.out_dir) / name}",
        f"trainer.max_steps={cfg.max_steps}",
        f"distill.alpha={alpha}",
    ] + list(cfg.train_overrides)
    if alpha == 0:
        overrides += ["distill.alpha=0", "distill.hidden_weight=0"]
    tcfg = load_train_config(cfg.train_config, overrides)
    res = fit(tcfg)
    if res.export_dir is None:
        raise RuntimeError(f"training run {name!r} ended without an export (interrupted?)")
    return Path(res.export_dir), tcfg.distill


def _row(label: str, r: dict, dense_acc: float) -> str:
    tok = r.get("tokens", {})
    frac = tok.get("fraction", {}).get("mean")
    speed = (r.get("speed") or {}).get("prefill_speedup")
    by = r.get("by_qtype", {})
    cells = [
        label,
        f"{r['accuracy']:.3f}",
        f"{100 * r['accuracy'] / dense_acc:.1f}%" if dense_acc else "–",
        f"{r['first_word_accuracy']:.3f}" if r.get("first_word_accuracy") is not None else "–",
        f"{100 * frac:.1f}%" if frac is not None else "–",
        f"{speed:.2f}×" if speed else "–",
    ] + [f"{by[q]['accuracy']:.3f}" if q in by else "–" for q in ("color", "count", "exist", "position")]
    return "| " + " | ".join(cells) + " |"


HEADER = (
    "| method | accuracy | % of dense | first word right | token-layer frac. | prefill speedup "
    "| color | count | exist | position |\n"
    "|---|---|---|---|---|---|---|---|---|---|"
)


KEPT_HEADING = "Do the kept patches hold the objects the question names?"
KEPT_NOTE = (
    "Share of test samples in which every object the question names keeps at least one patch, after "
    "stage 1 and after stage 2, beside a random choice of as many patches from the same pool "
    "(tpkit.evaluation.retention)."
)


def _check_base(path: str) -> None:
    """A clear error, with the commands that build one, when the base model directory is missing."""
    if (Path(path) / "config.json").is_file():
        return
    raise FileNotFoundError(
        f"base model {path!r}: no such model directory (config.json missing). The committed one is "
        "assets/tiny-llava; to build it again: bash scripts/gpu_base.sh (one GPU, minutes) or python -m "
        "tpkit.training.base_recipe --config configs/base_tiny_cpu.yaml --out assets/tiny-llava (CPU, "
        "hours, resumable); a run in progress gives one with --snapshot DIR (see assets/README.md)"
    )


def run_demo(cfg: DemoConfig) -> dict:
    """Run the whole demo; returns the summary dict (also ``<out_dir>/summary.json``)."""
    _check_base(cfg.base_model)
    t0 = time.perf_counter()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    timings: dict[str, float] = {}

    def step(label: str, fn, *a):
        _log(f"{label} ...")
        t = time.perf_counter()
        r = fn(*a)
        timings[label] = round(time.perf_counter() - t, 1)
        _log(f"{label}: {timings[label]:.0f}s")
        return r

    variants = {name: ch for name, ch in ABLATIONS.items() if ch} if cfg.ablations else {}
    base = step(
        "evaluate the base model training-free (dense, ours, baselines, ablations, sweep)",
        _eval, cfg, "eval_base", [f"eval.variants={json.dumps(variants)}"],
    )  # fmt: skip
    kd_export, kd_cfg = step(
        f"fine-tune LoRA + distillation (alpha={cfg.distill_alpha}, {cfg.max_steps} steps)",
        _train, cfg, "train_distill", cfg.distill_alpha,
    )  # fmt: skip
    runs = {"distill": kd_export}
    if cfg.compare_plain_lora:
        runs["plain"], _ = step(
            f"fine-tune plain pruned LoRA (alpha=0, {cfg.max_steps} steps)", _train, cfg, "train_plain", 0.0
        )
    tuned = {}
    for key, export in runs.items():
        tuned[key] = step(
            f"evaluate the {key} export (ours)",
            _eval, cfg, f"eval_{key}",
            [f"adapter={export}", "eval.methods=[dense,ours]", "eval.budgets=[]", "speed.enabled=false"],
        )  # fmt: skip

    bm = base["methods"]
    ablations = (  # untimed rows: ours' own row without its speed, so that none of them shows one
        {name: bm[f"ours[{name}]"] if ch else {**bm["ours"], "speed": None} for name, ch in ABLATIONS.items()}
        if cfg.ablations
        else {}
    )
    dense_acc = bm["dense"]["accuracy"]
    rows = [HEADER, _row("dense", bm["dense"], dense_acc)]
    labels = {
        "ours-s1": "ours, stage 1 only (training-free)",
        "ours": "ours (training-free)",
        "random": "random (matched)",
        "topk-cls": "topk-cls (matched mean K)",
        "fastv": "fastv (matched)",
        "prumerge-iqr": "prumerge-iqr",
    }
    for key, label in labels.items():
        if key in bm:
            rows.append(_row(label, bm[key], dense_acc))
    if "plain" in tuned:
        rows.append(_row("ours + LoRA, alpha=0 (plain)", tuned["plain"]["methods"]["ours"], dense_acc))
    rows.append(
        _row(
            f"**ours + LoRA + distillation** (alpha={kd_cfg.alpha:g}"
            + (f", hidden_weight={kd_cfg.hidden_weight:g})" if kd_cfg.hidden_weight else ")"),
            tuned["distill"]["methods"]["ours"],
            dense_acc,
        )
    )
    table = "\n".join(rows)
    abl_table = ""
    if ablations:
        abl_rows = [HEADER] + [_row(name, r, dense_acc) for name, r in ablations.items()]
        abl_table = "\n".join(abl_rows)

    final = tuned["distill"]["methods"]["ours"]
    kept_rows = {label: bm[key] for key, label in labels.items() if key in bm}
    if "plain" in tuned:
        kept_rows["ours + LoRA, alpha=0 (plain)"] = tuned["plain"]["methods"]["ours"]
    kept_rows["ours + LoRA + distillation"] = final
    kept_rows.update({f"ablation: {name}": r for name, r in (ablations or {}).items()})
    kept_table = retention_table(kept_rows).strip()
    frac = final["tokens"]["fraction"]["mean"]
    rel = final["accuracy"] / dense_acc if dense_acc else float("nan")
    total = time.perf_counter() - t0
    summary = {
        "base_model": cfg.base_model,
        "dense_accuracy": dense_acc,
        "ours_distilled": {"accuracy": final["accuracy"], "relative": rel, "token_layer_fraction": frac},
        "ours_training_free": {
            "accuracy": bm["ours"]["accuracy"],
            "token_layer_fraction": bm["ours"]["tokens"]["fraction"]["mean"],
        },
        "ours_plain_lora": (
            {"accuracy": tuned["plain"]["methods"]["ours"]["accuracy"]} if "plain" in tuned else None
        ),
        "timings_s": timings,
        "total_s": round(total, 1),
        "table": table,
        "ablation_table": abl_table,
        "named_objects_table": kept_table,
        "plots": base.get("files", {}),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    (out / "summary.md").write_text(
        "## Results (synthetic test split)\n\n"
        + table
        + "\n\n## Ablations (training-free)\n\n"
        + abl_table
        + (f"\n\n## {KEPT_HEADING}\n\n{KEPT_NOTE}\n\n{kept_table}" if kept_table else "")
        + "\n"
    )
    print("\n## Results (synthetic test split)\n")
    print(table)
    if abl_table:
        print("\n## Ablations (training-free, ours)\n")
        print(abl_table)
    if kept_table:
        print(f"\n## {KEPT_HEADING}\n\n{KEPT_NOTE}\n")
        print(kept_table)
    print(f"\nplots and overlays: {', '.join(str(v) for v in base.get('files', {}).values())}")
    print(f"full results: {out}/summary.md, {out}/summary.json, {out}/*/results.json")
    print(
        f"SUMMARY: ours + LoRA + distillation keeps {100 * frac:.1f}% of the token-layers and reaches "
        f"{final['accuracy']:.3f} accuracy = {100 * rel:.1f}% of dense ({dense_acc:.3f}); "
        f"training-free {bm['ours']['accuracy']:.3f} (first word right: "
        f"{bm['ours'].get('first_word_accuracy', float('nan')):.3f}); total {total / 60:.1f} min"
    )
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tpkit.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/demo.yaml", help="YAML file (default: configs/demo.yaml)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        cfg = load_config(DemoConfig, args.config, args.overrides)
        return 0 if run_demo(cfg) else 1
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
