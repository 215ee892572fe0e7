"""Export a trained run: a PEFT adapter dir that stock ``PeftModel.from_pretrained`` loads.

Layout of an export directory::

    adapter_config.json, adapter_model.safetensors   PEFT LoRA (+ projector when trained)
    pruning.json                                     the PruningConfig the student was trained with
    tpkit_export.json                                the base (below), lora/distill, metrics
    processor files                                  tokenizer, image processor, chat template
    README.md                                        model card (metadata block, loss, metrics)
    merged/                                          (--merged) full merged model, save_pretrained

An export is written into a temporary directory beside ``out_dir`` and renamed into place once
whole: a run killed while exporting leaves the previous export (or none), never half of one.

The base is recorded so that an export travels: ``adapter_config.json`` names the hub id when the
base came from the hub, else its absolute path on the machine that trained (so ``AutoPeftModel``
works from any directory there); ``tpkit_export.json`` keeps the model section as written, the hub
id or the local path (``base.local_path``: this machine only) and a fingerprint of the base's config
and weights, which ``load_exported`` checks on whatever base it is given elsewhere.

``tpkit.models.load_exported(dir)`` rebuilds base + adapter + pruner in one call; ``tpkit export``
writes an export from any checkpoint of a run::

    tpkit export --ckpt runs/tiny/last.ckpt --out runs/tiny/export [--merged]
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from tpkit.config import to_dict
from tpkit.models.checks import model_fingerprint
from tpkit.models.core.attach import detach_pruner, unwrap
from tpkit.models.loading import (
    ADAPTER_CONFIG,
    EXPORT_META,
    PRUNING_JSON,
    load_base_model,
    load_processor,
    load_processor_for,
    resolve_dtype,
)
from tpkit.models.registry import family_of
from tpkit.training.config import TrainConfig, load_train_config
from tpkit.training.lora import apply_lora, lora_targets
from tpkit.training.rundir import EXPORT_FILES, check_tensors, load_checkpoint

__all__ = ["export_adapter", "export_checkpoint"]


def _base_record(cfg: Any, base: Any) -> dict[str, Any]:
    """Where the base came from (hub id, or a local directory of this machine, or a tiny recipe)
    and its fingerprint."""
    src = cfg.model.source
    local = str(Path(cfg.model.path).expanduser().resolve()) if src.kind == "local" else None
    return {
        "source": src.kind,
        "hub_id": cfg.model.path if src.kind == "hub" else None,
        "revision": cfg.model.revision,
        "name": Path(cfg.model.path).name if local else cfg.model.path,
        "local_path": local,  # meaningful on the machine that trained only
        "class": type(unwrap(base)).__name__,  # the stock class (the model card's loading example)
        "family": family_of(base).name,
        "fingerprint": model_fingerprint(base),
    }


def _loss_formula(d: dict[str, Any]) -> str:
    kind = {"forward_kl": "KL(teacher || student)", "reverse_kl": "KL(student || teacher)", "jsd": "JSD"}
    terms = [f"{d['ce_weight']:g} * CE(answer tokens)"]
    if d["alpha"] > 0:
        terms.append(
            f"{d['alpha']:g} * T^2 * {kind.get(d['kind'], d['kind'])} on answer logits (T = {d['temperature']:g})"
        )
    if d.get("hidden_weight", 0) > 0:
        terms.append(
            f"{d['hidden_weight']:g} * (1 - cos) of the final hidden states at the kept text positions"
        )
    teacher = " The teacher's logits came from a precomputed teacher cache." if d.get("teacher_cache") else ""
    return "loss = " + " + ".join(terms) + "." + teacher


def _card(meta: dict) -> ModelCard:
    b = meta["base"]
    metrics = meta.get("metrics") or {}
    rows = "\n".join(f"| {k} | {v:.4g} |" for k, v in sorted(metrics.items())) or "| (none) | |"
    p = meta["pruning"]
    s1, s2 = p.get("stage1", {}), p.get("stage2", {})
    lora = meta["lora"]
    cls = b["class"]
    if b["hub_id"]:
        base = f"[`{b['hub_id']}`](https://huggingface.co/{b['hub_id']})"
        load = f'base = {cls}.from_pretrained("{b["hub_id"]}")'
    else:
        base = (
            f"`{b['name']}` ({'a random tiny model' if b['source'] == 'tiny' else 'a local model directory'})"
        )
        load = f"base = {cls}.from_pretrained(PATH_OF_THE_BASE)"
    data = ModelCardData(
        library_name="peft",
        base_model=b["hub_id"],
        tags=["tpkit", "lora", "token-pruning", b["family"]],
        pipeline_tag="image-text-to-text",
    )
    body = f"""# tpkit LoRA adapter (token-pruned student)

Base model: {base}, fingerprint `{b["fingerprint"]["config_sha256"][:16]}` (config) - LoRA r={lora["r"]},
alpha={lora["alpha"]}, targets `{lora["target_modules"]}`, projector trained: {lora["train_projector"]}.

Trained by tpkit with the two-stage token pruner in the forward path and distillation from the
unpruned base (adapter off): {_loss_formula(meta["distill"])}

Pruning (`pruning.json`): stage 1 {"on" if s1.get("enabled") else "off"} (score {s1.get("score")},
selector {s1.get("selector")}), stage 2 {"on" if s2.get("enabled") else "off"} (layer {s2.get("layer")},
selector {s2.get("selector")}).

## Metrics of the run

| metric | value |
|---|---|
{rows}

## Use

