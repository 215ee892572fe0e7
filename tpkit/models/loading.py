"""Load models and processors: a hub id, a local ``save_pretrained`` directory, a random tiny model,
or a tpkit export (base + LoRA adapter + the pruning it was trained with).

Every entry point takes the ``model`` config section (:class:`tpkit.models.config.ModelConfig`) or
plain paths, and fails with an error that names the path and says what was expected.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
from transformers import AutoConfig, AutoProcessor

import tpkit.data.qwen_processor  # noqa: F401  (registers OfflineQwen2VLProcessor with AutoProcessor)
from tpkit.config import ConfigError, from_dict
from tpkit.data.processor import build_processor
from tpkit.models.checks import ARCHITECTURE_KEYS, config_sha256, fingerprint_diff, model_fingerprint
from tpkit.models.config import (
    TINY_BUILDER,
    ModelConfig,
    ModelSourceError,
    hub_unreachable,
    offline_hub_id,
    parse_model_path,
)
from tpkit.models.families import attach_pruner
from tpkit.models.registry import build_tiny, families
from tpkit.models.tiny import tiny_kwargs_from_processor
from tpkit.pruning.config import PruningConfig

__all__ = [
    "ADAPTER_CONFIG",
    "EXPORT_META",
    "PRUNING_JSON",
    "ExportBaseError",
    "resolve_dtype",
    "resolve_device",
    "model_class_for",
    "read_model_config",
    "load_pretrained",
    "load_model",
    "load_processor",
    "load_processor_for",
    "load_base_model",
    "read_export",
    "export_base_config",
    "check_export_base",
    "check_adapter_shapes",
    "load_exported",
]

# the files of a tpkit export that tpkit itself reads (tpkit.training.export writes them)
EXPORT_META = "tpkit_export.json"
PRUNING_JSON = "pruning.json"
ADAPTER_CONFIG = "adapter_config.json"  # peft's
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")  # peft reads either


class ExportBaseError(ValueError):
    """An export and a base model that do not belong together (the message names both)."""


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
    else a ModelSourceError naming the checkpoint, its model type and the supported classes."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    supported = [c for f in families() for c in f.classes]
    kind = getattr(config, "model_type", type(config).__name__)
    names = list(getattr(config, "architectures", None) or [])
    names.append(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.get(kind))
    for name in names:
        if name in supported and hasattr(transformers, name):
            return getattr(transformers, name)
    raise ModelSourceError(
        f"{source}: model_type {kind!r} (architectures {getattr(config, 'architectures', None)}) is not a "
        f"family tpkit prunes; supported: {', '.join(supported)}"
    )


def _files_only(source: str) -> bool:
    """``local_files_only`` for ``from_pretrained(source)``: a local directory; a hub id when
    HF_HUB_OFFLINE is set or the hub cannot be reached (then only the hub cache can answer)."""
    from huggingface_hub import constants

    return parse_model_path(source).kind == "local" or constants.HF_HUB_OFFLINE or bool(hub_unreachable())


def _cannot_load(source: str, what: str, error: Exception) -> ModelSourceError:
    """The error of a failed ``from_pretrained``: for a hub id while the hub is out of reach, that
    and what to do instead of the loader's own message."""
    if parse_model_path(source).kind == "hub" and (why := offline_hub_id(source)):
        return ModelSourceError(why)
    return ModelSourceError(f"{source}: cannot {what} ({error})")


def _auto_pretrained(auto: Any, source: str, revision: str | None, what: str) -> Any:
    """``auto.from_pretrained(source)`` (AutoConfig, AutoProcessor), from local files only where the
    hub cannot answer; ValueError saying why not."""
    if why := parse_model_path(source).missing():
        raise ModelSourceError(why)
    try:
        return auto.from_pretrained(source, revision=revision, local_files_only=_files_only(source))
    except (OSError, ValueError) as e:
        raise _cannot_load(source, what, e) from None


