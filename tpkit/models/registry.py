"""The one place families register: every folder ``tpkit/models/<name>/`` with a ``family.py`` that
defines ``FAMILIES`` is found here, so a new family touches nothing outside its folder.

From the families' declarations (:class:`tpkit.models.core.family.Family`) this module answers:
which family handles a model (:func:`family_of`), the config builders of tiny and full-size models
(:func:`config_builder`, :func:`build_tiny`), and the named full-size shapes that ``--random-init``
builds (:func:`architectures`, :func:`architecture_kwargs`, :func:`build_random_init`).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn

from tpkit.models.core.attach import unwrap
from tpkit.models.core.family import Family

__all__ = [
    "FAMILY_MODULE",
    "architecture_kwargs",
    "architectures",
    "build_random_init",
    "build_tiny",
    "config_builder",
    "families",
    "family_modules",
    "family_of",
]

FAMILY_MODULE = "family"  # tpkit/models/<name>/family.py defines FAMILIES
CORE = "core"  # tpkit/models/core/family.py is the seam itself (the Family base class)


def family_modules() -> list[str]:
    """The family modules on disk (``tpkit.models.<name>.family``), sorted by folder name."""
    root = Path(__file__).parent
    return [
        f"{__package__}.{info.name}.{FAMILY_MODULE}"
        for info in sorted(pkgutil.iter_modules([str(root)]), key=lambda i: i.name)
        if info.ispkg and info.name != CORE and (root / info.name / f"{FAMILY_MODULE}.py").is_file()
    ]


@cache
def families() -> tuple[Family, ...]:
    """Every registered family, in folder order (imported once)."""
    out: list[Family] = []
    for name in family_modules():
        module = importlib.import_module(name)
        declared = getattr(module, "FAMILIES", None)
        if not isinstance(declared, tuple) or not all(isinstance(f, Family) for f in declared):
            raise TypeError(f"{name} must define FAMILIES, a tuple of Family instances")
        out.extend(declared)
    return tuple(out)


def family_of(model: nn.Module) -> Family:
    """The family that handles ``model`` (or the model inside a PEFT wrapper); ValueError if none."""
    inner = unwrap(model)
    for family in families():
        if family.matches(inner):
            return family
    known = ", ".join(c for f in families() for c in f.classes)
    raise ValueError(f"{type(inner).__name__} is not a model family tpkit can prune (supported: {known})")


def _builders() -> dict[str, tuple[Callable[..., Any], str]]:
    out: dict[str, tuple[Callable[..., Any], str]] = {}
    for family in families():
        for key, builder in family.builders.items():
            if key in out:
                raise ValueError(f"config builder {key!r} is declared by two families")
            out[key] = builder
    return out


def config_builder(key: str) -> tuple[Callable[..., Any], type]:
    """(config builder, model class) registered under ``key`` by a family (``"llava"``, ``"qwen2_5_vl"``)."""
    builders = _builders()
    if key not in builders:
        raise ValueError(f"no config builder {key!r}; known: {', '.join(sorted(builders))}")
    build, cls = builders[key]
    return build, getattr(transformers, cls)


def architectures() -> dict[str, dict[str, Any]]:
    """Every named full-size shape (``--random-init`` names): name -> {"builder": key, **keywords}."""
    out: dict[str, dict[str, Any]] = {}
    for family in families():
        for name, kw in family.architectures.items():
            if name in out:
                raise ValueError(f"architecture {name!r} is declared by two families")
            out[name] = kw
    return out


def architecture_kwargs(name: str, scale_down: int = 1) -> dict[str, Any]:
    """Builder key and keywords of a named architecture; ``scale_down`` divides widths (not depths,
    not token counts) so a CPU can run the same code path in seconds."""
    known = architectures()
    if name not in known:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(sorted(known))}")
    if scale_down < 1:
        raise ValueError(f"scale_down = {scale_down} must be >= 1")
    kw = dict(known[name])
    if scale_down > 1:
        for k in (
            "vision_hidden",
            "vision_heads",
            "hidden_size",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "linear_key_heads",  # Qwen3.5's Gated DeltaNet: heads and their width, like attention's
            "linear_value_heads",
            "linear_head_dim",
        ):
            if k in kw:
                kw[k] = max(1, kw[k] // scale_down)
        for k in ("intermediate_size", "vision_intermediate"):
            if k in kw:
                kw[k] = max(8, kw[k] // scale_down)
    return kw


def build_tiny(key: str, *, seed: int = 0, **kwargs: Any) -> nn.Module:
    """A randomly initialised model from the config builder ``key`` (``kwargs`` go to it), eval mode,
    fp32 on the CPU: the tiny models of tests and CPU runs."""
    build, model_class = config_builder(key)
    cfg = build(**kwargs)
    torch.manual_seed(seed)
    return model_class(cfg).eval()


def build_random_init(
    name: str,
    device: str | torch.device = "cuda",
    dtype: str | torch.dtype = "bfloat16",
    attn_implementation: str = "sdpa",
    scale_down: int = 1,
    seed: int = 0,
) -> nn.Module:
    """A model of architecture ``name`` (:func:`architectures`) with random weights, in eval mode.

    Parameters are allocated and initialised on ``device`` in ``dtype`` (default-dtype switch plus a
    ``torch.device`` context), so a 7B model appears in seconds on a GPU instead of minutes of CPU
    init followed by a copy.
    """
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    kw = architecture_kwargs(name, scale_down)
    build_config, model_class = config_builder(kw.pop("builder"))
    cfg = build_config(attn_implementation=attn_implementation, **kw)
    torch.manual_seed(seed)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = model_class(cfg)
    finally:
        torch.set_default_dtype(prev)
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(attn_implementation)
    return model.eval()
