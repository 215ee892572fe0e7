"""``evaluate(cfg)``: generate answers with every method, score them, time them, write the report.

Order of work: ``dense`` first (reference answers), then ``ours`` (its per-sample counts define the
matched budgets), then the other methods and the budget sweep (:mod:`tpkit.evaluation.methods`),
then speed on one batch (:mod:`tpkit.evaluation.speed`), then the report
(:mod:`tpkit.evaluation.report`). ``--random-init`` runs go to
:func:`tpkit.evaluation.random_init.evaluate_speed_only`.
"""

from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from tpkit.config import save_config, to_dict
from tpkit.data.collator import LlavaCollator
from tpkit.data.llava_json import load_llava_json
from tpkit.evaluation.config import EvalConfig, variant_pruning
from tpkit.evaluation.methods import (
    METHODS,
    MethodSpec,
    OursStats,
    check_methods,
    method_spec,
    sweep_spec,
)
from tpkit.evaluation.random_init import evaluate_speed_only
from tpkit.evaluation.report import overlay_samples, write_report
from tpkit.evaluation.results import budget_gap, method_result, run_flops
from tpkit.evaluation.retention import dataset_cells
from tpkit.evaluation.speed import LMShape, speed_table, torch_threads
from tpkit.models.core.attach import detach_pruner, last_stats, set_pruning, unwrap
from tpkit.models.families import attach_pruner, device_inputs, family_of
from tpkit.models.loading import (
    load_base_model,
    load_exported,
    load_processor,
    load_processor_for,
    read_export,
    resolve_device,
    resolve_dtype,
)

__all__ = ["EvalError", "evaluate", "load_model_and_processor", "load_dataset", "prefill_stats", "run_method"]


class EvalError(ValueError):
    """A problem with the evaluation inputs (dataset, model, adapter), with the path in the message."""


def _tqdm(it, enabled: bool, **kw):
    return tqdm(it, **kw) if enabled else it


# --------------------------------------------------------------------------------------------
# loading


def load_model_and_processor(cfg: EvalConfig, device: torch.device, with_adapter: bool = True):
    """(model with the pruner attached, processor, ours' PruningConfig).

    With ``cfg.adapter`` the export's trained pruning config is ours' and its processor (when saved)
    replaces the base's; ``with_adapter=False`` returns the base model without the adapter, which
    :func:`merge_adapter` then merges in (``evaluate`` runs ``dense`` on the base model first: the
    unpruned original the adapter was trained to match is the reference, not the adapter unpruned).
    """
    if why := cfg.model.missing_paths():
        raise EvalError(why)
    pruning = copy.deepcopy(cfg.pruning)
    processor = load_processor_for(cfg.model)
    if cfg.adapter is not None:
        pruning, processor = _check_adapter(cfg.adapter, processor)
    dtype = resolve_dtype(cfg.model.dtype, device)
    model = load_base_model(cfg.model, dtype=dtype, processor=processor).to(device).eval()
    attach_pruner(model, copy.deepcopy(pruning))
    if cfg.adapter is not None and with_adapter:
        model = merge_adapter(model, cfg.adapter, pruning)
    return model, processor, pruning


def _check_adapter(adapter: str, processor):
    """Validate ``adapter`` (a tpkit export) -> (its trained pruning config, processor)."""
    d = Path(adapter)
    if not d.is_dir():
        raise EvalError(f"adapter = {adapter!r}: no such directory")
    try:
        _, pruning = read_export(d)
    except FileNotFoundError as e:
        raise EvalError(f"adapter = {adapter!r}: {e}") from None
    if (d / "processor_config.json").is_file() or (d / "tokenizer_config.json").is_file():
        processor = load_processor(str(d))
    return pruning, processor


def merge_adapter(model, adapter: str | Path, pruning):
    """Merge the exported LoRA adapter into ``model`` (the same weights come back as a stock model
    with the pruner attached again with ``pruning``)."""
    detach_pruner(model)
    merged, _ = load_exported(str(adapter), base=model, merge=True, attach=False)
    attach_pruner(merged, copy.deepcopy(pruning))
    return merged.eval()


def load_dataset(cfg: EvalConfig):
    """The evaluation set (datasets.Dataset); clear error when it is missing or empty."""
    path = Path(cfg.data.test_json)
    if not path.is_file():
        raise EvalError(f"data.test_json = {str(path)!r}: no such file")
    ds, _ = load_llava_json(
        str(path),
        image_folder=cfg.data.image_folder,
        on_error=cfg.data.on_error,
        check_images=cfg.data.check_images,
    )
    if cfg.eval.limit is not None and len(ds) > cfg.eval.limit:
        ds = ds.select(range(cfg.eval.limit))
    if len(ds) == 0:
        raise EvalError(f"dataset {path} has no samples (after eval.limit / skipped records)")
    return ds


def _make_loader(ds, processor, cfg: EvalConfig, batch_size: int) -> DataLoader:
    coll = LlavaCollator(processor, max_length=cfg.data.max_length, mode="eval")
    return DataLoader(
        ds, batch_size=batch_size, shuffle=False, collate_fn=coll, num_workers=cfg.data.num_workers
    )


# --------------------------------------------------------------------------------------------
# one method over the dataset


