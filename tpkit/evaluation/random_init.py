"""``--random-init NAME``: speed only, on a full-size architecture with random weights.

A LLaVA-shaped random prompt (``random_init.text_before`` + the image run + ``text_after``), ``dense``
against ``ours`` at a fixed token-layer fraction (``random_init.budget``): random weights have no
meaningful CLS, so ours runs with fixed counts (:func:`tpkit.pruning.budgets.fixed_budget_counts`).
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path

import torch
import transformers

from tpkit.config import to_dict
from tpkit.evaluation import metrics
from tpkit.evaluation.config import EvalConfig
from tpkit.evaluation.methods import MethodSpec
from tpkit.evaluation.report import write_json
from tpkit.evaluation.speed import (
    LMShape,
    prefill_call,
    prefill_flops,
    random_prompt_batch,
    speed_table,
    summarize_times,
    time_calls,
    torch_threads,
)
from tpkit.models.core.attach import last_stats, set_pruning
from tpkit.models.families import attach_pruner
from tpkit.models.loading import resolve_device, resolve_dtype
from tpkit.models.registry import architectures, build_random_init, family_of
from tpkit.pruning.budgets import fixed_budget_counts
from tpkit.pruning.config import PruningConfig, Stage1Config

__all__ = [
    "RandomInitError",
    "architecture_names",
    "build_speed_model",
    "evaluate_speed_only",
    "lm_only_speedup",
]


class RandomInitError(ValueError):
    """``random_init.name`` is not an architecture tpkit knows (the message lists them)."""


def architecture_names() -> list[str]:
    """The names ``--random-init`` takes."""
    return sorted(architectures())


def check_architecture(name: str) -> None:
    """RandomInitError naming the known architectures (and the closest) when ``name`` is none of them."""
    names = architecture_names()
    if name in names:
        return
    close = difflib.get_close_matches(name, names, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise RandomInitError(f"--random-init {name!r}: unknown architecture{hint}; known: {', '.join(names)}")


def _lm_split(
    model,
    batch: dict,
    specs: list[MethodSpec],
    index: torch.Tensor,
    device: torch.device,
    warmup: int,
    repeats: int,
) -> tuple[float, float | None]:
    """The family's visual path alone (tower + projector + packing, stage 1 off: median ms) and the
    language model's prefill ratio, dense over ours, with it taken off both sides (:func:`lm_only_speedup`:
    None within ours' timing noise). The three calls are
    timed interleaved in the same rounds, so that load from other processes hits them alike: where the
    encoder takes most of the prefill (Gemma 3's 4,096-patch tower), a separately timed encoder would
    make the difference of two noisy numbers meaningless."""
    family = family_of(model)
    visual = {k: batch[k] for k in family.visual_keys if batch.get(k) is not None}
    off = Stage1Config(enabled=False)

    @torch.inference_mode()
    def encode():
        family.encode(model, batch["input_ids"], visual, off)

    def prefill(spec: MethodSpec):
        call = prefill_call(model, batch, spec.forced(index, device))

        def run():
            set_pruning(model, spec.pruning)
            return call()

        return run

    dense, ours = specs[0], specs[1]
    times = time_calls(
        {"vision": encode, "dense": prefill(dense), "ours": prefill(ours)}, device, repeats, warmup
    )
    v, d, o = (summarize_times(times[k]) for k in ("vision", "dense", "ours"))
    return v["median_ms"], lm_only_speedup(d, o, v["median_ms"])


def lm_only_speedup(dense: dict, ours: dict, vision_ms: float) -> float | None:
    """dense's prefill over ours' with the visual encoder's time taken from both (the language
    model's own speedup), from their ``{"median_ms", "p90_ms"}``; None when what is left of ours is
    within its timing noise (below its p90 - median, or 5% of it): a difference of two near-equal
    times is no ratio (a CPU run printed 888x)."""
    left = ours["median_ms"] - vision_ms
    if left <= max(ours["p90_ms"] - ours["median_ms"], 0.05 * ours["median_ms"]):
        return None
    return (dense["median_ms"] - vision_ms) / left


def build_speed_model(cfg: EvalConfig):
    """The random-weight model of ``cfg.random_init`` on ``cfg.device`` (what :func:`evaluate_speed_only`
    times)."""
    ri = cfg.random_init
    check_architecture(ri.name)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(ri.dtype, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    return build_random_init(
        ri.name, device, dtype, cfg.model.attn_implementation, scale_down=ri.scale_down, seed=cfg.seed
    )


def evaluate_speed_only(cfg: EvalConfig, model=None) -> dict:
    """dense vs ours at ``random_init.budget`` on a random-weight ``random_init.name`` architecture
    (``model``: that model built already, :func:`build_speed_model`; benchmarks wrap its tower)."""
    ri = cfg.random_init
    device = resolve_device(cfg.device)
    sp = cfg.speed.resolved(device.type)
    model = build_speed_model(cfg) if model is None else model
    shape = LMShape.of(model)
    batch = random_prompt_batch(
        model, sp.batch_size, ri.text_before, ri.text_after, seed=cfg.seed, device=device
    )
    family = family_of(model)
    placeholders = torch.tensor(family.placeholder_ids(model), device=device)
    n_vis = int(torch.isin(batch["input_ids"][0], placeholders).sum())
    n_text = batch["input_ids"].shape[1] - n_vis
    ours = copy.deepcopy(cfg.pruning)
    ours.stage1.enabled = ours.stage2.enabled = True
    k1, k2 = fixed_budget_counts(
        n_text, n_vis, shape.num_layers, ours.stage2.layer, ri.budget, cfg.eval.sweep_stage1_factor
    )
    bsz = sp.batch_size
    specs = [
        MethodSpec("dense", "dense", PruningConfig.disabled()),
        MethodSpec(
            f"ours@{ri.budget:g}",
            "ours",
            ours,
            torch.full((bsz,), k1, dtype=torch.long),
            torch.full((bsz,), k2, dtype=torch.long),
            ri.budget,
        ),
    ]
    attach_pruner(model, copy.deepcopy(ours))
    index = torch.arange(bsz)
    # achieved counts (one prefill of ours). Structure tokens (any-res newlines) follow the patches
    # kept, on top of the forced count: take what they add off the count, once.
    set_pruning(model, specs[1].pruning)
    prefill_call(model, batch, specs[1].forced(index, device))()
    extra = int(last_stats(model)["k1"].max()) - k1
    if extra > 0:
        specs[1].stage1_keep = torch.full((bsz,), max(1, k1 - extra), dtype=torch.long)
        prefill_call(model, batch, specs[1].forced(index, device))()
    st = last_stats(model)
    k1, k2 = int(st["k1"].max()), int(st["k2"].max())
    achieved = {
        k: metrics.token_summary(st[k].float()) for k in ("k1", "k2", "token_layer_fraction") if k in st
    }
    gen = [s.name for s in specs] if sp.generation else None
    with torch_threads(sp.threads):
        speeds = speed_table(
            model,
            specs,
            batch,
            index,
            device,
            sp.warmup,
            sp.repeats,
            sp.decode_tokens,
            gen,
            cfg.eval.progress,
            sp.compile,
        )
        vision_ms, lm_speedup = _lm_split(model, batch, specs, index, device, sp.warmup, sp.repeats)
    n_dense = n_text + n_vis
    flops = {
        "dense": float(
            prefill_flops(torch.tensor(n_dense), None, shape.num_layers, 0, shape.hidden, shape.ffn)
        ),
        specs[1].name: float(
            prefill_flops(
                torch.tensor(n_text + k1),
                torch.tensor(k2),
                shape.num_layers,
                ours.stage2.layer,
                shape.hidden,
                shape.ffn,
            )
        ),
    }
    results = {
        "mode": "random_init",
        "architecture": ri.name,
        "scale_down": ri.scale_down,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(model.dtype).removeprefix("torch."),
        "threads": sp.threads or torch.get_num_threads(),
        "repeats": sp.repeats,
        "attn_implementation": cfg.model.attn_implementation,
        "torch": torch.__version__,
        "batch_size": bsz,
        "prompt": {"n_dense": n_dense, "n_visual": n_vis, "n_text": n_text},
        "lm": {"num_layers": shape.num_layers, "hidden": shape.hidden, "ffn": shape.ffn},
        "budget": ri.budget,
        "counts": {"k1": k1, "k2": k2, "stage2_layer": ours.stage2.layer},
        "achieved": achieved,
        "flops_gflops_per_sample": {k: v / 1e9 for k, v in flops.items()},
        # the LM prefill FLOPs of dense over ours: the speedup the language model could reach
        "flops_ratio": flops["dense"] / flops[specs[1].name],
        "speed": speeds,
        "prefill_speedup": speeds[specs[1].name]["prefill_speedup"],
        # the visual encoder alone (tower, projector, packing; no stage 1), and the language model's
        # prefill ratio with it taken off both sides (ours' scoring stays on ours' side), timed in the same rounds
        "vision_ms": vision_ms,
        "lm_prefill_speedup": lm_speedup,
        "compile": sp.compile,
        "config": to_dict(cfg),
    }
    results["transformers"] = transformers.__version__
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(results, out_dir / "speed.json")
    return results
