"""What one method's run over the dataset becomes in ``results.json``: accuracy, token accounting,
FLOPs, retention of the named objects, and how far a matched budget was missed."""

from __future__ import annotations

import torch

from tpkit.config import to_dict
from tpkit.evaluation import metrics
from tpkit.evaluation.methods import METHODS, MethodSpec
from tpkit.evaluation.retention import retention
from tpkit.evaluation.speed import LMShape, prefill_flops

__all__ = ["budget_gap", "run_flops", "token_summaries", "method_result"]


def budget_gap(run: dict, spec: MethodSpec, ours: dict | None) -> float | None:
    """Max over samples of |achieved - target| token-layer fraction, in tokens per layer
    (fraction * n_dense): the target is ours' fraction (matched baselines) or the sweep budget."""
    if spec.budget is not None:
        target = torch.full_like(run["fraction"], spec.budget)
    elif spec.family == "topk-cls" and ours is not None:  # one K for all: matched on average
        return float(
            (run["fraction"].mean() - ours["fraction"].mean()).abs() * run["n_dense"].double().mean()
        )
    elif spec.family in METHODS and METHODS[spec.family].needs_ours and ours is not None:
        target = ours["fraction"]
    else:
        return None
    return float(((run["fraction"] - target) * run["n_dense"].double()).abs().max())


def run_flops(run: dict, spec: MethodSpec, shape: LMShape) -> torch.Tensor:
    if not spec.pruning.stage2.enabled:
        return prefill_flops(run["n_prompt"], None, shape.num_layers, 0, shape.hidden, shape.ffn)
    layer = spec.pruning.stage2.layer
    return prefill_flops(run["n_prompt"], run["k2"], shape.num_layers, layer, shape.hidden, shape.ffn)


def token_summaries(run: dict) -> dict:
    return {
        "k1": metrics.token_summary(run["k1"]),
        "k2": metrics.token_summary(run["k2"]),
        "k1_fraction": metrics.token_summary(run["k1"].double() / run["n_visual"].clamp(min=1).double()),
        "n_prompt": metrics.token_summary(run["n_prompt"]),
        "fraction": metrics.token_summary(run["fraction"]),
    }


def method_result(run: dict, spec: MethodSpec, dense: dict, shape: LMShape, dense_flops, cells, n_patches):
    refs, qtypes = dense["references"], dense["qtypes"]
    acc = metrics.accuracy_report(run["answers"], refs, qtypes)
    fl = run_flops(run, spec, shape).mean()
    out = {
        "family": spec.family,
        "budget": spec.budget,
        "accuracy": acc["accuracy"],
        "first_word_accuracy": acc["first_word_accuracy"],
        "n": acc["n"],
        "by_qtype": acc["by_qtype"],
        "yes_no": metrics.yes_no_report(run["answers"], refs),
        "agreement": metrics.agreement(run["answers"], dense["answers"]),
        "tokens": token_summaries(run),
        "flops": {"gflops": float(fl) / 1e9, "relative": float(fl / dense_flops)},
        "pruning": to_dict(spec.pruning),
        "forced_counts": {
            "stage1_keep": spec.stage1_keep is not None,
            "stage2_keep": spec.stage2_keep is not None,
        },
    }
    if cells is not None and spec.pruning.enabled and run["visual_keep"]:
        out["named_objects"] = {
            "stage1": retention(cells, run["visual_keep"], n_patches, qtypes),
            "stage2": retention(cells, run["stage2_visual_keep"], run["visual_keep"], qtypes),
        }
    return out
