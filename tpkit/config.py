"""Typed configuration: dataclasses filled from commented YAML plus ``--set key.sub=value`` overrides.

Every config in tpkit is a (nested) dataclass. :func:`load_config` reads a YAML file into one,
checking every key and type *before* anything heavy (a model, a dataset) is loaded. Errors are
:class:`ConfigError` (a ``ValueError``) and name the file, the line, the dotted key and the
offending value, e.g.::

    configs/demo.yaml:12: unknown key 'train.lr' (did you mean 'optim.lr'?)

A dataclass may define ``validate(self)`` that raises ``ValueError`` for impossible values
(``min_keep > max_keep``); the loader calls it bottom-up and prefixes the message with the
location of that section.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

# `1e-4` / `5E3`: numbers to everyone, strings to YAML 1.1 (which wants `1.0e-4`)
_YAML11_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")

if TYPE_CHECKING:  # imported lazily (see _hints): tpkit.pruning may import this module
    from tpkit.pruning import PruningConfig

T = TypeVar("T")

__all__ = [
    "ConfigError",
    "load_config",
    "from_dict",
    "to_dict",
    "save_config",
    "apply_overrides",
    "set_dotted",
    "ModelConfig",
    "DataConfig",
    "LoraConfig",
    "DistillConfig",
    "OptimConfig",
    "TrainerConfig",
    "TrainConfig",
]


class ConfigError(ValueError):
    """A configuration problem, with its location (file:line and dotted key) in the message."""


# --------------------------------------------------------------------------------------------
# YAML with line numbers


def _key_lines(text: str) -> dict[str, int]:
    """Dotted key -> 1-based line number of that key in a YAML document."""
    lines: dict[str, int] = {}
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return lines

    def walk(node: yaml.Node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = f"{prefix}{k.value}"
                lines[key] = k.start_mark.line + 1
                walk(v, key + ".")

    if root is not None:
        walk(root, "")
    return lines


class _Where:
    """Formats error locations: ``file:line: key``."""

    def __init__(self, source: str | None, lines: dict[str, int] | None = None):
        self.source = source
        self.lines = lines or {}

    def __call__(self, key: str) -> str:
        parts = []
        if self.source:
            line = self.lines.get(key)
            parts.append(f"{self.source}:{line}" if line else self.source)
        return (": ".join(parts) + ": ") if parts else ""


# --------------------------------------------------------------------------------------------
# dict -> dataclass with type checks


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _is_union(tp: Any) -> bool:
    return get_origin(tp) is Union or isinstance(tp, types.UnionType)


def _coerce(value: Any, tp: Any, key: str, where: _Where) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widen to floats)."""
    if tp is Any:
        return value
    if _is_union(tp):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, where)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"{where(key)}'{key}' = {value!r} is not a {_type_name(tp)}")
    origin = get_origin(tp)
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where(key)}'{key}' = {value!r} is not one of {list(choices)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where(key)}'{key}' = {value!r} must be a list")
        (item_tp, *_) = get_args(tp) or (Any,)
        items = [_coerce(v, item_tp, f"{key}[{i}]", where) for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where(key)}'{key}' = {value!r} must be a mapping")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where(key)}'{key}' must be a mapping of {tp.__name__} fields, got {value!r}")
        return _from_dict(tp, value, key + ".", where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where(key)}'{key}' = {value!r} must be true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where(key)}'{key}' = {value!r} must be an integer")
        return value
    if tp is float:
        if isinstance(value, str) and _YAML11_EXPONENT.fullmatch(value.strip()):
            return float(value)  # `1e-4`: YAML 1.1 reads a string (no dot), every user means a number
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where(key)}'{key}' = {value!r} must be a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where(key)}'{key}' = {value!r} must be a string")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{where(key)}'{key}' = {value!r} must be a {tp.__name__}")
    return value