def read_model_config(source: str, revision: str | None = None) -> Any:
    """The transformers config of a local directory or hub id (no weights read); ValueError saying
    why not."""
    return _auto_pretrained(AutoConfig, source, revision, "read a model config")


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
    config = read_model_config(source, revision)
    model = model_class_for(config, source).from_pretrained(
        source,
        dtype=resolve_dtype(dtype, device),
        attn_implementation=attn_implementation,
        revision=revision,
        local_files_only=_files_only(source),
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
    """``AutoProcessor.from_pretrained`` of a local directory or hub id (tpkit's offline processors
    included: importing this module registers :class:`OfflineQwen2VLProcessor` with ``AutoProcessor``)."""
    return _auto_pretrained(AutoProcessor, str(path), revision, "load a processor")


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

    ``path: tiny[:backbone]`` builds a tiny LLaVA (config builder :data:`TINY_BUILDER`); vocabulary and image
    geometry come from ``processor`` when given (``cfg.tiny`` wins). ``dtype`` None: ``cfg.dtype``.
    """
    dtype = dtype or resolve_dtype(cfg.dtype, device)
    src = cfg.source
    if src.is_tiny:
        kw = tiny_kwargs_from_processor(processor) if processor is not None else {}
        kw.update(cfg.tiny)
        kw.update(text_backbone=src.name, attn_implementation=cfg.attn_implementation)
        model = build_tiny(TINY_BUILDER, seed=cfg.seed, **kw)
        model = model.to(dtype)
        return model.to(device) if device is not None else model
    return load_pretrained(
        cfg.path,
        dtype=dtype,
        attn_implementation=cfg.attn_implementation,
        revision=cfg.revision,
        device=device,
    )


def _export_json(path: Path) -> dict[str, Any]:
    """A JSON file of an export, as a mapping; ConfigError naming the file when it is not one."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}): the file is damaged") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level is a {type(data).__name__}, not a mapping")
    return data


def read_export(export_dir: str | Path) -> tuple[dict[str, Any], PruningConfig]:
    """The metadata of a tpkit export and the pruning config it was trained with, checked: a
    missing or damaged file is named before any model is loaded."""
    d = Path(export_dir)
    meta_path = d / EXPORT_META
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"{d} is not a tpkit export (no {EXPORT_META}; train.py writes out_dir/export)"
        )
    meta = _export_json(meta_path)
    for key in ("model", "pruning"):
        if not isinstance(meta.get(key), dict):
            raise ConfigError(f"{meta_path}: '{key}' is missing or not a mapping")
    adapter = d / ADAPTER_CONFIG
    if not adapter.is_file() or not any((d / f).is_file() for f in ADAPTER_WEIGHTS):
        lacks = ADAPTER_CONFIG if not adapter.is_file() else " or ".join(ADAPTER_WEIGHTS)
        raise FileNotFoundError(f"{d}: the export lacks its adapter ({lacks}): export the run again")
    peft_type = _export_json(adapter).get("peft_type")
    if peft_type != "LORA":
        raise ConfigError(f"{adapter}: peft_type = {peft_type!r}; a tpkit export is a LoRA adapter ('LORA')")
    pruning_data = meta["pruning"]
    if (d / PRUNING_JSON).is_file():
        pruning_data = _export_json(d / PRUNING_JSON)
    return meta, from_dict(PruningConfig, pruning_data, source=str(d / PRUNING_JSON))


def _trained_on(meta: dict[str, Any]) -> str:
    b = meta.get("base") or {}
    if b.get("hub_id"):
        return f"the hub model {b['hub_id']!r}"
    if b.get("source") == "tiny":
        return f"the tiny model {b.get('name')!r}"
    where = f" ({b['local_path']} on the machine that trained)" if b.get("local_path") else ""
    return f"the model {b.get('name', meta['model']['path'])!r}{where}"


def export_base_config(export_dir: str | Path, base: str | None = None) -> ModelConfig:
    """The ``model`` section that loads an export's base: ``base`` (a path or hub id) when given,
    else the hub id or this machine's directory it was trained on; ExportBaseError when that is
    not here."""
    d = Path(export_dir)
    meta, _ = read_export(d)
    mcfg = from_dict(ModelConfig, meta["model"], source=str(d / EXPORT_META))
    b = meta.get("base")
    if base is not None:
        mcfg.path = base
    elif b is not None and b["source"] != "tiny":
        mcfg.path = b["hub_id"] or b["local_path"]
        if b["source"] == "local" and not Path(b["local_path"]).exists():
            raise ExportBaseError(
                f"{d} was trained on {_trained_on(meta)}, which is not on this machine: give the base, "
                "load_exported(dir, base='its/path/or/hub-id'), or model.path with evaluate's adapter"
            )
    return mcfg


