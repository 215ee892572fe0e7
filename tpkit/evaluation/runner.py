"""``evaluate(cfg)``: generate answers with every method, score them, time them, write the report.

Order of work: ``dense`` first (reference answers), then ``ours`` (its per-sample counts define the
matched budgets), then the other methods and the budget sweep (:mod:`tpkit.evaluation.methods`),
then speed on one batch (:mod:`tpkit.evaluation.speed`), then the report
(:mod:`tpkit.evaluation.report`). ``--random-init`` runs go to
:func:`tpkit.evaluation.random_init.evaluate_speed_only`.
"""

from __future__ import annotations

import copy
import datetime
import json
import math
import os
import platform
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
import transformers
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from tpkit.checkout import tpkit_version
from tpkit.config import ConfigError, save_config, to_dict, unwritable_dir
from tpkit.data.collator import LlavaCollator
from tpkit.data.errors import RecordError, write_skipped
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
from tpkit.models.checks import check_pruning_fits
from tpkit.models.core.attach import detach_pruner, last_stats, set_pruning, unwrap
from tpkit.models.families import attach_pruner, device_inputs
from tpkit.models.loading import (
    ExportBaseError,
    check_adapter_shapes,
    check_export_base,
    load_base_model,
    load_exported,
    load_processor,
    load_processor_for,
    read_export,
    read_model_config,
    resolve_device,
    resolve_dtype,
)
from tpkit.models.registry import family_of

__all__ = [
    "EvalError",
    "evaluate",
    "load_processor_and_pruning",
    "load_model_and_processor",
    "load_dataset",
    "load_eval_records",
    "prefill_stats",
    "run_info",
    "run_method",
    "method_file",
]


class EvalError(ValueError):
    """A problem with the evaluation inputs (dataset, model, adapter), with the path in the message."""


def _tqdm(it, enabled: bool, **kw):
    return tqdm(it, **kw) if enabled else it


# --------------------------------------------------------------------------------------------
# loading


SKIPPED = "skipped_records.jsonl"  # every record an evaluation skipped (data.on_error: skip)


def load_processor_and_pruning(cfg: EvalConfig, pruning_overrides: dict[str, Any] | None = None):
    """(processor, ours' PruningConfig) before any model work: with ``cfg.adapter``, the export's
    processor (when saved) and its trained pruning config, ``pruning_overrides`` ({"stage1.min_keep":
    8}, from ``--set pruning.*``) applied on top; else the base's processor and ``cfg.pruning``."""
    if why := cfg.model.missing_paths():
        raise EvalError(why)
    processor = load_processor_for(cfg.model)
    if cfg.adapter is None:
        return processor, copy.deepcopy(cfg.pruning)
    pruning, processor = _check_adapter(cfg.adapter, processor)
    if pruning_overrides:
        pruning = variant_pruning(pruning, "--set pruning", pruning_overrides)
    return processor, pruning


def load_model_and_processor(
    cfg: EvalConfig,
    device: torch.device,
    with_adapter: bool = True,
    pruning_overrides: dict[str, Any] | None = None,
):
    """(model with the pruner attached, processor, ours' PruningConfig).

    With ``cfg.adapter`` the export's trained pruning config is ours' (``pruning_overrides`` on top)
    and its processor (when saved) replaces the base's; the base is checked against the one the
    adapter was trained on before its weights load (another architecture: an error naming both;
    other weights: a warning). ``with_adapter=False`` returns the base model without the adapter,
    which :func:`merge_adapter` then merges in (``evaluate`` runs ``dense`` on the base model first:
    the unpruned original the adapter was trained to match is the reference, not the adapter
    unpruned).
    """
    processor, pruning = load_processor_and_pruning(cfg, pruning_overrides)
    model = _load_model(cfg, device, processor, pruning)
    if cfg.adapter is not None and with_adapter:
        model = merge_adapter(model, cfg.adapter, pruning)
    return model, processor, pruning


