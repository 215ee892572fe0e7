"""The ``model`` config section and the one parser of ``model.path`` (torch-free: configs are checked
before anything heavy is imported)."""

from __future__ import annotations

import functools
import os
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tpkit.config import path_field, resolve_path

__all__ = [
    "ModelConfig",
    "ModelSource",
    "ModelSourceError",
    "TINY_BACKBONES",
    "TINY_BUILDER",
    "hub_unreachable",
    "offline_hub_id",
    "parse_model_path",
    "resolve_model_path",
]

TINY_BUILDER = "llava"  # ``path: tiny`` is a tiny LLaVA-1.5 (the offline processor's layout)
TINY_BACKBONES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class ModelSource:
    """What a ``model.path`` names: a random tiny model, a local directory or a hub id."""

    kind: Literal["tiny", "local", "hub"]
    name: str  # tiny: the LM backbone; local: the directory; hub: the id

    @property
    def is_tiny(self) -> bool:
        return self.kind == "tiny"

    def missing(self) -> str | None:
        """Why this source cannot be loaded, when it is a local directory that is not there, or a hub
        id that is not in the hub cache while the hub is out of reach (one check: seconds, not the
        loader's minutes of retries); else None."""
        if self.kind == "hub":
            return None if _in_hub_cache(self.name) else offline_hub_id(self.name)
        p = Path(self.name).expanduser()
        if self.kind != "local" or p.exists():
            return None
        where = "" if p.is_absolute() else f" (relative to the current directory {os.getcwd()})"
        return (
            f"{self.name!r}: no such directory{where}; a model is a save_pretrained directory, or a hub id, "
            "which looks like 'org/name'"
        )


class ModelSourceError(ValueError):
    """A model or processor that cannot be loaded from what names it (the message says why and what
    to do instead)."""


@functools.cache
def hub_unreachable(endpoint: str | None = None) -> str | None:
    """Why the model hub (``HF_ENDPOINT``, default https://huggingface.co) cannot be reached, else
    None: one HEAD request with a 5 s timeout, once per process. Without it, a hub id on a machine
    with no network waits through huggingface_hub's retries (minutes) before it fails."""
    from huggingface_hub import constants

    endpoint = endpoint or constants.ENDPOINT
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=5).close()
    except urllib.error.HTTPError:
        return None  # it answered
    except (urllib.error.URLError, OSError) as e:  # refused, no DNS, timeout
        return f"{endpoint}: {getattr(e, 'reason', e)}"
    return None


def _in_hub_cache(repo_id: str) -> bool:
    """Whether the hub cache holds a snapshot of ``repo_id`` (what ``local_files_only`` can load)."""
    from huggingface_hub import constants

    snapshots = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    return snapshots.is_dir() and any(snapshots.iterdir())


def offline_hub_id(repo_id: str) -> str | None:
    """The error for hub id ``repo_id`` when ``HF_HUB_OFFLINE`` is set or the hub cannot be reached
    (then only the hub cache can answer), else None."""
    from huggingface_hub import constants

    if not (why := constants.HF_HUB_OFFLINE or hub_unreachable()):
        return None
    here = os.path.join(os.getcwd(), repo_id)
    offline = "HF_HUB_OFFLINE is set" if why is True else f"the hub cannot be reached ({why})"
    return (
        f"{repo_id!r}: not a directory here ({here}) and not in the hub cache, and {offline}. Give a "
        "save_pretrained directory (a relative path is relative to the current directory; in a config "
        "file, to the file's directory), or load it once where the hub can be reached"
    )


def parse_model_path(path: str, base: str | os.PathLike | None = None) -> ModelSource:
    """``tiny`` / ``tiny:<backbone>`` -> a random tiny model; else a local directory or a hub id.

    Local: a path starting with ``.``, ``/`` or ``~``, one without ``/`` or with more than one (a hub
    id is ``org/name``), one that exists, or one whose first component is an existing directory
    (``assets/tiny-llava`` in a checkout); ``base``: the directory a relative path is relative to
    (default: the current one). Any other ``org/name`` is a hub id.
    """
    source = str(path)
    if source == "tiny" or source.startswith("tiny:"):
        backbone = source.split(":", 1)[1] if ":" in source else "llama"
        if backbone not in TINY_BACKBONES:
            raise ValueError(f"path {source!r}: tiny backbone must be one of {', '.join(TINY_BACKBONES)}")
        return ModelSource("tiny", backbone)
    p = Path(base or ".") / Path(source).expanduser()  # an absolute path stays itself
    looks_local = source.startswith((".", "/", "~")) or source.count("/") != 1
    local = looks_local or p.exists() or p.parent.is_dir()
    return ModelSource("local" if local else "hub", source)


def resolve_model_path(value: str, base: Path) -> str:
    """A model path written in a config: a local directory made absolute against ``base`` (the config
    file's directory); a hub id or ``tiny`` as written."""
    return resolve_path(value, base) if parse_model_path(value, base).kind == "local" else value


@dataclass
class ModelConfig:
    """Which base model to load and how."""

    # local save_pretrained dir or hub id; "tiny" / "tiny:<llama|mistral|qwen2>" = random tiny model
    # built from ``tiny`` kwargs (tests, benchmarks)
    path: str = path_field("assets/tiny-llava", resolve_model_path)
    # processor dir or hub id; None = ``path`` (a "tiny" model gets the offline processor of
    # tpkit.data.processor, whose vocabulary and image size it then matches)
    processor_path: str | None = path_field(None, resolve_model_path)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    revision: str | None = None
    tiny: dict[str, Any] = field(default_factory=dict)  # kwargs of the tiny LLaVA's config builder
    seed: int = 0  # init seed of a "tiny" model

    @property
    def source(self) -> ModelSource:
        return parse_model_path(self.path)

    def validate(self) -> None:
        if not self.path:
            raise ValueError("path must not be empty")
        parse_model_path(self.path)

    def missing_paths(self) -> str | None:
        """The error for a ``path`` / ``processor_path`` that cannot load: a missing local directory,
        or a hub id the hub cache lacks while the hub is out of reach (:meth:`ModelSource.missing`)."""
        items = (("model.path", self.source), ("model.processor_path", None))
        if self.processor_path:
            items = (items[0], ("model.processor_path", parse_model_path(self.processor_path)))
        for key, src in items:
            if src is not None and (why := src.missing()):
                return (
                    f"{key} = {why}; 'tiny' builds a random tiny model, and assets/README.md says how the "
                    "embedded assets/tiny-llava is built"
                )
        return None
