"""Export a trained run: a PEFT adapter dir that stock ``PeftModel.from_pretrained`` loads.

Layout of an export directory::

    adapter_config.json, adapter_model.safetensors   PEFT LoRA (+ projector when trained)
    pruning.json                                     the PruningConfig the student was trained with
    tpkit_export.json                                base model (ModelConfig), lora/distill, metrics
    processor files                                  tokenizer, image processor, chat template
    README.md                                        model card with the run's metrics
    merged/                                          (--merged) full merged model, save_pretrained

``tpkit.models.load_exported(dir)`` rebuilds base + adapter + pruner in one call; ``tpkit export``
writes an export from any checkpoint of a run::

    tpkit export --ckpt runs/tiny/last.ckpt --out runs/tiny/export [--merged]
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from tpkit.config import to_dict
from tpkit.models.core.attach import detach_pruner
from tpkit.models.loading import (
    EXPORT_META,
    PRUNING_JSON,
    load_base_model,
    load_processor,
    load_processor_for,
    resolve_dtype,
)
from tpkit.training.checkpoint import CheckpointError, load_checkpoint
from tpkit.training.config import load_train_config
from tpkit.training.lora import apply_lora

__all__ = ["export_adapter", "export_checkpoint"]


def _base_path(path: str) -> str:
    """Local dirs are recorded absolute, so an export loads from any working directory."""
    p = Path(path)
    return str(p.resolve()) if p.exists() else path


def _card(meta: dict, out: Path) -> str:
    m = meta["model"]
    metrics = meta.get("metrics") or {}
    rows = "\n".join(f"| {k} | {v:.4g} |" for k, v in sorted(metrics.items())) or "| (none) | |"
    p = meta["pruning"]
    s1, s2 = p.get("stage1", {}), p.get("stage2", {})
    return f"""# tpkit LoRA adapter (token-pruned student)

Base model: `{m["path"]}` · LoRA r={meta["lora"]["r"]}, alpha={meta["lora"]["alpha"]},
targets `{meta["lora"]["target_modules"]}` · projector trained: {meta["lora"]["train_projector"]}

Trained by tpkit with the two-stage token pruner in the forward path and distillation from the
unpruned base (adapter off): loss = {meta["distill"]["ce_weight"]} * CE(answers) +
{meta["distill"]["alpha"]} * T^2 * {meta["distill"]["kind"]} (T = {meta["distill"]["temperature"]}).

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
model, processor = load_exported("{out}")   # base + adapter + pruner attached

# or with stock peft only (no pruning):
from peft import PeftModel
model = PeftModel.from_pretrained(base_model, "{out}")
```
"""


def export_adapter(
    peft_model: Any,
    cfg: Any,
    out_dir: str | Path,
    *,
    processor: Any = None,
    metrics: dict[str, float] | None = None,
    merged: bool = False,
) -> Path:
    """Write the export directory for ``peft_model`` trained with TrainConfig ``cfg``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(out))
    if processor is not None:
        processor.save_pretrained(str(out))
    model_cfg = to_dict(cfg.model)
    model_cfg["path"] = _base_path(cfg.model.path)
    if model_cfg.get("processor_path"):
        model_cfg["processor_path"] = _base_path(model_cfg["processor_path"])
    meta = {
        "format": "tpkit-export-1",
        "model": model_cfg,
        "pruning": to_dict(cfg.pruning),
        "lora": to_dict(cfg.lora),
        "distill": to_dict(cfg.distill),
        "metrics": {k: float(v) for k, v in (metrics or {}).items()},
        "has_processor": processor is not None,
    }
    (out / PRUNING_JSON).write_text(json.dumps(meta["pruning"], indent=2) + "\n")
    (out / EXPORT_META).write_text(json.dumps(meta, indent=2) + "\n")
    (out / "README.md").write_text(_card(meta, out))
    if merged:
        _write_merged(peft_model, out / "merged", processor)
    return out


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
    config: str | Path | None = None,
    merged: bool = False,
) -> Path:
    """Rebuild the student from the run's ``config.yaml``, load the checkpoint's trainable tensors, export.

    The checkpoint is read first, tensors and plain containers only (``weights_only``): a crafted
    file is refused before any model work and runs nothing.
    """
    ckpt = Path(ckpt)
    if not ckpt.is_file():
        raise FileNotFoundError(f"no checkpoint at {ckpt}")
    state = load_checkpoint(ckpt)
    config = Path(config) if config else ckpt.parent / "config.yaml"
    cfg = load_train_config(config)
    run_processor = ckpt.parent / "processor"  # saved by the run
    processor = (
        load_processor(str(run_processor)) if run_processor.is_dir() else load_processor_for(cfg.model)
    )
    base = load_base_model(cfg.model, dtype=resolve_dtype(cfg.model.dtype, "cpu"), processor=processor)
    peft_model = apply_lora(base, cfg.lora)
    sd = {k.removeprefix("model."): v for k, v in state["state_dict"].items()}
    try:
        missing, unexpected = peft_model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shapes: the checkpoint was trained with another lora / model config
        first = str(e).strip().splitlines()[1:2] or [str(e)[:300]]
        raise CheckpointError(
            f"{ckpt}: its tensors do not fit the model {config} describes ({first[0].strip()}): export it "
            "with the config of the run that wrote it (--config)"
        ) from None
    if unexpected:
        raise CheckpointError(f"{ckpt}: tensors that {config} does not make, e.g. {unexpected[:3]}")
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    lacking = trainable - set(sd)
    if lacking:
        raise CheckpointError(f"{ckpt}: lacks trainable tensors of {config}, e.g. {sorted(lacking)[0]}")
    metrics = {"global_step": float(state.get("global_step", 0))}
    return export_adapter(peft_model, cfg, out_dir, processor=processor, metrics=metrics, merged=merged)
