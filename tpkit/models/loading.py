"""Load models and processors: a hub id, a local ``save_pretrained`` directory, a random tiny model,
or a tpkit export (base + LoRA adapter + the pruning it was trained with).

Every entry point takes the ``model`` config section (:class:`tpkit.models.config.ModelConfig`) or
plain paths, and fails with an error that names the path and says what was expected.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
from transformers import AutoConfig, AutoProcessor

from tpkit.config import from_dict
from tpkit.data.processor import build_processor
from tpkit.models.config import ModelConfig, parse_model_path
from tpkit.models.families import FAMILIES, attach_pruner
from tpkit.models.tiny import build_tiny_llava, tiny_kwargs_from_processor
from tpkit.pruning.config import PruningConfig

__all__ = [
    "EXPORT_META",
    "PRUNING_JSON",
    "resolve_dtype",
    "resolve_device",
    "model_class_for",
    "load_pretrained",
    "load_model",
    "load_processor",
    "load_processor_for",
    "load_base_model",
    "read_export",
    "load_exported",
]

# the files of a tpkit export that tpkit itself reads (tpkit.training.export writes them)
EXPORT_META = "tpkit_export.json"
PRUNING_JSON = "pruning.json"

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cuda`` without a GPU is an error."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but torch.cuda.is_available() is False")
    return torch.device(name)


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device | None = None) -> torch.dtype:
    """ "auto" -> bf16 on CUDA, fp32 elsewhere (no ``device``: CUDA when available); names -> dtypes."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        dev = torch.device(device) if device is not None else None
        cuda = (dev is not None and dev.type == "cuda") or (dev is None and torch.cuda.is_available())
        return torch.bfloat16 if cuda else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} must be one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def model_class_for(config: Any, source: str) -> type:
    """The ``*ForConditionalGeneration`` class of a checkpoint's config, if tpkit prunes its family;
    else a ValueError naming the checkpoint, its model type and the supported classes."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    supported = [c for f in FAMILIES for c in f.classes]
    kind = getattr(config, "model_type", type(config).__name__)
    names = list(getattr(config, "architectures", None) or [])
    names.append(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.get(kind))
    for name in names:
        if name in supported and hasattr(transformers, name):
            return getattr(transformers, name)
    raise ValueError(
        f"{source}: model_type {kind!r} (architectures {getattr(config, 'architectures', None)}) is not a "
        f"family tpkit prunes; supported: {', '.join(supported)}"
    )


def _local_only(source: str) -> bool:
    return parse_model_path(source).kind == "local"


def load_pretrained(
    path: str | Path,
    *,
    dtype: str | torch.dtype | None = "auto",
    attn_implementation: str = "sdpa",
    device: str | torch.device | None = None,
    revision: str | None = None,
) -> nn.Module:
    """``from_pretrained`` of the checkpoint's own class (any family tpkit prunes; eval mode), with a
    clear error for other models."""
    source = str(path)
    if why := parse_model_path(source).missing():
        raise ValueError(why)
    local = _local_only(source)
    try:
        config = AutoConfig.from_pretrained(source, revision=revision, local_files_only=local)
    except (OSError, ValueError) as e:
        raise ValueError(f"{source}: cannot read a model config ({e})") from None
    model = model_class_for(config, source).from_pretrained(
        source,
        dtype=resolve_dtype(dtype, device),
        attn_implementation=attn_implementation,
        revision=revision,
        local_files_only=local,
    )
    if device is not None:
        model = model.to(device)
    return model.eval()


def load_model(
    path: str | Path,
    processor_path: str | Path | None = None,
    *,
    dtype: str = "auto",
    attn_implementation: str = "sdpa",
    device: str | torch.device | None = None,
    revision: str | None = None,
) -> tuple[nn.Module, Any]:
    """(model, processor) of a hub id, a local directory or ``tiny[:backbone]``; eval mode, no pruner."""
    cfg = ModelConfig(
        path=str(path),
        processor_path=None if processor_path is None else str(processor_path),
        dtype=dtype,
        attn_implementation=attn_implementation,
        revision=revision,
    )
    cfg.validate()
    processor = load_processor_for(cfg)
    return load_base_model(cfg, processor=processor, device=device), processor


def load_processor(path: str | Path, *, revision: str | None = None) -> Any:
    """``AutoProcessor.from_pretrained`` of a local directory or hub id."""
    source = str(path)
    if why := parse_model_path(source).missing():
        raise ValueError(why)
    try:
        return AutoProcessor.from_pretrained(source, revision=revision, local_files_only=_local_only(source))
    except (OSError, ValueError) as e:
        raise ValueError(f"{source}: cannot load a processor ({e})") from None


def load_processor_for(cfg: ModelConfig) -> Any:
    """The processor of a ``model`` section: ``processor_path``, else the model's own; a tiny model
    without one gets the offline processor (:func:`tpkit.data.processor.build_processor`)."""
    if cfg.processor_path:
        return load_processor(cfg.processor_path, revision=cfg.revision)
    if cfg.source.is_tiny:
        return build_processor()
    return load_processor(cfg.path, revision=cfg.revision)


def load_base_model(
    cfg: ModelConfig,
    *,
    dtype: torch.dtype | None = None,
    processor: Any = None,
    device: str | torch.device | None = None,
) -> nn.Module:
    """The stock model of a ``model`` section (eval mode), from a local dir / hub id, or a random tiny one.

    ``path: tiny[:backbone]`` builds :func:`tpkit.models.tiny.build_tiny_llava`; vocabulary and image
    geometry come from ``processor`` when given (``cfg.tiny`` wins). ``dtype`` None: ``cfg.dtype``.
    """
    dtype = dtype or resolve_dtype(cfg.dtype, device)
    src = cfg.source
    if src.is_tiny:
        kw = tiny_kwargs_from_processor(processor) if processor is not None else {}
        kw.update(cfg.tiny)
        model = build_tiny_llava(src.name, seed=cfg.seed, attn_implementation=cfg.attn_implementation, **kw)
        model = model.to(dtype)
        return model.to(device) if device is not None else model
    return load_pretrained(
        cfg.path,
        dtype=dtype,
        attn_implementation=cfg.attn_implementation,
        revision=cfg.revision,
        device=device,
    )


def read_export(export_dir: str | Path) -> tuple[dict[str, Any], PruningConfig]:
    """The metadata of a tpkit export and the pruning config it was trained with (checked)."""
    d = Path(export_dir)
    meta_path = d / EXPORT_META
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"{d} is not a tpkit export (no {EXPORT_META}; train.py writes out_dir/export)"
        )
    meta = json.loads(meta_path.read_text())
    pruning_data = meta["pruning"]
    if (d / PRUNING_JSON).is_file():
        pruning_data = json.loads((d / PRUNING_JSON).read_text())
    return meta, from_dict(PruningConfig, pruning_data, source=str(d / PRUNING_JSON))


def load_exported(
    export_dir: str | Path,
    base: Any = None,
    *,
    merge: bool = False,
    attach: bool = True,
    dtype: torch.dtype | None = None,
) -> tuple[nn.Module, Any]:
    """Base model + adapter + pruner (the trained ``pruning.json``) in one call -> (model, processor).

    ``base``: None = the base recorded in the export (path or tiny recipe), a path/hub id, or a loaded
    model. Returns a PeftModel in eval mode (its ``forward`` and ``generate`` prune), or with
    ``merge=True`` the merged stock model with the pruner attached; the processor is the one saved
    in the export (None when it holds none).
    """
    from peft import PeftModel  # lazy: peft costs seconds to import, and only exports need it here

    d = Path(export_dir)
    meta, pruning = read_export(d)
    processor = load_processor(str(d)) if meta.get("has_processor") else None
    if base is None or isinstance(base, str):
        mcfg = from_dict(ModelConfig, meta["model"], source=str(d / EXPORT_META))
        if isinstance(base, str):
            mcfg.path = base
        base = load_base_model(mcfg, dtype=dtype, processor=processor)
    model = PeftModel.from_pretrained(base, str(d))
    model.eval()
    if merge:
        model = model.merge_and_unload()
    if attach:
        attach_pruner(model if merge else model.get_base_model(), pruning)
    return model, processor
