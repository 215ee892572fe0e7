"""Load a LLaVA-style model and its processor from a local directory or a hub id."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device | None = None) -> torch.dtype:
    """ "auto" -> bf16 on CUDA, fp32 elsewhere; names -> torch dtypes."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        dev = torch.device(device) if device is not None else None
        cuda = (dev is not None and dev.type == "cuda") or (dev is None and torch.cuda.is_available())
        return torch.bfloat16 if cuda else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} must be one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def missing_local_dir(path: str | Path) -> str | None:
    """Why ``path`` cannot be loaded, when it can only mean a local directory and none is there; else None.

    A path starting with ``.``, ``/`` or ``~``, one without ``/``, or one whose first component is an
    existing directory (``assets/tiny-llava`` in a checkout) is local; any other ``org/name`` may be a
    hub id, which ``from_pretrained`` resolves (or fails to, with its own message).
    """
    source = str(path)
    p = Path(source).expanduser()
    looks_local = source.startswith((".", "/", "~")) or "/" not in source or Path(p.parts[0]).is_dir()
    if p.exists() or not looks_local:
        return None
    return f"{source!r}: no such directory (expected a save_pretrained directory, or a hub id 'org/name')"


def model_paths_error(path: str, processor_path: str | None = None) -> str | None:
    """The error for a config's ``model.path`` / ``model.processor_path`` that can only be a local
    directory and is missing (see :func:`missing_local_dir`), else None. ``tiny`` and
    ``tiny:<backbone>`` (random tiny models) need no directory."""
    tiny = path == "tiny" or path.startswith("tiny:")
    for key, value in (("model.path", None if tiny else path), ("model.processor_path", processor_path)):
        if value and (why := missing_local_dir(value)):
            return (
                f"{key} = {why}; 'tiny' builds a random tiny model, and assets/README.md says how the "
                "embedded assets/tiny-llava is built"
            )
    return None


def check_llava_config(config: Any, source: str) -> None:
    """ValueError unless ``config`` describes a LLaVA-like model (vision tower + projector + causal LM)."""
    missing = [
        k for k in ("vision_config", "text_config", "image_token_id") if getattr(config, k, None) is None
    ]
    if missing:
        kind = getattr(config, "model_type", type(config).__name__)
        raise ValueError(
            f"{source}: model_type {kind!r} is not LLaVA-like (missing {', '.join(missing)}); "
            "tpkit needs a LlavaForConditionalGeneration-style checkpoint"
        )


def load_llava(
    path: str | Path,
    *,
    dtype: str | torch.dtype | None = "auto",
    attn_implementation: str = "sdpa",
    device: str | torch.device | None = None,
    revision: str | None = None,
    local_files_only: bool | None = None,
):
    """``LlavaForConditionalGeneration.from_pretrained`` (eval mode) with a clear error for other models."""
    from transformers import AutoConfig, LlavaForConditionalGeneration

    source = str(path)
    if why := missing_local_dir(source):
        raise ValueError(why)
    if local_files_only is None:
        local_files_only = Path(source).exists()
    try:
        config = AutoConfig.from_pretrained(source, revision=revision, local_files_only=local_files_only)
    except (OSError, ValueError) as e:
        raise ValueError(f"{source}: cannot read a model config ({e})") from None
    check_llava_config(config, source)
    torch_dtype = resolve_dtype(dtype, device)
    model = LlavaForConditionalGeneration.from_pretrained(
        source,
        dtype=torch_dtype,
        attn_implementation=attn_implementation,
        revision=revision,
        local_files_only=local_files_only,
    )
    if device is not None:
        model = model.to(device)
    return model.eval()


def load_processor(path: str | Path, *, revision: str | None = None, local_files_only: bool | None = None):
    """``AutoProcessor.from_pretrained`` of a local dir or hub id."""
    from transformers import AutoProcessor

    source = str(path)
    if why := missing_local_dir(source):
        raise ValueError(why)
    if local_files_only is None:
        local_files_only = Path(source).exists()
    try:
        return AutoProcessor.from_pretrained(source, revision=revision, local_files_only=local_files_only)
    except (OSError, ValueError) as e:
        raise ValueError(f"{source}: cannot load a processor ({e})") from None


def load_llava_and_processor(path: str | Path, processor_path: str | Path | None = None, **kwargs):
    """(model, processor); ``processor_path`` defaults to ``path``."""
    revision = kwargs.get("revision")
    return load_llava(path, **kwargs), load_processor(processor_path or path, revision=revision)
