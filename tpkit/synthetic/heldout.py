"""The held-out comparison: training-free ours against the matched baselines on splits built to differ
from what the model was trained on.

    tpkit heldout [--config configs/heldout.yaml] [--set key=value ...]

For every split of ``splits`` (:data:`tpkit.synthetic.scenes.HELDOUT_SPLITS`: objects that fill the
image, heavy clutter, other palettes, crowds, small objects, other question wordings), it writes the
split once (``ensure_split``: reused while unchanged), runs ``tpkit evaluate`` with ``eval_config``
(its ``pruning`` is ours) and ``methods``, and gathers one table: per split and method, accuracy with
its standard error, share of dense, first word right, the share of answers that run on past their
reference's length, token-layer fraction and the k1 distribution (mean, p10, p90), and whether ours
meets the targets (at least ``margin`` points of dense above random, and not below
topk-cls). Settings are chosen here, never on the demo's test split.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tpkit.config import path_field
from tpkit.evaluation.config import load_eval_config
from tpkit.evaluation.methods import METHODS
from tpkit.evaluation.metrics import exact_match
from tpkit.evaluation.runner import evaluate, method_file
from tpkit.synthetic.scenes import HELDOUT_SPLITS, SPLITS
from tpkit.synthetic.splits import ensure_split

__all__ = ["HeldoutConfig", "run_heldout", "heldout_rows", "heldout_table", "paired_gap_se", "run_on"]


@dataclass
class HeldoutConfig:
    """``configs/heldout.yaml``: which model and pruning, which splits, how many questions."""

    # the evaluation every split runs: its model and pruning (ours); data, methods, sweep, speed and
    # out_dir are set here
    eval_config: str = path_field("configs/eval/tiny.yaml")
    eval_overrides: list[str] = field(default_factory=list)  # --set items of every split's evaluation
    splits: list[str] = field(default_factory=lambda: list(HELDOUT_SPLITS))
    n: int = 512  # questions per split (128 per type): standard error ~2 points at 50% accuracy
    seed: int = 0  # records come from (seed, split, index): disjoint from train/val/test
    data_dir: str = path_field("runs/data/heldout")  # <data_dir>/<split>.json and images/
    # <out_dir>/<split>/ (each evaluation), summary.md, summary.json
    out_dir: str = path_field("runs/heldout")
    # compared on every split; topk-cls needs a tower with a CLS token (leave it out otherwise)
    methods: list[str] = field(default_factory=lambda: ["dense", "ours", "random", "topk-cls", "fastv"])
    margin: float = 5.0  # target: ours >= random + margin points of dense (and >= topk-cls)
    # more rows of ours with some pruning settings changed, sharing each split's dense run (eval.variants):
    # {name: {pruning key: value}}, e.g. {"by score": {"stage1.diversity": 0.0}}
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)

    def validate(self) -> None:
        bad = [s for s in self.splits if s not in SPLITS]
        if bad or not self.splits:
            raise ValueError(f"splits {bad or '[]'}: each must be one of {list(SPLITS)}")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"methods {unknown}: known are {list(METHODS)}")
        if "dense" not in self.methods or "ours" not in self.methods:
            raise ValueError(
                "methods must hold dense and ours (the rows are shares of dense, ours the subject)"
            )
        if self.n < 1:
            raise ValueError(f"n = {self.n} must be >= 1")
        if not Path(self.eval_config).is_file():
            raise ValueError(f"eval_config = {self.eval_config!r}: no such file")


def run_on(answers: list[str], references: list[str]) -> float:
    """Share of answers with more words than their reference: an answer that does not stop (the first
    word may be right: "yes cyan square, cyan square" for "yes")."""
    n = len(answers)
    return (
        sum(len(a.split()) > len(r.split()) for a, r in zip(answers, references)) / n if n else float("nan")
    )


def paired_gap_se(ours: dict, base: dict, dense_accuracy: float) -> float:
    """Standard error of ours' accuracy minus ``base``'s on the same questions, in points of dense.

    ``ours`` / ``base``: the methods' ``methods/<name>.json`` (answers and references, question by
    question). The two runs answer the same questions, so the gap's error is that of the per-question
    differences, smaller than the two accuracies' errors combined."""
    if ours["ids"] != base["ids"]:
        raise ValueError("the two methods' answer files hold different questions: cannot pair them")
    a = exact_match(ours["answers"], ours["references"])
    b = exact_match(base["answers"], base["references"])
    n = len(a)
    if n < 2 or not dense_accuracy:
        return float("nan")
    d = [100.0 * (int(x) - int(y)) / dense_accuracy for x, y in zip(a, b)]
    mean = sum(d) / n
    return math.sqrt(sum((v - mean) ** 2 for v in d) / (n - 1) / n)