def _load_model(cfg: EvalConfig, device: torch.device, processor, pruning):
    """The base model with the pruner attached, checked against the adapter and ``pruning`` before use."""
    if cfg.adapter is not None and not cfg.model.source.is_tiny:
        try:  # the config only: no weights are read for this check
            base_config = read_model_config(cfg.model.path, cfg.model.revision)
        except ValueError:
            base_config = None  # load_base_model says why
        if base_config is not None:
            _check_base(cfg.adapter, base_config)
    dtype = resolve_dtype(cfg.model.dtype, device)
    model = load_base_model(cfg.model, dtype=dtype, processor=processor).to(device).eval()
    if cfg.adapter is not None:
        for w in _check_base(cfg.adapter, model):
            print(f"warning: {w}", file=sys.stderr)
        try:
            check_adapter_shapes(model, cfg.adapter)
        except ExportBaseError as e:
            raise EvalError(str(e)) from None
    try:
        check_pruning_fits(model, pruning)
    except ConfigError as e:
        raise EvalError(str(e)) from None
    attach_pruner(model, copy.deepcopy(pruning))
    return model


def _check_base(adapter: str, model_or_config) -> list[str]:
    try:
        return check_export_base(adapter, model_or_config)
    except ExportBaseError as e:
        raise EvalError(f"{e} (before any evaluation: model.path = the base it was trained on)") from None


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
    with warnings.catch_warnings():  # the base was checked (and any difference said) when it loaded
        warnings.simplefilter("ignore")
        merged, _ = load_exported(str(adapter), base=model, merge=True, attach=False)
    attach_pruner(merged, copy.deepcopy(pruning))
    return merged.eval()


def load_dataset(cfg: EvalConfig, processor: Any = None):
    """The evaluation set (datasets.Dataset); clear error when it is missing or has no usable record."""
    return load_eval_records(cfg, processor)[0]


def load_eval_records(cfg: EvalConfig, processor: Any = None):
    """The evaluation set (datasets.Dataset) and its load report. With ``processor``, prompts over
    ``data.max_length`` are bad records (skipped with ``data.on_error: skip``) before any model work."""
    path = Path(cfg.data.test_json)
    if not path.is_file():
        raise EvalError(f"data.test_json = {str(path)!r}: no such file")
    ds, report = load_llava_json(
        str(path),
        image_folder=cfg.data.image_folder,
        on_error=cfg.data.on_error,
        check_images=cfg.data.check_images,
        confine_images=cfg.data.confine_images,
        duplicate_ids=cfg.data.duplicate_ids,
        processor=processor,
        max_length=cfg.data.max_length,
        mode="eval",
    )
    if cfg.eval.limit is not None and len(ds) > cfg.eval.limit:
        ds = ds.select(range(cfg.eval.limit))
    return ds, report


def _make_loader(ds, processor, cfg: EvalConfig, batch_size: int) -> DataLoader:
    coll = LlavaCollator(processor, max_length=cfg.data.max_length, mode="eval", on_error=cfg.data.on_error)
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
    ``n_prompt``, ``k2``, ``fraction``, the kept patch indices of the first ``keep_visual``
    samples (``visual_keep`` / ``stage2_visual_keep`` lists), and ``skipped``: the records the
    collator dropped (``data.on_error: skip``; the same for every method).
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
    skipped: list[RecordError] = []
    offset = 0
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for batch in _tqdm(loader, progress, desc=spec.name, leave=False):
        skipped += batch.get("skipped") or []  # data.on_error: skip, at batch time
        if not batch["ids"]:
            continue
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
    res["skipped"] = skipped
    return res


def _adapter_step(adapter: str | None) -> int | None:
    """The training step an exported adapter was saved at (its tpkit_export.json), when it says."""
    if adapter is None:
        return None
    step = (read_export(adapter)[0].get("metrics") or {}).get("global_step")
    return None if step is None else int(step)