def prefill_stats(model, batch: dict, pruned: bool) -> dict[str, torch.Tensor]:
    """last_stats of the prefill, or dense counts when pruning is off (the pruner records nothing
    then: its stats would be the previous pruned call's)."""
    st = (last_stats(model) or {}) if pruned else {}
    n_dense = batch["attention_mask"].sum(1).cpu()
    placeholders = torch.tensor(family_of(model).placeholder_ids(unwrap(model)))
    n_vis = torch.isin(batch["input_ids"].cpu(), placeholders).sum(1)
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
        inputs = device_inputs(model, batch, device)
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
        st = prefill_stats(model, inputs, spec.pruning.enabled)
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


# --------------------------------------------------------------------------------------------
# the whole run


def evaluate(cfg: EvalConfig) -> dict:
    """Run every method of ``cfg.eval.methods`` (+ variants and the budget sweep) and write the report.

    Returns the results dict (also in ``<out_dir>/results.json``).
    """
    if cfg.random_init.name is not None:
        return evaluate_speed_only(cfg)
    if why := cfg.missing_inputs():
        raise EvalError(why)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    out_dir = Path(cfg.out_dir)
    ds = load_dataset(cfg)
    # with an adapter: dense runs on the base model (the reference), then the adapter is merged in
    model, processor, ours_cfg = load_model_and_processor(cfg, device, with_adapter=False)
    pending_adapter = cfg.adapter
    tok = processor.tokenizer
    shape = LMShape.of(model)
    loader = _make_loader(ds, processor, cfg, cfg.data.eval_batch_size)
    ev = cfg.eval
    progress = ev.progress

    def run(spec: MethodSpec, keep: int) -> dict:
        return run_method(model, spec, loader, device, tok, ev.max_new_tokens, keep, progress)

    # which runs, in dependency order
    wanted = list(dict.fromkeys(ev.methods))
    need_ours = any(METHODS[m].needs_ours for m in wanted) or bool(ev.budgets and ev.sweep_methods)
    order = ["dense"] + (["ours"] if need_ours or "ours" in wanted else [])
    order += [m for m in wanted if m not in order]
    specs: dict[str, MethodSpec] = {}
    runs: dict[str, dict] = {}
    family = family_of(model)
    check_methods(family, unwrap(model), wanted + list(ev.sweep_methods if ev.budgets else []))
    # records that name their objects: retention numbers (one fixed patch grid per image: LLaVA-1.5)
    patch_grid = family.name == "llava"
    cells, n_patches = dataset_cells(ds, model.config.vision_config) if patch_grid else (None, 0)
    for name in _tqdm(order, progress, desc="methods"):
        if name != "dense" and pending_adapter is not None:
            model, pending_adapter = merge_adapter(model, pending_adapter, ours_cfg), None
        stats = _ours_stats(runs["ours"]) if METHODS[name].needs_ours else None
        spec = specs[name] = method_spec(name, ours_cfg, stats, shape.num_layers, ev.fastv_layer)
        # kept patch indices: of every sample for the retention numbers, else of ours' grid samples
        runs[name] = run(spec, len(ds) if cells is not None else (ev.grid_samples if name == "ours" else 0))
    for vname, changes in ev.variants.items():  # ours with some settings changed, same dense run
        spec = MethodSpec(f"ours[{vname}]", "variant", variant_pruning(ours_cfg, vname, changes))
        specs[spec.name] = spec
        runs[spec.name] = run(spec, len(ds) if cells is not None else 0)
    for fam in ev.sweep_methods if ev.budgets else []:
        for b in ev.budgets:
            ours_stats = _ours_stats(runs["ours"])
            spec = sweep_spec(
                fam, b, ours_cfg, ours_stats, shape.num_layers, ev.fastv_layer, ev.sweep_stage1_factor
            )
            specs[spec.name] = spec
            runs[spec.name] = run(spec, 0)

    # quality + accounting
    dense = runs["dense"]
    dense_flops = run_flops(dense, specs["dense"], shape).mean()
    methods = {
        name: method_result(r, specs[name], dense, shape, dense_flops, cells, n_patches)
        for name, r in runs.items()
    }
    for name, r in methods.items():
        gap = budget_gap(runs[name], specs[name], runs.get("ours"))
        if gap is not None:
            r["budget_gap_tokens"] = gap
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
        sbatch = device_inputs(model, first, device)
        index = torch.arange(sbatch["input_ids"].shape[0])
        main = [n for n in methods if "@" not in n and specs[n].family != "variant"]
        timed = [specs[n] for n in methods if (sp.sweep and "@" in n) or n in main]
        gen = main if sp.generation else None
        with torch_threads(sp.threads):
            speeds = speed_table(
                model,
                timed,
                sbatch,
                index,
                device,
                sp.warmup,
                sp.repeats,
                sp.decode_tokens,
                gen,
                progress,
                sp.compile,
            )
        for n, s in speeds.items():
            methods[n]["speed"] = s

    # report
    refs, qtypes = dense["references"], dense["qtypes"]
    predictions = [
        {"id": i, "reference": r, "qtype": q, **{m: runs[m]["answers"][j] for m in methods}}
        for j, (i, r, q) in enumerate(zip(dense["ids"], refs, qtypes))
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
    with open(out_dir / "predictions.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in predictions)
    grid = []
    if "ours" in runs and ev.grid_samples and patch_grid:
        first = next(iter(_make_loader(ds, processor, cfg, ev.grid_samples)))
        grid = overlay_samples(runs["ours"], processor, first, ev.grid_samples)
    results["files"] = write_report(results, out_dir, grid)
    results["table"] = Path(results["files"]["table"]).read_text()
    return results