```python
from tpkit.models import load_exported
model, processor = load_exported("path/to/this/export")  # base + adapter + pruner attached
# the base somewhere else than where it was trained: load_exported(..., base="path/or/hub-id")

# or with stock peft only (no pruning):
from peft import PeftModel
from transformers import {cls}
{load}
model = PeftModel.from_pretrained(base, "path/to/this/export")
```
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def export_adapter(
    peft_model: Any,
    cfg: Any,
    out_dir: str | Path,
    *,
    processor: Any = None,
    metrics: dict[str, float] | None = None,
    merged: bool = False,
) -> Path:
    """Write the export directory for ``peft_model`` trained with TrainConfig ``cfg`` (atomically:
    the module docstring). An ``out_dir`` that holds something else than an export is refused."""
    out = Path(out_dir)
    _check_replaceable(out)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")  # tpkit.training.rundir.remove_stale_tmp's pattern
    old = out.with_name(f".{out.name}.old.tmp{os.getpid()}")
    for d in (tmp, old):
        shutil.rmtree(d, ignore_errors=True)
    try:
        _write(peft_model, cfg, tmp, processor, metrics, merged)
        missing = [name for name in EXPORT_FILES if not (tmp / name).is_file()]
        if missing:  # EXPORT_FILES names what an export holds: the two must agree
            raise RuntimeError(f"the export in {tmp} lacks {missing}")
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
    finally:
        for d in (tmp, old):
            shutil.rmtree(d, ignore_errors=True)
    return out


def _check_replaceable(out: Path) -> None:
    """FileExistsError when ``out`` holds files and is not an export (whole or cut short): replacing
    it would delete them."""
    if not out.exists():
        return
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else [out.name]
    if out.is_dir() and (not entries or set(entries) & {*EXPORT_FILES}):
        return
    raise FileExistsError(
        f"{out} exists and is not a tpkit export ({len(entries)} entries, e.g. {entries[0]!r}): exporting "
        "there would replace it; choose a new or empty directory"
    )


def _write(
    peft_model: Any, cfg: Any, out: Path, processor: Any, metrics: dict[str, float] | None, merged: bool
) -> None:
    out.mkdir(parents=True)
    peft_model.save_pretrained(str(out))
    if processor is not None:
        processor.save_pretrained(str(out))
    base = _base_record(cfg, peft_model.get_base_model())
    adapter_cfg = json.loads((out / ADAPTER_CONFIG).read_text())
    # stock AutoPeftModel loads the base from here: the hub id, or this machine's absolute path
    adapter_cfg["base_model_name_or_path"] = base["hub_id"] or base["local_path"]
    (out / ADAPTER_CONFIG).write_text(json.dumps(adapter_cfg, indent=2, sort_keys=True) + "\n")
    meta = {
        "format": "tpkit-export-2",
        "model": to_dict(cfg.model),  # as the run's config wrote it
        "base": base,
        "pruning": to_dict(cfg.pruning),
        "lora": {**to_dict(cfg.lora), "target_modules": lora_targets(cfg.lora, family_of(peft_model))},
        "distill": to_dict(cfg.distill),
        "metrics": {k: float(v) for k, v in (metrics or {}).items()},
        "has_processor": processor is not None,
    }
    (out / PRUNING_JSON).write_text(json.dumps(meta["pruning"], indent=2) + "\n")
    (out / EXPORT_META).write_text(json.dumps(meta, indent=2) + "\n")
    _card(meta).save(out / "README.md")
    if merged:
        _write_merged(peft_model, out / "merged", processor)


def _write_merged(peft_model: Any, out: Path, processor: Any) -> None:
    """Full model with LoRA folded in (stock class, no pruner); ``peft_model`` is left unchanged."""
    m = copy.deepcopy(peft_model)
    detach_pruner(m.get_base_model())  # a no-op when none is attached
    merged = m.merge_and_unload()
    merged.save_pretrained(str(out))
    if processor is not None:
        processor.save_pretrained(str(out))


def export_checkpoint(
    ckpt: str | Path,
    out_dir: str | Path,
    *,
    config: str | Path | TrainConfig | None = None,
    merged: bool = False,
    metrics: dict[str, float] | None = None,
) -> Path:
    """Rebuild the student from the run's config (``config``: a path or a TrainConfig; default: the
    ``config.yaml`` beside the checkpoint), load the checkpoint's trainable tensors, export.
    ``metrics``: the run's final metrics for the model card (default: the checkpoint's step).

    The checkpoint is read first, tensors and plain containers only (``weights_only``), and checked:
    a crafted or damaged file is refused before any model work and runs nothing.
    """
    ckpt = Path(ckpt)
    if not ckpt.is_file():
        raise FileNotFoundError(f"no checkpoint at {ckpt}")
    state = load_checkpoint(ckpt)
    if isinstance(config, TrainConfig):
        cfg, config = config, "the run's config"
    else:
        config = Path(config) if config else ckpt.parent / "config.yaml"
        cfg = load_train_config(config)
    run_processor = ckpt.parent / "processor"  # saved by the run
    processor = (
        load_processor(str(run_processor)) if run_processor.is_dir() else load_processor_for(cfg.model)
    )
    base = load_base_model(cfg.model, dtype=resolve_dtype(cfg.model.dtype, "cpu"), processor=processor)
    peft_model = apply_lora(base, cfg.lora)
    sd = {k.removeprefix("model."): v for k, v in state["state_dict"].items()}
    trainable = {n: tuple(p.shape) for n, p in peft_model.named_parameters() if p.requires_grad}
    check_tensors({"state_dict": sd}, trainable, ckpt)  # names and shapes: export it with the run's config
    peft_model.load_state_dict(sd, strict=False)
    metrics = metrics if metrics is not None else {"global_step": float(state.get("global_step", 0))}
    return export_adapter(peft_model, cfg, out_dir, processor=processor, metrics=metrics, merged=merged)
