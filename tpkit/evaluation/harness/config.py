"""``--model_args`` of ``--model tpkit`` as a typed dataclass, checked before a model is loaded.

    pretrained=DIR_OR_ID,adapter=EXPORT_DIR,pruning=YAML,method=ours,batch_size=8,dtype=bfloat16,
    attn_implementation=sdpa,pruning.stage2.layer=2

Keys with a dot are pruning overrides (``pruning.<key>``, as ``--set`` takes them), applied to ours'
configuration after the YAML file or the adapter's trained ``pruning.json``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from tpkit.config import ConfigError, from_dict, set_dotted, to_dict
from tpkit.evaluation.methods import METHODS
from tpkit.pruning.config import PruningConfig

__all__ = ["HarnessConfig", "parse_method", "parse_model_args", "read_pruning_yaml"]

# NAME or FAMILY@FRACTION (a budget of the sweep: every sample at that token-layer fraction)
_METHOD = re.compile(r"^(?P<name>[a-z0-9-]+)(@(?P<budget>[0-9.]+))?$")


@dataclass
class HarnessConfig:
    """What ``--model tpkit`` loads and how it prunes, generates and batches."""

    # hub id or save_pretrained dir of any family tpkit prunes (LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision,
    # Qwen2-VL, Qwen2.5-VL, InternVL)
    pretrained: str = "llava-hf/llava-1.5-7b-hf"
    processor: str | None = None  # processor dir or hub id; None: the model's (or the adapter's)
    revision: str | None = None
    adapter: str | None = (
        None  # a tpkit export (train.py's out_dir/export): LoRA merged in, its pruning is ours
    )
    pruning: str | None = None  # YAML: a pruning config, or any tpkit config with a `pruning:` section
    # dense | ours | ours-s1 | prumerge-iqr | random | topk-cls | fastv (matched to ours' per-sample
    # counts over the requests, as evaluate.py matches them) | FAMILY@F (every sample at token-layer
    # fraction F; families: ours, random, topk-cls, fastv)
    method: str = "ours"
    k1: int | None = None  # explicit stage-1 count (patches kept) for every sample, replacing the method's
    k2: int | None = None  # explicit stage-2 count (prompt tokens kept after stage 2) for every sample
    fastv_layer: int = 2  # FastV's K
    sweep_stage1_factor: float = 1.5  # FAMILY@F: stage 1 keeps factor * F of the prompt, stage 2 the rest
    batch_size: int = 1  # requests per forward; ragged kept counts in one batch
    max_length: int = 4096  # longest prompt (image tokens included); longer requests fail, naming the doc
    max_new_tokens: int = 1024  # when a task's generation_kwargs set none
    # video files: at most max_frames frames, evenly spaced over the video (lmms-eval's read_video
    # sampling; its llava_onevision and qwen2_5_vl models default to 32), and at most video_fps per second
    max_frames: int = 32
    video_fps: float | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    device: str = "auto"  # auto: cuda (cuda:LOCAL_RANK under accelerate/torchrun) when available, else cpu
    progress: bool = True

    def validate(self) -> None:
        parse_method(self.method)
        if min(self.batch_size, self.max_new_tokens, self.max_length, self.max_frames) < 1:
            raise ValueError("batch_size, max_length, max_new_tokens and max_frames must be >= 1")
        if self.video_fps is not None and self.video_fps <= 0:
            raise ValueError(f"video_fps = {self.video_fps} must be > 0 (or unset)")
        for name in ("k1", "k2"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} = {getattr(self, name)} must be >= 1")
        if self.sweep_stage1_factor <= 0:
            raise ValueError(f"sweep_stage1_factor = {self.sweep_stage1_factor} must be > 0")


def parse_method(method: str) -> tuple[str, float | None]:
    """``"fastv"`` -> ("fastv", None); ``"ours@0.22"`` -> ("ours", 0.22); ValueError naming the choices."""
    m = _METHOD.match(method.strip())
    name = m.group("name") if m else method
    if m is None or name not in METHODS:
        raise ValueError(f"method = {method!r}: known methods are {', '.join(METHODS)} (or FAMILY@FRACTION)")
    if m.group("budget") is None:
        return name, None
    budget = float(m.group("budget"))
    sweepable = [k for k, v in METHODS.items() if v.sweep]
    if name not in sweepable or not 0.0 < budget <= 1.0:
        raise ValueError(
            f"method = {method!r}: a budget is FAMILY@F with F in (0, 1] and FAMILY one of {', '.join(sweepable)}"
        )
    return name, budget


def read_pruning_yaml(path: str | Path) -> dict[str, Any]:
    """The pruning section of a YAML file: the file itself, or its ``pruning:`` key (eval/train configs)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"pruning = {str(p)!r}: no such file")
    try:
        data = yaml.safe_load(p.read_bytes().decode("utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text (byte {e.start})") from None
    except yaml.YAMLError as e:  # a python tag (!!python/...) is refused here too: safe_load builds none
        first = str(e).strip().splitlines()
        raise ConfigError(f"{p}: not a plain YAML config ({' '.join(first[:2])})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping")
    section = data.get("pruning", data)
    from_dict(PruningConfig, section, source=str(p))  # fail here, naming the file, on unknown keys
    return section


def parse_model_args(args: dict[str, Any]) -> tuple[HarnessConfig, list[tuple[str, Any]]]:
    """(HarnessConfig, [(pruning key, value)]) from ``--model_args`` as lmms-eval parsed them.

    lmms-eval also passes its own ``batch_size``/``device``/``max_batch_size`` (None when unset); a
    ``batch_size`` of "auto" is not supported (tpkit batches ragged prompts itself).
    """
    plain: dict[str, Any] = {}
    overrides: list[tuple[str, Any]] = []
    for key, value in args.items():
        if value is None or key == "max_batch_size":
            continue
        if key.startswith("pruning."):
            overrides.append((key[len("pruning.") :], value))
        else:  # an unknown key is from_dict's error, with its did-you-mean
            plain[key] = (
                str(value) if key in ("pretrained", "processor", "adapter", "pruning", "method") else value
            )
    batch = plain.get("batch_size")
    if isinstance(batch, str):  # lmms-eval's --batch_size is a string ("8", "auto")
        if not batch.isdigit():
            raise ConfigError(
                f"batch_size = {batch!r}: --model tpkit takes an integer (it batches ragged prompts itself)"
            )
        plain["batch_size"] = int(batch)
    return from_dict(HarnessConfig, plain, source="--model_args"), overrides


def apply_pruning_overrides(cfg: PruningConfig, overrides: list[tuple[str, Any]]) -> PruningConfig:
    """``cfg`` with ``pruning.<key>=value`` overrides applied and checked (unknown keys name themselves)."""
    if not overrides:
        return cfg
    data = to_dict(cfg)
    for key, value in overrides:
        try:
            set_dotted(data, key, value, create=False)
        except KeyError:
            raise ConfigError(
                f"--model_args: pruning.{key} is not a pruning key (e.g. pruning.stage2.layer)"
            ) from None
    return from_dict(PruningConfig, data, source="--model_args pruning.*")
