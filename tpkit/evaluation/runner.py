"""``evaluate(cfg)``: generate answers with every method, score them, time them, write the report.

Order of work: ``dense`` first (reference answers), then ``ours`` (its per-sample counts define the
matched budgets), then the other methods and the budget sweep (:mod:`tpkit.evaluation.methods`),
then speed on one batch, then the report (:mod:`tpkit.evaluation.report`).

``evaluate_speed_only(cfg)`` is the ``--random-init`` mode: a full-size architecture with random
weights, a LLaVA-shaped random prompt, ``dense`` against ``ours`` at a fixed token-layer fraction.
"""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path
from typing import Any

import torch

from tpkit.config import ConfigError, save_config, to_dict
from tpkit.evaluation import metrics
from tpkit.evaluation.config import EvalConfig, variant_pruning
from tpkit.evaluation.methods import (
    NEEDS_OURS,
    MethodSpec,
    OursStats,
    base_spec,
    fixed_budget_counts,
    matched_spec,
    sweep_spec,
)
from tpkit.evaluation.retention import named_cells, retention
from tpkit.evaluation.speed import (
    LMShape,
    build_random_init,
    generate_call,
    peak_memory_mb,
    prefill_call,
    prefill_flops,
    random_prompt_batch,
    reset_peak_memory,
    summarize_times,
    time_calls,
    torch_threads,
)

__all__ = ["EvalError", "evaluate", "evaluate_speed_only", "resolve_device", "run_method", "speed_table"]


class EvalError(ValueError):
    """A problem with the evaluation inputs (dataset, model, adapter), with the path in the message."""


def _tqdm(it, enabled: bool, **kw):
    if not enabled:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, **kw)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# --------------------------------------------------------------------------------------------
# loading


def load_model_and_processor(cfg: EvalConfig, device: torch.device, merge_adapter: bool = True):
    """(model with the pruner attached, processor, ours' PruningConfig).

    With ``cfg.adapter`` the export's trained pruning config is ours' and its processor (when saved)
    replaces the base's; ``merge_adapter=False`` returns the base model without the adapter, which
    :func:`merge_adapter` then merges in (``evaluate`` runs ``dense`` on the base model first: the
    unpruned original the adapter was trained to match is the reference, not the adapter unpruned).
    """
    from tpkit.models import attach_pruner
    from tpkit.models.loading import model_paths_error
    from tpkit.training.modeling import load_base_model, load_processor, resolve_dtype

    pruning = copy.deepcopy(cfg.pruning)
    mcfg = cfg.model
    tiny = mcfg.path == "tiny" or mcfg.path.startswith("tiny:")
    if why := model_paths_error(mcfg.path, mcfg.processor_path):
        raise EvalError(why)
    dtype = resolve_dtype(mcfg.dtype, on_gpu=device.type == "cuda")
    if mcfg.processor_path:
        processor = load_processor(mcfg.processor_path)
    elif tiny:
        from tpkit.data.processor import build_processor

        processor = build_processor()
    else:
        processor = load_processor(mcfg.path)
    if cfg.adapter is not None:
        pruning, processor = _check_adapter(cfg, processor)
    model = load_base_model(mcfg, dtype=dtype, processor=processor).to(device).eval()
    attach_pruner(model, copy.deepcopy(pruning))
    if cfg.adapter is not None and merge_adapter:
        model = merge_adapter(model, cfg.adapter, pruning)
    return model, processor, pruning


def _check_adapter(cfg: EvalConfig, processor):
    """Validate ``cfg.adapter`` (a tpkit export) -> (its trained pruning config, processor)."""
    import json

    from tpkit.config import from_dict
    from tpkit.export import EXPORT_META, PRUNING_JSON
    from tpkit.pruning import PruningConfig
    from tpkit.training.modeling import load_processor

    d = Path(cfg.adapter)
    if not d.is_dir():
        raise EvalError(f"adapter = {cfg.adapter!r}: no such directory")
    if not (d / EXPORT_META).is_file():
        raise EvalError(f"adapter = {cfg.adapter!r} is not a tpkit export (no {EXPORT_META}; see train.py)")
    if (d / "processor_config.json").is_file() or (d / "tokenizer_config.json").is_file():
        processor = load_processor(str(d))
    pruning = copy.deepcopy(cfg.pruning)
    if (d / PRUNING_JSON).is_file():
        pruning = from_dict(
            PruningConfig, json.loads((d / PRUNING_JSON).read_text()), source=str(d / PRUNING_JSON)
        )
    return pruning, processor


