"""``EvalConfig``: everything ``tpkit evaluate`` reads (one YAML file + ``--set`` overrides).

The model and data sections are the shared :class:`tpkit.models.config.ModelConfig` /
:class:`tpkit.data.config.DataConfig` (``data.test_json`` is the evaluation set); ``pruning`` is the
configuration of ``ours`` (other methods are derived from it, see :mod:`tpkit.evaluation.methods`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tpkit.config import ConfigError, from_dict, load_config, path_field, set_dotted, to_dict
from tpkit.data.config import DataConfig
from tpkit.evaluation.methods import METHODS
from tpkit.models.config import ModelConfig
from tpkit.pruning.config import PruningConfig

__all__ = [
    "EvalConfig",
    "EvalSection",
    "SpeedConfig",
    "RandomInitConfig",
    "load_eval_config",
    "variant_pruning",
]

SWEEP_FAMILIES = [m.name for m in METHODS.values() if m.sweep]


@dataclass
class EvalSection:
    """What to compare and how to generate answers."""

    methods: list[str] = field(default_factory=lambda: list(METHODS))
    # token-layer fractions of the budget sweep (curves); [] = no sweep
    budgets: list[float] = field(default_factory=lambda: [0.11, 0.22, 0.33, 0.5])
    sweep_methods: list[str] = field(default_factory=lambda: ["ours", "random", "fastv"])
    # the sweep gives stage 1 a budget of factor * fraction (of the dense prompt), stage 2 the rest
    sweep_stage1_factor: float = 1.5
    fastv_layer: int = 2  # FastV's K (its paper: K=2)
    max_new_tokens: int = 8
    limit: int | None = None  # evaluate the first N samples only
    grid_samples: int = 8  # kept-patch overlays of the first N samples
    progress: bool = True
    # more rows of ours with some pruning settings changed, in the same run (one dense run for all):
    # {name: {pruning key: value}}, e.g. {"stage 1 curvature": {"stage1.selector": "curvature"}};
    # reported as "ours[name]", not timed
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)

    def validate(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; known: {list(METHODS)}")
        if not self.methods:
            raise ValueError("methods is empty")
        bad = [m for m in self.sweep_methods if m not in SWEEP_FAMILIES]
        if bad:
            raise ValueError(f"unknown sweep method(s) {bad}; known: {list(SWEEP_FAMILIES)}")
        for b in self.budgets:
            if not 0.0 < b <= 1.0:
                raise ValueError(f"budget {b} must be a token-layer fraction in (0, 1]")
        if self.sweep_stage1_factor < 1.0:
            raise ValueError(f"sweep_stage1_factor = {self.sweep_stage1_factor} must be >= 1")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens = {self.max_new_tokens} must be >= 1")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit = {self.limit} must be >= 1 (or null)")
        for name, changes in self.variants.items():
            if not isinstance(name, str) or not name.strip() or any(c in name for c in "[]@|"):
                raise ValueError(f"variants: name {name!r} must be a non-empty string without [ ] @ |")
            if not isinstance(changes, dict):
                raise ValueError(
                    f"variants[{name!r}] = {changes!r} must be a mapping of pruning keys to values"
                )


def variant_pruning(ours: PruningConfig, name: str, changes: dict[str, Any]) -> PruningConfig:
    """``ours`` with ``changes`` ({"stage1.selector": "curvature", ...}) applied, checked like a config
    file (unknown keys, wrong types and impossible values name ``eval.variants[name]`` and the key)."""
    data = to_dict(ours)
    for key, value in changes.items():
        try:
            set_dotted(data, str(key), value, create=False)
        except KeyError:
            raise ConfigError(
                f"eval.variants[{name!r}]: {key!r} is not a pruning key (e.g. stage1.selector)"
            ) from None
    return from_dict(PruningConfig, data, source=f"eval.variants[{name!r}]")


@dataclass
class SpeedConfig:
    """Prefill / first-token / decode timing of each method on one batch of the dataset. Null
    defaults depend on the device: batch 8, 2 warm-up and 5 timed rounds on a GPU; batch 1, 1 and 3
    on a CPU, on 1 thread (steadier on a busy machine)."""

    enabled: bool = True
    batch_size: int | None = None  # null: 8 on GPU, 1 on CPU
    warmup: int | None = None  # untimed rounds first; null: 2 on GPU, 1 on CPU
    repeats: int | None = None  # timed rounds (median and p90 over them); null: 5 on GPU, 3 on CPU
    decode_tokens: int = (
        16  # decode tok/s = batch * decode_tokens / (time from the 1st to the last new token)
    )
    sweep: bool = True  # also time the budget-sweep runs (prefill only)
    generation: bool = True  # time to first token and decode tok/s (main methods)
    threads: int | None = None  # torch CPU threads while timing; null: 1 on CPU; 0: torch's default
    # time dense and ours compiled alike with this torch.compile mode (reduce-overhead: CUDA graphs, for
    # batch-1 latency; set pruning.bucket too, e.g. 16, so that the pruned lengths take a few values)
    compile: Literal["none", "default", "reduce-overhead", "max-autotune"] = "none"

    def validate(self) -> None:
        if (
            (self.batch_size is not None and self.batch_size < 1)
            or (self.repeats is not None and self.repeats < 1)
            or (self.warmup is not None and self.warmup < 0)
            or self.decode_tokens < 1
            or (self.threads is not None and self.threads < 0)
        ):
            raise ValueError("batch_size, repeats, decode_tokens must be >= 1, warmup and threads >= 0")

    def resolved(self, device_type: str) -> SpeedConfig:
        """A copy with the null defaults filled in for ``device_type`` ("cuda" or "cpu")."""
        gpu = device_type == "cuda"
        defaults = (
            {"batch_size": 8, "warmup": 2, "repeats": 5}
            if gpu
            else {"batch_size": 1, "warmup": 1, "repeats": 3}
        )
        if not gpu:
            defaults["threads"] = 1
        return dataclasses.replace(self, **{k: v for k, v in defaults.items() if getattr(self, k) is None})


@dataclass
class RandomInitConfig:
    """Speed-only runs on a full-size architecture with random weights (``--random-init NAME``)."""

    name: str | None = None  # e.g. llava-1.5-7b (`tpkit evaluate --help` lists them)
    scale_down: int = 1  # divide widths, not depths nor token counts (a CPU runs the same code path)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    # ours runs with fixed counts (random weights have no meaningful CLS): stage 1 keeps
    # eval.sweep_stage1_factor * budget of the dense prompt, stage 2 brings the fraction to budget
    budget: float = 0.22
    text_before: int = 35  # bos + system prompt tokens before the image
    text_after: int = 29  # instruction tokens after the image (LLaVA-1.5-7B: 35 + 576 + 29 = 640)

    def validate(self) -> None:
        if not 0.0 < self.budget <= 1.0:
            raise ValueError(f"budget = {self.budget} must be in (0, 1]")
        if self.scale_down < 1:
            raise ValueError(f"scale_down = {self.scale_down} must be >= 1")
        if self.text_before < 1 or self.text_after < 1:
            raise ValueError("text_before and text_after must be >= 1")


@dataclass
class EvalConfig:
    """One evaluation run: a model, a dataset, the methods to compare, speed and report settings."""

    model: ModelConfig = field(default_factory=ModelConfig)
    # exported adapter dir (tpkit train's out_dir/export): ours runs with its trained pruning.json
    # (this config's pruning section is not used then), `--set pruning.KEY=VALUE` changes keys of it
    # (recorded in results.json); its base is checked against model.path before any evaluation
    adapter: str | None = path_field()
    pruning: PruningConfig = field(default_factory=PruningConfig)  # ours
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalSection = field(default_factory=EvalSection)
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    random_init: RandomInitConfig = field(default_factory=RandomInitConfig)
    out_dir: str = path_field("runs/eval")
    device: str = "auto"  # auto: cuda when available, else cpu
    seed: int = 0

    def missing_inputs(self) -> str | None:
        """Why this run cannot start (a model, adapter or dataset path that is not there), else None:
        checked by the command line before any heavy import."""
        if self.random_init.name is not None:
            return None
        if self.adapter is not None and not Path(self.adapter).is_dir():
            return f"adapter = {self.adapter!r}: no such directory"
        if not Path(self.data.test_json).is_file():
            return (
                f"data.test_json = {self.data.test_json!r}: no such file (the synthetic benchmark's test "
                "split: `tpkit data synthetic --out <dir>`, or the demo, writes <dir>/test.json)"
            )
        return self.model.missing_paths()

    def validate(self) -> None:
        if self.random_init.name is None and self.data.test_json is None:
            raise ValueError("data.test_json is required (or random_init.name for a speed-only run)")
        s2 = self.pruning.stage2
        needs_ours = any(METHODS[m].needs_ours for m in self.eval.methods) or self.eval.budgets
        if needs_ours and not self.pruning.stage1.enabled:
            raise ValueError("matched baselines and the budget sweep need pruning.stage1.enabled (ours)")
        if self.eval.budgets and "ours" in self.eval.sweep_methods and not s2.enabled:
            raise ValueError("the budget sweep of 'ours' needs pruning.stage2.enabled")
        for name, changes in self.eval.variants.items():
            try:
                variant_pruning(self.pruning, name, changes)
            except ConfigError as e:
                raise ValueError(str(e)) from None


def load_eval_config(path: str | Path | None = None, overrides: list[str] | None = None) -> EvalConfig:
    """:func:`tpkit.config.load_config` for :class:`EvalConfig` (errors name file, line and key)."""
    return load_config(EvalConfig, path, overrides)
