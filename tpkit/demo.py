"""The demo: prune an embedded model to ~22% of its tokens and win the accuracy back.

    tpkit demo [--model tiny-llava | tiny-qwen2-vl] [--config FILE] [--set key=value ...]

``--model`` picks the demo config of one of the embedded models (:data:`DEMO_MODELS`), both
committed: the tiny LLaVA (``assets/tiny-llava``; the default: ``configs/demo.yaml``) or the tiny
Qwen2-VL (``assets/tiny-qwen2-vl``: ``configs/demo_tiny_qwen2_vl.yaml``), each with its own train and
eval configs; ``--config`` names any other.

On a 2-core CPU, in minutes, it

1. checks the base model (a committed fixture, see assets/README.md) and writes the synthetic
   benchmark's train, val and test splits (:mod:`tpkit.synthetic.splits`),
2. evaluates it training-free: dense, ours (stage 1, stage 1+2), the matched-budget baselines, the
   budget sweep and the ablations (:data:`ABLATIONS`, ``eval.variants`` of one run),
3. fine-tunes LoRA with the pruner in the forward path twice, with the same steps and data:
   distillation from the unpruned model (``distill.alpha > 0``) and plain pruned LoRA (``alpha = 0``),
4. evaluates both exports with the pruner on (``dense`` there is the base model without the adapter),
5. prints the result and ablation tables, and which question-named objects each method's kept
   patches hold (:mod:`tpkit.evaluation.retention`), and writes them (Markdown + JSON) to ``out_dir``.

Every step is the library's own entry point (:func:`tpkit.training.recipe.fit`,
:func:`tpkit.evaluation.runner.evaluate`), configured from ``train_config`` / ``eval_config`` plus
the changes below, so what the demo shows is what ``tpkit train`` and ``tpkit evaluate`` do.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tpkit.config import path_field
from tpkit.evaluation.config import EvalConfig, load_eval_config
from tpkit.evaluation.methods import METHODS
from tpkit.evaluation.report import retention_table, summary_table
from tpkit.evaluation.runner import evaluate
from tpkit.models.config import resolve_model_path
from tpkit.synthetic.splits import ensure_split
from tpkit.training.config import TrainConfig, load_train_config
from tpkit.training.recipe import fit

__all__ = ["DemoConfig", "SyntheticData", "ABLATIONS", "DEMO_MODELS", "run_demo"]

# ``tpkit demo --model NAME`` -> its demo config, relative to the checkout (tpkit.checkout.checkout_path)
DEMO_MODELS: dict[str, str] = {
    "tiny-llava": "configs/demo.yaml",
    "tiny-qwen2-vl": "configs/demo_tiny_qwen2_vl.yaml",
}


@dataclass
class SyntheticData:
    """The synthetic splits the demo trains and evaluates on (written once, reused while unchanged)."""

    dir: str = path_field("runs/data/synthetic")  # <dir>/{train,val,test}.json and images/
    n_train: int = 8000  # 2,000 steps x batch 8 = 2 epochs (2,000 records overfit at 1,500 steps)
    n_val: int = 128
    n_test: int = 1024  # 256 per question type: at 96% accuracy the standard error is ~0.6 point
    seed: int = 0  # records are drawn from (seed, split, index): disjoint splits for one seed
    test_seed: int = 2  # the test split's seed (every published number of the demo used 2)

    def validate(self) -> None:
        if min(self.n_train, self.n_val, self.n_test) < 1:
            raise ValueError("n_train, n_val and n_test must be >= 1")


@dataclass
class DemoConfig:
    """``configs/demo.yaml``: which recipes to run, and the few settings the demo changes."""

    out_dir: str = path_field("runs/demo")
    base_model: str = path_field("assets/tiny-llava", resolve_model_path)
    train_config: str = path_field("configs/train/tiny.yaml")
    eval_config: str = path_field("configs/eval/tiny.yaml")
    data: SyntheticData = field(default_factory=SyntheticData)
    train_overrides: list[str] = field(default_factory=list)  # --set items for both fine-tuning runs
    eval_overrides: list[str] = field(default_factory=list)  # --set items for every evaluation
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
    "stage 1 + 2 (kneedle, coverage + context tokens, prune_text, diverse patches)": {},
    "stage 1 + 2, stage 1 by score alone (the paper's set)": {
        "stage1.diversity": 0.0,
        "stage1.context_tokens": 0,
        "stage1.min_keep": 4,
    },
    "stage 1 + 2, stage 1 coverage, no context tokens": {"stage1.context_tokens": 0},
    "stage 1 + 2, stage 1 context tokens, patches by score": {"stage1.diversity": 0.0},
    "stage 1 + 2, no floor under the knee": {"stage1.min_keep": 4},
    "stage 1 + 2, stage 2 patches by score alone": {"stage2.diversity": 0.0},
    "stage 1 + 2, prune_text off": {"stage2.prune_text": False},
    "stage 1 + 2, stage 2 prunes text only": {"stage2.prune_visual": False},
    "stage 1 curvature + 2": {"stage1.selector": "curvature"},
    "stage 1 iqr + 2": {"stage1.selector": "iqr"},
    "stage 1 + 2 curvature": {"stage2.selector": "curvature"},
    "stage 1 + 2, stage 2 max over queries": {"stage2.reduce": "max"},
    "stage 1 + 2, contiguous position ids": {"stage1.positions": "contiguous"},
}

KEPT_HEADING = "Do the kept patches hold the objects the question names?"
KEPT_NOTE = (
    "Share of test samples in which every object the question names keeps at least one patch, after "
    "stage 1 and after stage 2, beside a random choice of as many patches from the same pool "
    "(tpkit.evaluation.retention)."
)


def _log(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _splits(cfg: DemoConfig) -> dict[str, Path]:
    d = cfg.data
    return {
        split: ensure_split(d.dir, split, n=n, seed=seed)
        for split, n, seed in (
            ("train", d.n_train, d.seed),
            ("val", d.n_val, d.seed),
            ("test", d.n_test, d.test_seed),
        )
    }


def _eval_config(cfg: DemoConfig, name: str, test_json: Path) -> EvalConfig:
    ecfg = load_eval_config(cfg.eval_config, cfg.eval_overrides)
    ecfg.model.path = cfg.base_model
    ecfg.data.test_json = str(test_json)
    ecfg.out_dir = str(Path(cfg.out_dir) / name)
    return ecfg


def _train_config(cfg: DemoConfig, name: str, alpha: float, splits: dict[str, Path]) -> TrainConfig:
    """One fine-tuning run's config. ``alpha`` 0 is plain pruned LoRA: no teacher term of any kind,
    whatever the train config or ``train_overrides`` say."""
    tcfg = load_train_config(cfg.train_config, cfg.train_overrides)
    tcfg.model.path = cfg.base_model
    tcfg.data.train_json, tcfg.data.val_json = str(splits["train"]), str(splits["val"])
    tcfg.trainer.out_dir = str(Path(cfg.out_dir) / name)
    tcfg.trainer.max_steps = cfg.max_steps
    tcfg.distill.alpha = alpha
    if alpha == 0:
        tcfg.distill.hidden_weight = 0.0
    tcfg.validate()
    return tcfg


def _check_base(path: str) -> None:
    """A clear error, with the commands that build one, when the base model directory is missing."""
    if (Path(path) / "config.json").is_file():
        return
    raise FileNotFoundError(
        f"base model {path!r}: no such model directory (config.json missing). Both embedded models are "
        "committed (assets/tiny-llava, assets/tiny-qwen2-vl); to build one again, in the checkout: bash "
        "scripts/gpu_base.sh (one GPU, minutes; FIXTURE=tiny-qwen2-vl for the second) or tpkit fixture "
        "--config configs/fixture/tiny_cpu.yaml --out assets/tiny-llava (CPU, hours, resumable), tpkit "
        "fixture --config configs/fixture/tiny_qwen2_vl_cpu.yaml --out assets/tiny-qwen2-vl (CPU, ~50 "
        "minutes). A run in progress gives a model with tpkit fixture ... --snapshot DIR; then --set "
        "base_model=DIR"
    )


def run_demo(cfg: DemoConfig) -> dict:
    """Run the whole demo; returns the summary dict (also ``<out_dir>/summary.json``)."""
    _check_base(cfg.base_model)
    t0 = time.perf_counter()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    timings: dict[str, float] = {}

    def step(label: str, fn, *a):
        _log(f"{label} ...")
        t = time.perf_counter()
        r = fn(*a)
        timings[label] = round(time.perf_counter() - t, 1)
        _log(f"{label}: {timings[label]:.0f}s")
        return r

    splits = _splits(cfg)
    base_cfg = _eval_config(cfg, "eval_base", splits["test"])
    if cfg.ablations:
        base_cfg.eval.variants = {name: ch for name, ch in ABLATIONS.items() if ch}
        base_cfg.validate()
    base = step(
        "evaluate the base model training-free (dense, ours, baselines, ablations, sweep)", evaluate, base_cfg
    )
    runs: dict[str, TrainConfig] = {"distill": _train_config(cfg, "train_distill", cfg.distill_alpha, splits)}
    labels = {"distill": f"fine-tune LoRA + distillation (alpha={cfg.distill_alpha}, {cfg.max_steps} steps)"}
    if cfg.compare_plain_lora:
        runs["plain"] = _train_config(cfg, "train_plain", 0.0, splits)
        labels["plain"] = f"fine-tune plain pruned LoRA (alpha=0, {cfg.max_steps} steps)"
    exports: dict[str, Path] = {}
    for key, tcfg in runs.items():
        # the demo owns its out_dir: a second demo starts its runs afresh (it says what it removed)
        res = step(labels[key], lambda c: fit(c, overwrite=True), tcfg)
        if res.export_dir is None:
            raise RuntimeError(f"training run {key!r} ended without an export (interrupted?)")
        exports[key] = Path(res.export_dir)
    tuned: dict[str, dict[str, Any]] = {}
    for key, export in exports.items():
        ecfg = _eval_config(cfg, f"eval_{key}", splits["test"])
        ecfg.adapter = str(export)
        ecfg.eval.methods, ecfg.eval.budgets, ecfg.speed.enabled = ["dense", "ours"], [], False
        ecfg.validate()
        tuned[key] = step(f"evaluate the {key} export (ours)", evaluate, ecfg)

    bm = base["methods"]
    ablations = (  # untimed rows: ours' own row without its speed, so that none of them shows one
        {name: bm[f"ours[{name}]"] if ch else {**bm["ours"], "speed": None} for name, ch in ABLATIONS.items()}
        if cfg.ablations
        else {}
    )
    dense_acc = bm["dense"]["accuracy"]
    training_free = {
        name: m.label + (" (training-free)" if m.kind == "ours" else "") for name, m in METHODS.items()
    }
    rows = [(training_free[k], bm[k]) for k in METHODS if k in bm]
    if "plain" in tuned:
        rows.append(("ours + LoRA, alpha=0 (plain)", tuned["plain"]["methods"]["ours"]))
    kd = runs["distill"].distill
    final = tuned["distill"]["methods"]["ours"]
    kd_label = f"**ours + LoRA + distillation** (alpha={kd.alpha:g}" + (
        f", hidden_weight={kd.hidden_weight:g})" if kd.hidden_weight else ")"
    )
    table = summary_table([*rows, (kd_label, final)], dense_acc)
    abl_table = summary_table(list(ablations.items()), dense_acc) if ablations else ""
    kept_rows = {label: r for label, r in rows if label != "dense"}
    kept_rows["ours + LoRA + distillation"] = final
    kept_rows.update({f"ablation: {name}": r for name, r in ablations.items()})
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
        "ours_plain_lora": {"accuracy": tuned["plain"]["methods"]["ours"]["accuracy"]}
        if "plain" in tuned
        else None,
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