def merge_adapter(model, adapter: str | Path, pruning):
    """Merge the exported LoRA adapter into ``model`` (in place: the same object comes back, with
    the pruner attached again with ``pruning``)."""
    from tpkit.export import load_exported
    from tpkit.models import attach_pruner, detach_pruner

    detach_pruner(model)
    merged = load_exported(str(adapter), base=model, merge=True, attach=False)
    attach_pruner(merged, copy.deepcopy(pruning))
    return merged.eval()


def load_dataset(cfg: EvalConfig):
    """The evaluation set (datasets.Dataset), generated first when asked; clear error when empty."""
    from tpkit.data.llava_json import load_llava_json

    path = Path(cfg.data.test_json)
    if cfg.data.generate_synthetic:
        from tpkit.data.synthetic import ensure_split

        split = path.stem
        if split not in ("train", "val", "test", "ood"):
            raise EvalError(f"data.generate_synthetic writes <dir>/<train|val|test|ood>.json, got {path}")
        ensure_split(path.parent, split, n=cfg.eval.synthetic_n, seed=cfg.data.synthetic_seed + 2)
    if not path.is_file():
        raise EvalError(f"data.test_json = {str(path)!r}: no such file")
    ds, _ = load_llava_json(
        str(path),
        image_folder=cfg.data.image_folder,
        on_error=cfg.data.on_error,
        check_images=getattr(cfg.data, "check_images", "open"),
    )
    if cfg.eval.limit is not None and len(ds) > cfg.eval.limit:
        ds = ds.select(range(cfg.eval.limit))
    if len(ds) == 0:
        raise EvalError(f"dataset {path} has no samples (after eval.limit / skipped records)")
    return ds


# --------------------------------------------------------------------------------------------
# one method over the dataset


def _stats_or_dense(model, batch: dict, pruned: bool) -> dict[str, torch.Tensor]:
    """last_stats of the prefill, or dense counts when pruning is off (the pruner records nothing
    then: its stats would be the previous pruned call's)."""
    from tpkit.models import last_stats

    st = (last_stats(model) or {}) if pruned else {}
    am = batch["attention_mask"]
    n_dense = am.sum(1).cpu()
    n_vis = (batch["input_ids"] == model.config.image_token_id).sum(1).cpu()
    out = {
        "n_dense": n_dense,
        "n_visual": n_vis,
        "k1": n_vis,
        "n_prompt": n_dense,
        "k2": n_dense,
        "token_layer_fraction": torch.ones(len(n_dense), dtype=torch.float64),
    }
    for k in out:
        if st.get(k) is not None:
            out[k] = st[k].detach().cpu()
    out["visual_keep"] = st.get("visual_keep")
    out["stage2_visual_keep"] = st.get("stage2_visual_keep")
    return out