def _hints(cls: type) -> dict[str, Any]:
    """Resolved annotations of ``cls``; names imported lazily (``PruningConfig``) are bound on demand."""
    try:
        return typing.get_type_hints(cls)
    except NameError:
        from tpkit.pruning import PruningConfig

        globals()["PruningConfig"] = PruningConfig
        return typing.get_type_hints(cls)


def _from_dict(cls: type[T], data: dict, prefix: str, where: _Where) -> T:
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for k in data:
        if k not in fields:
            close = difflib.get_close_matches(str(k), list(fields), n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f" (known: {', '.join(fields)})"
            raise ConfigError(f"{where(prefix + str(k))}unknown key '{prefix}{k}'{hint}")
    kwargs = {k: _coerce(v, hints[k], prefix + k, where) for k, v in data.items()}
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ConfigError:
            raise
        except ValueError as e:
            section = prefix.rstrip(".") or cls.__name__
            raise ConfigError(f"{where(prefix.rstrip('.'))}invalid '{section}': {e}") from None
    return obj


def from_dict(cls: type[T], data: dict | None, source: str | None = None) -> T:
    """Build dataclass ``cls`` from a plain dict, checking keys, types and ``validate()``."""
    return _from_dict(cls, data or {}, "", _Where(source))


def to_dict(cfg: Any) -> Any:
    """Dataclass (nested) -> plain dict, suitable for YAML/JSON."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def apply_overrides(data: dict, overrides: list[str] | None) -> dict:
    """Apply ``key.sub=value`` strings (values parsed as YAML) to a nested dict, in place."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key.sub=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"--set {item!r}: empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: value is not valid YAML ({e})") from None
        try:
            set_dotted(data, key, value)
        except KeyError as e:
            raise ConfigError(f"--set {item!r}: '{e.args[0]}' is not a section") from None
    return data


def set_dotted(data: dict, key: str, value: Any, create: bool = True) -> None:
    """``data["a"]["b"] = value`` for ``key`` "a.b", in place. Missing sections are created (or, with
    ``create=False``, raise); a part that is not a section raises ``KeyError(part)``."""
    node = data
    parts = key.split(".")
    for p in parts[:-1]:
        nxt = node.get(p)
        if nxt is None and create:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise KeyError(p)
        node = nxt
    node[parts[-1]] = value


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Read YAML ``path`` (optional) into dataclass ``cls``, then apply ``--set`` overrides.

    Raises :class:`ConfigError` naming file, line and key for unknown keys, wrong types and
    values rejected by a section's ``validate()``.
    """
    data: dict = {}
    lines: dict[str, int] = {}
    source = None
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        text = path.read_text()
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping, got {type(loaded).__name__}")
        data = loaded
        lines = _key_lines(text)
    if overrides:
        apply_overrides(data, overrides)
        # an override's location is the command line, not the file
        for item in overrides:
            lines.pop(item.split("=", 1)[0].strip(), None)
        source = f"{source} (with --set)" if source else "--set"
    return _from_dict(cls, data, "", _Where(source, lines))


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config as YAML (what a run actually used)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path


# --------------------------------------------------------------------------------------------
# The typed sections shared by train.py and evaluate.py
#
# Defaults give a working CPU run on the tiny fixture; real-model recipes live in configs/*.yaml.

_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class ModelConfig:
    """Which base LLaVA to load and how."""

    # local save_pretrained dir or hub id; "tiny" / "tiny:<llama|mistral|qwen2>" = random tiny model
    # built from ``tiny`` kwargs (tests, benchmarks)
    path: str = "assets/tiny-llava"
    # processor dir or hub id; None = ``path`` (a "tiny" model has no processor: set it or data.processor)
    processor_path: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    revision: str | None = None
    tiny: dict[str, Any] = field(default_factory=dict)  # kwargs of tpkit.models.tiny.build_tiny_llava
    seed: int = 0  # init seed of a "tiny" model

    def validate(self) -> None:
        if not self.path:
            raise ValueError("path must not be empty")
        if self.path.startswith("tiny:"):
            backbone = self.path.split(":", 1)[1]
            if backbone not in ("llama", "mistral", "qwen2"):
                raise ValueError(f"path {self.path!r}: tiny backbone must be llama, mistral or qwen2")


@dataclass
class DataConfig:
    """LLaVA conversation-JSON data (tpkit.data)."""

    train_json: str | None = None
    val_json: str | None = None
    test_json: str | None = None
    image_folder: str | None = None  # None = the json's directory
    on_error: Literal["raise", "skip"] = "raise"  # unreadable image / malformed / over-long record
    check_images: Literal["open", "decode", "exists", "none"] = "open"  # at load time (exists: large sets)
    max_length: int = 512
    batch_size: int = 4  # per device
    eval_batch_size: int = 8
    num_workers: int = 0
    # write the synthetic benchmark into the json paths' directory when they do not exist, and again
    # when written earlier with another size, seed or generator (tpkit.data.synthetic.ensure_split)
    generate_synthetic: bool = False
    synthetic_n_train: int = 512
    synthetic_n_val: int = 64
    synthetic_seed: int = 0

    def validate(self) -> None:
        if self.max_length < 8:
            raise ValueError(f"max_length = {self.max_length} is too small (>= 8)")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError("batch_size and eval_batch_size must be >= 1")
        if self.num_workers < 0:
            raise ValueError(f"num_workers = {self.num_workers} must be >= 0")


# language-model linear layers only: a plain name list would also hit the CLIP tower (DESIGN pitfalls)
DEFAULT_LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


@dataclass
class LoraConfig:
    """PEFT LoRA on the language model; the projector optionally trained in full."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    # a regex (peft full-match on module names) or a list of names; must not hit the vision tower
    target_modules: str | list[str] = DEFAULT_LORA_TARGETS
    train_projector: bool = False  # multi_modal_projector via peft modules_to_save (saved in the adapter)
    init_seed: int = 0

    def validate(self) -> None:
        if self.r < 1:
            raise ValueError(f"r = {self.r} must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout = {self.dropout} must be in [0, 1)")
        if isinstance(self.target_modules, str):
            import re

            try:
                re.compile(self.target_modules)
            except re.error as e:
                raise ValueError(f"target_modules is not a valid regex: {e}") from None


@dataclass
class DistillConfig:
    """loss = ce_weight * CE(answer tokens) + alpha * T^2 * D(teacher, student) on answer logits
    (+ hidden_weight * (1 - cos) on the final hidden states of the kept text positions)."""

    alpha: float = 1.0  # 0 (and hidden_weight 0) = plain pruned LoRA fine-tuning (no teacher run)
    temperature: float = 1.0
    kind: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"  # forward = KL(teacher || student)
    jsd_beta: float = 0.5  # JSD mixture weight
    ce_weight: float = 1.0
    # directory written by `python -m tpkit.training.teacher_cache`: the teacher's answer logits are
    # read from it instead of running the teacher each step; null = online teacher
    teacher_cache: str | None = None
    # + hidden_weight * (1 - cos) between the student's and the teacher's final-normed hidden states
    # at every text position the student kept (instruction and answers): the teacher's state after
    # reading the whole image, where its answer logits are nearly one-hot. Online teacher only.
    hidden_weight: float = 0.0

    @property
    def needs_teacher(self) -> bool:
        return self.alpha > 0 or self.hidden_weight > 0

    def validate(self) -> None:
        if self.alpha < 0 or self.ce_weight < 0 or self.hidden_weight < 0:
            raise ValueError("alpha, ce_weight and hidden_weight must be >= 0")
        if self.alpha == 0 and self.ce_weight == 0 and self.hidden_weight == 0:
            raise ValueError("alpha, ce_weight and hidden_weight are all 0: nothing to train")
        if self.hidden_weight > 0 and self.teacher_cache:
            raise ValueError(
                "hidden_weight > 0 needs the online teacher: the teacher cache holds answer logits only "
                "(set teacher_cache: null)"
            )
        if self.temperature <= 0:
            raise ValueError(f"temperature = {self.temperature} must be > 0")
        if not 0.0 < self.jsd_beta < 1.0:
            raise ValueError(f"jsd_beta = {self.jsd_beta} must be in (0, 1)")


@dataclass
class OptimConfig:
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # final lr = lr * min_lr_ratio (cosine / linear)
    grad_clip: float | None = 1.0

    def validate(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr = {self.lr} must be > 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas = {self.betas} must be two numbers in [0, 1)")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps = {self.warmup_steps} must be >= 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio = {self.min_lr_ratio} must be in [0, 1]")


@dataclass
class TrainerConfig:
    """Lightning Trainer, checkpointing and logging."""

    out_dir: str = "runs/tiny"
    seed: int = 0
    max_steps: int = 100  # optimizer steps
    max_epochs: int = -1  # -1: bounded by max_steps only
    accelerator: Literal["auto", "cpu", "gpu", "cuda"] = "auto"
    devices: int | str = "auto"
    num_nodes: int = 1
    strategy: Literal["auto", "ddp", "fsdp", "deepspeed"] = "auto"
    deepspeed_stage: int = 2
    precision: Literal["auto", "32", "32-true", "bf16-mixed", "bf16-true", "16-mixed"] = (
        "auto"  # auto: bf16-mixed on GPU, 32 on CPU
    )
    accumulate_grad_batches: int = 1
    gradient_checkpointing: bool = False
    checkpoint_every_n_steps: int = 50  # last.ckpt (atomic); 0 = only at the end
    val_every_n_steps: int = 0  # 0 = no validation
    limit_val_batches: int | float = 1.0
    log_every_n_steps: int = 10
    logger: Literal["csv", "tensorboard", "none"] = "csv"
    progress_bar: bool = True
    deterministic: bool = False
    export_at_end: bool = True  # write out_dir/export (adapter + pruning config + processor + card)

    def validate(self) -> None:
        if self.max_steps < 1:
            raise ValueError(f"max_steps = {self.max_steps} must be >= 1")
        if self.num_nodes < 1 or self.accumulate_grad_batches < 1:
            raise ValueError("num_nodes and accumulate_grad_batches must be >= 1")
        if (
            isinstance(self.devices, str)
            and self.devices != "auto"
            and not self.devices.replace(",", "").isdigit()
        ):
            raise ValueError(f"devices = {self.devices!r} must be an integer, 'auto' or a list like '0,1'")
        if self.deepspeed_stage not in (1, 2, 3):
            raise ValueError(f"deepspeed_stage = {self.deepspeed_stage} must be 1, 2 or 3")
        if self.checkpoint_every_n_steps < 0 or self.val_every_n_steps < 0:
            raise ValueError("checkpoint_every_n_steps and val_every_n_steps must be >= 0")


def _default_pruning() -> PruningConfig:
    from tpkit.pruning import PruningConfig

    return PruningConfig()


@dataclass
class TrainConfig:
    """Everything ``train.py`` reads: one YAML file, sections below."""

    model: ModelConfig = field(default_factory=ModelConfig)
    pruning: PruningConfig = field(default_factory=_default_pruning)
    lora: LoraConfig = field(default_factory=LoraConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)

    def validate(self) -> None:
        if self.data.train_json is None:
            raise ValueError("data.train_json is required for training")
        if self.trainer.val_every_n_steps and self.data.val_json is None:
            raise ValueError("trainer.val_every_n_steps > 0 needs data.val_json")
        s1 = getattr(self.pruning, "stage1", None)
        lo, hi = getattr(s1, "min_keep", None), getattr(s1, "max_keep", None)
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"pruning.stage1.min_keep = {lo} > pruning.stage1.max_keep = {hi}")