def check_export_base(export_dir: str | Path, model_or_config: Any) -> list[str]:
    """Compare a base (a loaded model, or a transformers config before the weights are loaded) with
    the one the export was trained on: another architecture is an ExportBaseError naming both; the
    same architecture with other weights returns a warning (list of str, empty: the same base)."""
    d = Path(export_dir)
    meta, _ = read_export(d)
    saved = (meta.get("base") or {}).get("fingerprint")
    if saved is None:  # an export older than fingerprints: check_adapter_shapes still applies
        return []
    if isinstance(model_or_config, nn.Module):
        now = model_fingerprint(model_or_config)
    else:
        now = {"config_sha256": config_sha256(model_or_config)}
    diff = fingerprint_diff({k: saved[k] for k in now}, now, ("trained on", "given"))
    arch = [x for x in diff if x.split(":")[0] in ARCHITECTURE_KEYS]
    if arch:
        raise ExportBaseError(
            f"adapter {d} was trained on {_trained_on(meta)}, and this base is another architecture "
            f"({'; '.join(arch)}): use that base (model.path / base=...)"
        )
    if diff:
        return [
            f"adapter {d} was trained on {_trained_on(meta)}; this base has the same architecture but other "
            f"weights ({'; '.join(diff)}): results may differ from the run's"
        ]
    return []


def check_adapter_shapes(model: nn.Module, export_dir: str | Path) -> None:
    """ExportBaseError, naming a tensor, when the export's adapter weights do not fit ``model``
    (read from the safetensors header only: before any of them is loaded)."""
    from safetensors import safe_open

    d = Path(export_dir)
    f = d / "adapter_model.safetensors"
    if not f.is_file():
        return
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    problems = []
    with safe_open(str(f), framework="pt") as st:
        for key in st.keys():
            shape = tuple(st.get_slice(key).get_shape())
            name = key.removeprefix("base_model.model.")
            if ".lora_A." in name or ".lora_B." in name:
                target = modules.get(name.split(".lora_")[0])
                if not isinstance(target, nn.Linear):
                    problems.append(f"{key}: the base has no linear layer {name.split('.lora_')[0]}")
                elif ".lora_A." in name and shape[1] != target.in_features:
                    problems.append(f"{key}: {shape} for a layer of {target.in_features} inputs")
                elif ".lora_B." in name and shape[0] != target.out_features:
                    problems.append(f"{key}: {shape} for a layer of {target.out_features} outputs")
            elif name in params and tuple(params[name].shape) != shape:
                problems.append(f"{key}: {shape}, the base's is {tuple(params[name].shape)}")
    if problems:
        meta, _ = read_export(d)
        raise ExportBaseError(
            f"adapter {d} does not fit this base ({len(problems)} tensors, e.g. {problems[0]}): it was "
            f"trained on {_trained_on(meta)}"
        )


def load_exported(
    export_dir: str | Path,
    base: Any = None,
    *,
    merge: bool = False,
    attach: bool = True,
    dtype: torch.dtype | None = None,
) -> tuple[nn.Module, Any]:
    """Base model + adapter + pruner (the trained ``pruning.json``) in one call -> (model, processor).

    ``base``: None = the base recorded in the export (its hub id, its directory on the machine
    that trained, or its tiny recipe), a path/hub id, or a loaded model. The base is checked
    against the export's fingerprint first: another architecture is an ExportBaseError, other
    weights a warning. Returns a PeftModel in eval mode (its ``forward`` and ``generate`` prune), or
    with ``merge=True`` the merged stock model with the pruner attached; the processor is the one
    saved in the export (None when it holds none). The pruning config attached is
    ``tpkit.models.pruning_config(model)``.
    """
    from peft import PeftModel  # lazy: peft costs seconds to import, and only exports need it here

    d = Path(export_dir)
    meta, pruning = read_export(d)
    processor = load_processor(str(d)) if meta.get("has_processor") else None
    if base is None or isinstance(base, str):
        mcfg = export_base_config(d, base)
        if not mcfg.source.is_tiny:
            check_export_base(d, read_model_config(mcfg.path, mcfg.revision))
        base = load_base_model(mcfg, dtype=dtype, processor=processor)
    for w in check_export_base(d, base):
        warnings.warn(w, stacklevel=2)
    check_adapter_shapes(base, d)
    model = PeftModel.from_pretrained(base, str(d))
    model.eval()
    if merge:
        model = model.merge_and_unload()
    if attach:
        attach_pruner(model if merge else model.get_base_model(), pruning)
    return model, processor