def run_info(device: torch.device, timing_threads: int | None = None) -> dict[str, Any]:
    """When and with what a run ran: date (UTC), tpkit's version and commit, torch and transformers,
    the device, and the torch CPU threads of the timing (0: torch's default; None: nothing timed)."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "tpkit": tpkit_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": str(device),
        "device_name": (
            torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else f"{platform.machine()}, {os.cpu_count()} cores"
        ),
        "timing_threads": timing_threads or (None if timing_threads is None else torch.get_num_threads()),
    }


def _ours_stats(run: dict) -> OursStats:
    return OursStats(run["n_dense"], run["n_visual"], run["k1"], run["n_prompt"], run["k2"], run["fraction"])


# --------------------------------------------------------------------------------------------
# the whole run


def _method_file(out_dir: Path, name: str, run: dict) -> None:
    """One method's answers and token counts, written as soon as it finished (a crash later keeps them)."""
    d = out_dir / "methods"
    d.mkdir(exist_ok=True)
    keys = (
        "ids",
        "references",
        "qtypes",
        "answers",
        "n_dense",
        "n_visual",
        "k1",
        "n_prompt",
        "k2",
        "fraction",
    )
    data = {k: run[k].tolist() if torch.is_tensor(run[k]) else run[k] for k in keys}
    method_file(out_dir, name).write_text(json.dumps({"method": name, **data}) + "\n")


def method_file(out_dir: str | Path, name: str) -> Path:
    """``out_dir/methods/<name>.json``: one method's answers and token counts (the name made file-safe)."""
    safe = "".join(c if c.isalnum() or c in "._@-" else "_" for c in name)
    return Path(out_dir) / "methods" / f"{safe}.json"


def _report_skipped(
    out_dir: Path, cfg: EvalConfig, load: list[RecordError], batch: list[RecordError]
) -> dict:
    """List every skipped record in ``out_dir/skipped_records.jsonl`` and say so; the dataset entry
    of results.json."""
    path = out_dir / SKIPPED
    path.unlink(missing_ok=True)
    write_skipped(path, str(cfg.data.test_json), load, stage="load")
    write_skipped(path, str(cfg.data.test_json), batch, stage="batch")
    n = len(load) + len(batch)
    if n:
        print(
            f"warning: {cfg.data.test_json}: skipped {n} bad records (data.on_error: skip; e.g. "
            f"{(load + batch)[0]}): every one is listed in {path}",
            file=sys.stderr,
        )
    return {"n_skipped": n, "skipped_file": str(path) if n else None}