def run_method(
    model,
    spec: MethodSpec,
    loader,
    device: torch.device,
    tokenizer,
    max_new_tokens: int,
    keep_visual: int = 0,
    progress: bool = True,
) -> dict:
    """Greedy answers and per-sample token counts of one method over the whole loader.

    Returns ``answers`` (list[str]), per-sample tensors (N,) ``n_dense``, ``n_visual``, ``k1``,
    ``n_prompt``, ``k2``, ``fraction``, and the kept patch indices of the first ``keep_visual``
    samples (``visual_keep`` / ``stage2_visual_keep`` lists).
    """
    from tpkit.models import set_pruning

    set_pruning(model, spec.pruning)
    answers: list[str] = []
    refs: list[str | None] = []
    qtypes: list[str | None] = []
    ids: list[str] = []
    cols: dict[str, list[torch.Tensor]] = {
        k: [] for k in ("n_dense", "n_visual", "k1", "n_prompt", "k2", "fraction")
    }
    vk, vk2 = [], []
    offset = 0
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for batch in _tqdm(loader, progress, desc=spec.name, leave=False):
        b = batch["input_ids"].shape[0]
        idx = torch.arange(offset, offset + b)
        offset += b
        inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "pixel_values")}
        inputs["pixel_values"] = inputs["pixel_values"].to(next(model.parameters()).dtype)
        with torch.inference_mode():
            out = model.generate(
                **inputs,
                **spec.forced(idx, device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=pad,
            )
        new = out[:, inputs["input_ids"].shape[1] :]
        answers += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
        refs += list(batch.get("answers") or [None] * b)
        qtypes += list(batch.get("qtypes") or [None] * b)
        ids += [str(i) for i in (batch.get("ids") or range(offset - b, offset))]
        st = _stats_or_dense(model, inputs, spec.pruning.enabled)
        for k in ("n_dense", "n_visual", "k1", "n_prompt", "k2"):
            cols[k].append(st[k].long())
        cols["fraction"].append(st["token_layer_fraction"].double())
        for i in range(b):
            if len(vk) < keep_visual:
                vk.append(st["visual_keep"][i].cpu() if st["visual_keep"] is not None else None)
                vk2.append(
                    st["stage2_visual_keep"][i].cpu() if st["stage2_visual_keep"] is not None else None
                )
    res: dict[str, Any] = {k: torch.cat(v) for k, v in cols.items()}
    res["answers"] = answers
    res["references"], res["qtypes"], res["ids"] = refs, qtypes, ids
    res["visual_keep"], res["stage2_visual_keep"] = vk, vk2
    return res


def _ours_stats(run: dict) -> OursStats:
    return OursStats(run["n_dense"], run["n_visual"], run["k1"], run["n_prompt"], run["k2"], run["fraction"])


def _budget_gap(run: dict, spec: MethodSpec, ours: dict | None) -> float | None:
    """Max over samples of |achieved - target| token-layer fraction, in tokens per layer
    (fraction * n_dense): the target is ours' fraction (matched baselines) or the sweep budget."""
    if spec.budget is not None:
        target = torch.full_like(run["fraction"], spec.budget)
    elif spec.family == "topk-cls" and ours is not None:  # one K for all: matched on average
        return float(
            (run["fraction"].mean() - ours["fraction"].mean()).abs() * run["n_dense"].double().mean()
        )
    elif spec.family in NEEDS_OURS and ours is not None:
        target = ours["fraction"]
    else:
        return None
    return float(((run["fraction"] - target) * run["n_dense"].double()).abs().max())


def _stage2_layer(spec: MethodSpec) -> int | None:
    return spec.pruning.stage2.layer if spec.pruning.stage2.enabled else None


def _flops(run: dict, spec: MethodSpec, shape: LMShape) -> torch.Tensor:
    layer = _stage2_layer(spec)
    if layer is None:
        return prefill_flops(run["n_prompt"], None, shape.num_layers, 0, shape.hidden, shape.ffn)
    return prefill_flops(run["n_prompt"], run["k2"], shape.num_layers, layer, shape.hidden, shape.ffn)


def _summaries(run: dict, spec: MethodSpec, batch: list[dict] | None = None) -> dict:
    return {
        "k1": metrics.token_summary(run["k1"]),
        "k2": metrics.token_summary(run["k2"]),
        "k1_fraction": metrics.token_summary(run["k1"].double() / run["n_visual"].clamp(min=1).double()),
        "n_prompt": metrics.token_summary(run["n_prompt"]),
        "fraction": metrics.token_summary(run["fraction"]),
    }


# --------------------------------------------------------------------------------------------
# speed


def speed_table(
    model,
    specs: list[MethodSpec],
    batch: dict,
    index: torch.Tensor,
    device: torch.device,
    warmup: int,
    repeats: int,
    decode_tokens: int = 16,
    generation: list[str] | None = None,
    progress: bool = True,
) -> dict[str, dict]:
    """Per spec: prefill median/p90 ms, samples/s, optional time to first token and decode tok/s,
    peak memory; ``prefill_speedup`` (and ``ttft_speedup``) relative to the spec named ``dense``.

    All timed calls are interleaved round by round (dense, ours, ..., dense, ours, ...), each one
    switching the pruner's config first (an attribute assignment), so that load from other processes
    and clock changes hit every method alike. ``generation`` names the specs whose ``generate`` is
    timed too; peak memory comes from one separate prefill + generate per spec (CUDA only).
    """
    from tpkit.models import set_pruning

    bsz = batch["input_ids"].shape[0]

    def with_cfg(spec: MethodSpec, fn):
        def run():
            set_pruning(model, spec.pruning)
            return fn()

        return run

    fns = {}
    for spec in specs:
        extra = spec.forced(index, device)
        fns[(spec.name, "prefill")] = with_cfg(spec, prefill_call(model, batch, extra))
        if generation is not None and spec.name in generation:
            fns[(spec.name, "gen1")] = with_cfg(spec, generate_call(model, batch, 1, extra))
            fns[(spec.name, "genN")] = with_cfg(spec, generate_call(model, batch, 1 + decode_tokens, extra))
    times = time_calls(fns, device, repeats, warmup, progress)
    out: dict[str, dict] = {}
    for spec in specs:
        r: dict[str, Any] = {"batch_size": bsz, "prefill": summarize_times(times[(spec.name, "prefill")])}
        r["samples_per_s"] = 1e3 * bsz / r["prefill"]["median_ms"]
        if (spec.name, "gen1") in times:
            t1 = summarize_times(times[(spec.name, "gen1")])["median_ms"]
            tn = summarize_times(times[(spec.name, "genN")])["median_ms"]
            r["ttft_ms"] = t1
            r["decode_tokens_per_s"] = 1e3 * bsz * decode_tokens / (tn - t1) if tn > t1 else None
        if device.type == "cuda":
            reset_peak_memory(device)
            fns[(spec.name, "prefill")]()
            if (spec.name, "genN") in fns:
                fns[(spec.name, "genN")]()
        r["peak_memory_mb"] = peak_memory_mb(device)
        out[spec.name] = r
    if "dense" in out:
        base = out["dense"]["prefill"]["median_ms"]
        for r in out.values():
            r["prefill_speedup"] = base / r["prefill"]["median_ms"]
            if "ttft_ms" in r and "ttft_ms" in out["dense"]:
                r["ttft_speedup"] = out["dense"]["ttft_ms"] / r["ttft_ms"]
    return out


# --------------------------------------------------------------------------------------------
# the whole run


def _grid_samples(ds, run: dict, processor, loader_first: dict, n: int) -> list[dict]:
    """Images as the model saw them (un-normalised pixel_values) with ours' kept patches."""
    ip = processor.image_processor
    mean = torch.tensor(ip.image_mean).view(3, 1, 1)
    std = torch.tensor(ip.image_std).view(3, 1, 1)
    px = loader_first["pixel_values"][:n].float().cpu()
    side = px.shape[-1]
    patch = getattr(processor, "patch_size", None) or 14
    out = []
    for i in range(min(n, px.shape[0], len(run["visual_keep"]))):
        if run["visual_keep"][i] is None:
            break
        img = (px[i] * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
        out.append(
            {
                "image": img,
                "grid": side // patch,
                "visual_keep": run["visual_keep"][i],
                "stage2_visual_keep": run["stage2_visual_keep"][i],
                "title": f"{run['references'][i]} -> {run['answers'][i]}"[:28],
            }
        )
    return out


def _named_cells(ds, model) -> tuple[list | None, int]:
    """Per sample, the patch sets of the objects its question names, and the patch count N.

    (None, N) unless the records carry the synthetic benchmark's object boxes and questions.
    """
    from PIL import Image

    vc = model.config.vision_config
    n_patches = (vc.image_size // vc.patch_size) ** 2
    if "objects" not in ds.column_names or len(ds) == 0:
        return None, n_patches
    rows = ds.select_columns([c for c in ("objects", "conversations", "image_path") if c in ds.column_names])
    rows = rows.to_list()
    source = None
    if rows[0].get("image_path"):
        with Image.open(rows[0]["image_path"]) as im:
            source = im.size[0]
    cells = named_cells(rows, vc.image_size, vc.patch_size, source)
    return (cells if any(c is not None for c in cells) else None), n_patches


def _make_loader(ds, processor, cfg: EvalConfig, batch_size: int):
    from torch.utils.data import DataLoader

    from tpkit.data.collator import LlavaCollator

    coll = LlavaCollator(processor, max_length=cfg.data.max_length, mode="eval")
    return DataLoader(
        ds, batch_size=batch_size, shuffle=False, collate_fn=coll, num_workers=cfg.data.num_workers
    )


def evaluate(cfg: EvalConfig) -> dict:
    """Run every method of ``cfg.eval.methods`` (+ the budget sweep) and write the report.

    Returns the results dict (also in ``<out_dir>/results.json``).
    """
    from tpkit.evaluation.report import write_report

    if cfg.random_init.name is not None:
        return evaluate_speed_only(cfg)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    out_dir = Path(cfg.out_dir)
    ds = load_dataset(cfg)
    # with an adapter: dense runs on the base model (the reference), then the adapter is merged in
    model, processor, ours_cfg = load_model_and_processor(cfg, device, merge_adapter=False)
    pending_adapter = cfg.adapter
    tok = processor.tokenizer
    shape = LMShape.of(model)
    loader = _make_loader(ds, processor, cfg, cfg.data.eval_batch_size)
    ev = cfg.eval
    progress = ev.progress

    # which runs, in dependency order
    wanted = list(dict.fromkeys(ev.methods))
    need_ours = bool(set(wanted) & set(NEEDS_OURS)) or bool(ev.budgets and ev.sweep_methods)
    order = ["dense"] + (["ours"] if need_ours or "ours" in wanted else [])
    order += [m for m in wanted if m not in order]
    specs: dict[str, MethodSpec] = {}
    runs: dict[str, dict] = {}
    cells, n_patches = _named_cells(ds, model)  # synthetic data: the objects each question names
    for name in _tqdm(order, progress, desc="methods"):
        if name != "dense" and pending_adapter is not None:
            model, pending_adapter = merge_adapter(model, pending_adapter, ours_cfg), None
        if name in NEEDS_OURS:
            spec = matched_spec(name, ours_cfg, _ours_stats(runs["ours"]), shape.num_layers, ev.fastv_layer)
        else:
            spec = base_spec(name, ours_cfg)
        specs[name] = spec
        # kept patch indices: of every sample for the retention numbers, else of ours' grid samples
        keep = len(ds) if cells is not None else (ev.grid_samples if name == "ours" else 0)
        runs[name] = run_method(model, spec, loader, device, tok, ev.max_new_tokens, keep, progress)
    for vname, changes in ev.variants.items():  # ours with some settings changed, same dense run
        spec = MethodSpec(f"ours[{vname}]", "variant", variant_pruning(ours_cfg, vname, changes))
        specs[spec.name] = spec
        keep = len(ds) if cells is not None else 0
        runs[spec.name] = run_method(model, spec, loader, device, tok, ev.max_new_tokens, keep, progress)
    for fam in ev.sweep_methods if ev.budgets else []:
        for b in ev.budgets:
            spec = sweep_spec(
                fam,
                b,
                ours_cfg,
                _ours_stats(runs["ours"]),
                shape.num_layers,
                ev.fastv_layer,
                ev.sweep_stage1_factor,
            )
            specs[spec.name] = spec
            runs[spec.name] = run_method(model, spec, loader, device, tok, ev.max_new_tokens, 0, progress)

    # quality + accounting
    refs, qtypes = runs["dense"]["references"], runs["dense"]["qtypes"]
    dense_answers = runs["dense"]["answers"]
    dense_flops = _flops(runs["dense"], specs["dense"], shape).mean()
    methods: dict[str, dict] = {}
    for name, run in runs.items():
        spec = specs[name]
        acc = metrics.accuracy_report(run["answers"], refs, qtypes)
        fl = _flops(run, spec, shape).mean()
        methods[name] = {
            "family": spec.family,
            "budget": spec.budget,
            "accuracy": acc["accuracy"],
            "first_word_accuracy": acc["first_word_accuracy"],
            "n": acc["n"],
            "by_qtype": acc["by_qtype"],
            "yes_no": metrics.yes_no_report(run["answers"], refs),
            "agreement": metrics.agreement(run["answers"], dense_answers),
            "tokens": _summaries(run, spec),
            "flops": {"gflops": float(fl) / 1e9, "relative": float(fl / dense_flops)},
            "pruning": to_dict(spec.pruning),
            "forced_counts": {
                "stage1_keep": spec.stage1_keep is not None,
                "stage2_keep": spec.stage2_keep is not None,
            },
        }
        if cells is not None and spec.pruning.enabled and run["visual_keep"]:
            methods[name]["named_objects"] = {
                "stage1": retention(cells, run["visual_keep"], n_patches, qtypes),
                "stage2": retention(cells, run["stage2_visual_keep"], run["visual_keep"], qtypes),
            }
        gap = _budget_gap(run, spec, runs.get("ours"))
        if gap is not None:
            methods[name]["budget_gap_tokens"] = gap
            if gap > 1.0:
                print(
                    f"warning: {name} misses its matched budget by up to {gap:.1f} tokens per layer "
                    "(the target is outside what the method can keep: see budget_gap_tokens)",
                    file=sys.stderr,
                )
    dense_acc = methods["dense"]["accuracy"]
    for r in methods.values():
        r["relative_accuracy"] = (
            r["accuracy"] / dense_acc if dense_acc and not math.isnan(dense_acc) else None
        )

    # speed on the first batch
    if cfg.speed.enabled:
        sp = cfg.speed
        first = next(iter(_make_loader(ds, processor, cfg, sp.batch_size)))
        sbatch = {k: first[k].to(device) for k in ("input_ids", "attention_mask", "pixel_values")}
        sbatch["pixel_values"] = sbatch["pixel_values"].to(next(model.parameters()).dtype)
        index = torch.arange(sbatch["input_ids"].shape[0])
        main = [n for n in methods if "@" not in n and specs[n].family != "variant"]
        timed = [specs[n] for n in methods if (sp.sweep and "@" in n) or n in main]
        gen = main if sp.generation else None
        with torch_threads(sp.threads):
            speeds = speed_table(
                model, timed, sbatch, index, device, sp.warmup, sp.repeats, sp.decode_tokens, gen, progress,
            )  # fmt: skip
        for n, s in speeds.items():
            methods[n]["speed"] = s

    # report
    predictions = [
        {"id": i, "reference": r, "qtype": q, **{m: runs[m]["answers"][j] for m in methods}}
        for j, (i, r, q) in enumerate(zip(runs["dense"]["ids"], refs, qtypes))
    ]
    results = {
        "config": to_dict(cfg),
        "dataset": {"path": cfg.data.test_json, "n": len(refs)},
        "device": str(device),
        "model": {
            "path": cfg.model.path,
            "adapter": cfg.adapter,
            "num_layers": shape.num_layers,
            # with an adapter, "dense" is the base model without it: the unpruned original
            "dense": "base model without the adapter" if cfg.adapter else "base model",
        },
        "methods": methods,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "config.yaml")
    write_predictions(predictions, out_dir / "predictions.jsonl")
    grid = []
    if "ours" in runs and ev.grid_samples:
        first = next(iter(_make_loader(ds, processor, cfg, ev.grid_samples)))
        grid = _grid_samples(ds, runs["ours"], processor, first, ev.grid_samples)
    results["files"] = write_report(results, out_dir, grid)
    results["table"] = (Path(results["files"]["table"])).read_text()
    return results


def write_predictions(rows: list[dict], path: Path) -> None:
    import json

    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


# --------------------------------------------------------------------------------------------
# --random-init: speed only


def evaluate_speed_only(cfg: EvalConfig) -> dict:
    """dense vs ours at ``random_init.budget`` on a random-weight ``random_init.name`` architecture."""
    from tpkit.evaluation.report import write_json
    from tpkit.models import attach_pruner, last_stats, set_pruning

    ri, sp = cfg.random_init, cfg.speed
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    model = build_random_init(
        ri.name, device, ri.dtype, cfg.model.attn_implementation, scale_down=ri.scale_down, seed=cfg.seed
    )
    shape = LMShape.of(model)
    batch = random_prompt_batch(
        model, sp.batch_size, ri.text_before, ri.text_after, seed=cfg.seed, device=device
    )
    n_vis = int((batch["input_ids"][0] == model.config.image_token_id).sum())
    n_text = batch["input_ids"].shape[1] - n_vis
    ours = copy.deepcopy(cfg.pruning)
    ours.stage1.enabled = ours.stage2.enabled = True
    k1, k2 = fixed_budget_counts(
        n_text, n_vis, shape.num_layers, ours.stage2.layer, ri.budget, cfg.eval.sweep_stage1_factor
    )
    bsz = sp.batch_size
    specs = [
        MethodSpec("dense", "dense", type(ours).disabled()),
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
    # achieved counts (one prefill of ours)
    set_pruning(model, specs[1].pruning)
    prefill_call(model, batch, specs[1].forced(index, device))()
    st = last_stats(model)
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
        )
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
        "dtype": ri.dtype,
        "attn_implementation": cfg.model.attn_implementation,
        "torch": torch.__version__,
        "batch_size": bsz,
        "prompt": {"n_dense": n_dense, "n_visual": n_vis, "n_text": n_text},
        "lm": {"num_layers": shape.num_layers, "hidden": shape.hidden, "ffn": shape.ffn},
        "budget": ri.budget,
        "counts": {"k1": k1, "k2": k2, "stage2_layer": ours.stage2.layer},
        "achieved": achieved,
        "flops_gflops_per_sample": {k: v / 1e9 for k, v in flops.items()},
        "speed": speeds,
        "prefill_speedup": speeds[specs[1].name]["prefill_speedup"],
        "config": to_dict(cfg),
    }
    try:
        import transformers

        results["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(results, out_dir / "speed.json")
    return results


__all__ += ["ConfigError"]