def heldout_rows(
    split: str, results: dict, margin: float, answers: dict[str, dict] | None = None
) -> list[dict[str, Any]]:
    """One row per method of one split's ``results.json``: accuracy, its standard error, share of
    dense, first word right, token-layer fraction, k1 (mean, p10, p90), and with ``answers`` (each
    method's ``methods/<name>.json``) the share of run-on answers (:func:`run_on`); ours' row says
    whether it met the targets."""
    methods = results["methods"]
    dense = methods["dense"]["accuracy"]
    rows = []
    for name, r in methods.items():
        acc, n = r["accuracy"], r["n"]
        k1 = r["tokens"]["k1"]
        rows.append(
            {
                "split": split,
                "method": name,
                "accuracy": acc,
                "stderr": math.sqrt(acc * (1.0 - acc) / n) if n else float("nan"),
                "n": n,
                "of_dense": acc / dense if dense else float("nan"),
                "first_word": r["first_word_accuracy"],
                "run_on": run_on(answers[name]["answers"], answers[name]["references"])
                if answers and name in answers
                else float("nan"),
                "fraction": r["tokens"]["fraction"]["mean"],
                "k1_mean": k1["mean"],
                "k1_p10": k1["p10"],
                "k1_p90": k1["p90"],
            }
        )
    ours = next(row for row in rows if row["method"] == "ours")
    by = {row["method"]: row for row in rows}
    for key, base in (("over_random", "random"), ("over_topk", "topk-cls")):
        if base in by:
            ours[key] = 100.0 * (ours["of_dense"] - by[base]["of_dense"])  # points of dense
            if answers and "ours" in answers and base in answers:
                ours[f"{key}_se"] = paired_gap_se(answers["ours"], answers[base], dense)
    # judged only against the baselines that ran (None: neither did, nothing to judge)
    judged = [ours[k] >= floor for k, floor in (("over_random", margin), ("over_topk", 0.0)) if k in ours]
    ours["target_met"] = all(judged) if judged else None
    return rows


def heldout_table(rows: list[dict[str, Any]]) -> str:
    """The Markdown table of :func:`heldout_rows` over every split."""
    cols = ["split", "method", "accuracy (± s.e.)", "% of dense", "first word right", "run-on answers",
            "token-layer frac.", "k1 mean [p10, p90]", "ours vs random / topk-cls (points of dense ± paired s.e.)"]  # fmt: skip
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        gap = ""
        if r["method"] == "ours":
            parts = [
                f"{r[k]:+.1f}"
                + (f" ± {r[k + '_se']:.1f}" if not math.isnan(r.get(k + "_se", math.nan)) else "")
                for k in ("over_random", "over_topk")
                if k in r
            ]
            verdict = {True: " (met)", False: " (**missed**)", None: ""}[r["target_met"]]
            gap = " / ".join(parts) + verdict
        cells = [
            r["split"],
            r["method"],
            f"{r['accuracy']:.3f} ± {r['stderr']:.3f}",
            f"{100 * r['of_dense']:.1f}%",
            f"{r['first_word']:.3f}",
            "–" if math.isnan(r["run_on"]) else f"{100 * r['run_on']:.1f}%",
            f"{100 * r['fraction']:.1f}%",
            f"{r['k1_mean']:.1f} [{r['k1_p10']:.0f}, {r['k1_p90']:.0f}]",
            gap,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _log(msg: str) -> None:
    print(f"[heldout {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_heldout(cfg: HeldoutConfig) -> dict:
    """Write the splits, evaluate every one, print and write the table; returns the summary dict
    (also ``<out_dir>/summary.json``; the table in ``<out_dir>/summary.md``)."""
    cfg.validate()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    timings: dict[str, float] = {}
    for split in cfg.splits:
        t = time.perf_counter()
        path = ensure_split(cfg.data_dir, split, n=cfg.n, seed=cfg.seed)
        ecfg = load_eval_config(cfg.eval_config, cfg.eval_overrides)
        ecfg.data.test_json = str(path)
        ecfg.out_dir = str(out / split)
        ecfg.eval.methods = list(cfg.methods)
        ecfg.eval.budgets, ecfg.eval.variants = [], dict(cfg.variants)
        ecfg.eval.limit, ecfg.eval.grid_samples = None, 0
        ecfg.speed.enabled = False
        ecfg.validate()
        _log(f"{split}: {cfg.n} questions, {', '.join(cfg.methods)} ...")
        results = evaluate(ecfg)
        answers = {m: json.loads(method_file(out / split, m).read_text()) for m in results["methods"]}
        rows += heldout_rows(split, results, cfg.margin, answers)
        timings[split] = round(time.perf_counter() - t, 1)
        _log(f"{split}: {timings[split]:.0f}s")
    table = heldout_table(rows)
    ours = [r for r in rows if r["method"] == "ours"]
    missed = [r["split"] for r in ours if r["target_met"] is False]
    summary = {
        "eval_config": cfg.eval_config,
        "eval_overrides": cfg.eval_overrides,
        "n": cfg.n,
        "seed": cfg.seed,
        "margin": cfg.margin,
        "rows": rows,
        "missed": missed,
        "timings_s": timings,
        "table": table,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(table + "\n")
    print("\n" + table + "\n")
    verdict = (
        "no baseline to judge against (methods hold neither random nor topk-cls)"
        if all(r["target_met"] is None for r in ours)
        else f"missed on {', '.join(missed)}"
        if missed
        else "met on every split"
    )
    print(
        f"SUMMARY: training-free ours >= random + {cfg.margin:g} points of dense and >= topk-cls: {verdict} "
        f"({out}/summary.md)"
    )
    return summary