def evaluate(cfg: EvalConfig, pruning_overrides: dict[str, Any] | None = None) -> dict:
    """Run every method of ``cfg.eval.methods`` (+ variants and the budget sweep) and write the report.

    ``pruning_overrides`` ({"stage1.min_keep": 8}): with ``cfg.adapter``, changes to the adapter's
    trained pruning config (``tpkit evaluate --set pruning.KEY=VALUE``), recorded in the results.
    Checks come first (inputs, a writable ``out_dir``, the data, the adapter against the base), then
    each method's answers are written to ``out_dir/methods/`` as it finishes. Returns the results
    dict (also in ``<out_dir>/results.json``).
    """
    if cfg.random_init.name is not None:
        return evaluate_speed_only(cfg)
    if why := cfg.missing_inputs():
        raise EvalError(why)
    if why := unwritable_dir(cfg.out_dir, "out_dir"):
        raise EvalError(why)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    out_dir = Path(cfg.out_dir)
    processor, ours_cfg = load_processor_and_pruning(cfg, pruning_overrides)
    ds, load_report = load_eval_records(cfg, processor)
    (out_dir / "methods").mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "config.yaml")
    # with an adapter: dense runs on the base model (the reference), then the adapter is merged in
    model = _load_model(cfg, device, processor, ours_cfg)
    pending_adapter = cfg.adapter
    tok = processor.tokenizer
    shape = LMShape.of(model)
    loader = _make_loader(ds, processor, cfg, cfg.data.eval_batch_size)
    ev = cfg.eval
    progress = ev.progress

    def run(spec: MethodSpec, keep: int) -> dict:
        r = run_method(model, spec, loader, device, tok, ev.max_new_tokens, keep, progress)
        _method_file(out_dir, spec.name, r)
        return r

    # which runs, in dependency order
    wanted = list(dict.fromkeys(ev.methods))
    sweep_methods = list(ev.sweep_methods if ev.budgets else [])
    notes: list[str] = []
    if not ours_cfg.stage1.enabled:  # an adapter's pruning (the config's own is checked when it loads)
        left = [m for m in wanted if METHODS[m].needs_ours] + [f"{m}@F" for m in sweep_methods]
        if left:
            wanted, sweep_methods = [m for m in wanted if not METHODS[m].needs_ours], []
            notes.append(
                f"{', '.join(left)} left out: they are matched to ours' stage-1 counts, and ours' pruning "
                f"({cfg.adapter or 'pruning'}) has stage 1 off, so they would keep every patch (--set "
                "pruning.stage1.enabled=true evaluates the adapter with stage 1 on)"
            )
            print(f"warning: {notes[-1]}", file=sys.stderr)
    need_ours = any(METHODS[m].needs_ours for m in wanted) or bool(sweep_methods)
    order = ["dense"] + (["ours"] if need_ours or "ours" in wanted else [])
    order += [m for m in wanted if m not in order]
    specs: dict[str, MethodSpec] = {}
    runs: dict[str, dict] = {}
    family = family_of(model)
    check_methods(family, unwrap(model), wanted + sweep_methods)
    # records that name their objects: retention numbers (families whose image is one fixed patch grid)
    patch_grid = family.fixed_patch_grid
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
    for fam in sweep_methods:
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
        sp = cfg.speed.resolved(device.type)
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
    skipped = _report_skipped(out_dir, cfg, load_report.errors, dense["skipped"])
    timing_threads = None  # nothing timed
    if cfg.speed.enabled:
        timing_threads = cfg.speed.resolved(device.type).threads or 0  # 0: torch's default
    config = to_dict(cfg)
    config["pruning"] = to_dict(ours_cfg)  # what ours ran with (an adapter's, with any overrides)
    results = {
        "config": config,
        "dataset": {
            "path": cfg.data.test_json,
            "n": len(refs),
            "n_records": load_report.n_records,
            "limit": cfg.eval.limit,
            **skipped,
        },
        "device": str(device),
        "run": run_info(device, timing_threads),
        "model": {
            "path": cfg.model.path,
            "dtype": str(resolve_dtype(cfg.model.dtype, device)).removeprefix("torch."),
            "attn_implementation": cfg.model.attn_implementation,
            "adapter": cfg.adapter,
            "adapter_step": _adapter_step(cfg.adapter),
            # with an adapter, ours runs with its pruning.json and these --set pruning.* changes
            "pruning_overrides": dict(pruning_overrides or {}) if cfg.adapter else None,
            "num_layers": shape.num_layers,
            # with an adapter, "dense" is the base model without it: the unpruned original
            "dense": "base model without the adapter" if cfg.adapter else "base model",
        },
        "methods": methods,
        "notes": notes,  # methods left out, and why (the report adds what its rows need said)
    }
    with open(out_dir / "predictions.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in predictions)
    grid = []
    if "ours" in runs and ev.grid_samples and patch_grid:
        first = next(iter(_make_loader(ds, processor, cfg, ev.grid_samples)))
        grid = overlay_samples(runs["ours"], processor, first, ev.grid_samples)
    results["files"] = write_report(results, out_dir, grid)
    results["table"] = Path(results["files"]["table"]).read_text()
    return results
