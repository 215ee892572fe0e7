"""``TrainConfig``: everything ``tpkit train`` reads, one YAML file (torch-free: checked before any
heavy import)."""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from tpkit.config import load_config, path_field
from tpkit.data.config import DataConfig
from tpkit.models.config import ModelConfig
from tpkit.pruning.config import PruningConfig

__all__ = [
    "LoraConfig",
    "DistillConfig",
    "OptimConfig",
    "TrainerConfig",
    "TrainConfig",
    "load_train_config",
]

_FLOAT32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max (this module is torch-free)


@dataclass
class LoraConfig:
    """PEFT LoRA on the language model; the projector optionally trained in full."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    # a regex (peft full-match on module names) or a list of names; must not hit the vision tower (a plain
    # name list would). null: the model family's default, every linear layer of the language model
    # (r'.*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)')
    target_modules: str | list[str] | None = None
    # the projector trained in full via peft modules_to_save (saved in the adapter): the family's
    # projector modules (LLaVA's multi_modal_projector, Qwen's visual.merger)
    train_projector: bool = False
    init_seed: int = 0

    def validate(self) -> None:
        if self.r < 1:
            raise ValueError(f"r = {self.r} must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout = {self.dropout} must be in [0, 1)")
        if isinstance(self.target_modules, str):
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
    # directory written by `tpkit teacher-cache`: the teacher's answer logits are read from it
    # instead of running the teacher each step; null = online teacher
    teacher_cache: str | None = path_field()
    # + hidden_weight * (1 - cos) between the student's and the teacher's final-normed hidden states
    # at every text position the student kept (instruction and answers): the teacher's state after
    # reading the whole image, where its answer logits are nearly one-hot. Online teacher only.
    hidden_weight: float = 0.0

    @property
    def needs_teacher(self) -> bool:
        return self.alpha > 0 or self.hidden_weight > 0

    def validate(self) -> None:
        # non-finite values are refused by the loader (tpkit.config), for every float key
        if self.alpha < 0 or self.ce_weight < 0 or self.hidden_weight < 0:
            raise ValueError("alpha, ce_weight and hidden_weight must be >= 0")
        if self.alpha == 0 and self.ce_weight == 0 and self.hidden_weight == 0:
            raise ValueError("alpha, ce_weight and hidden_weight are all 0: nothing to train")
        if self.hidden_weight > 0 and self.teacher_cache:
            raise ValueError(
                f"hidden_weight = {self.hidden_weight:g} needs the online teacher: the teacher cache holds "
                "answer logits only (--set distill.hidden_weight=0 to use the cache, or "
                "distill.teacher_cache=null for the online teacher)"
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
        # AdamW's first update is lr / (1 - beta1) per unit of normalised gradient, computed in float32
        first = self.lr / (1 - self.betas[0])
        if first >= _FLOAT32_MAX:
            raise ValueError(
                f"lr = {self.lr:g} is too large: AdamW's first step, lr / (1 - betas[0]) = {first:.3g}, "
                f"overflows float32 (max {_FLOAT32_MAX:.3g}); fine-tuning rates are about 1e-5 to 1e-3"
            )
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps = {self.warmup_steps} must be >= 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio = {self.min_lr_ratio} must be in [0, 1]")


@dataclass
class TrainerConfig:
    """Lightning Trainer, checkpointing and logging."""

    out_dir: str = path_field("runs/tiny")
    seed: int = 0
    max_steps: int = 100  # optimizer steps
    max_epochs: int = -1  # -1: bounded by max_steps only
    accelerator: Literal["auto", "cpu", "gpu", "cuda"] = "auto"
    devices: int | str = "auto"
    num_nodes: int = 1
    # auto | ddp | fsdp (FSDP2: one shard unit per decoder layer and vision block, GPUs or CPU
    # processes; sharded like ZeRO-3). deepspeed is refused: its checkpoints are DeepSpeed directories,
    # which tpkit can neither resume nor export, and it could not be run here
    strategy: Literal["auto", "ddp", "fsdp", "deepspeed"] = "auto"
    precision: Literal["auto", "32", "32-true", "bf16-mixed", "bf16-true", "16-mixed"] = (
        "auto"  # auto: bf16-mixed on GPU, 32 on CPU
    )
    accumulate_grad_batches: int = 1
    gradient_checkpointing: bool = False
    checkpoint_every_n_steps: int = 50  # last.ckpt (atomic); 0 = only at the end
    val_every_n_steps: int = 0  # 0 = no validation
    limit_val_batches: int | float = 1.0
    log_every_n_steps: int = 10
    # metrics to out_dir: csv (logs/), tensorboard (tb/; pip install tensorboard), wandb (pip install
    # wandb; project "tpkit"), mlflow (mlruns/; pip install mlflow), none
    logger: Literal["csv", "tensorboard", "wandb", "mlflow", "none"] = "csv"
    # the csv/tensorboard log version (logs/version_N); null: a new run takes the next free one, a
    # resumed run continues its own
    log_version: int | None = None
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
        if isinstance(self.devices, int) and not (self.devices >= 1 or self.devices == -1):
            raise ValueError(
                f"devices = {self.devices} must be >= 1 (processes per node), -1 (every device) or 'auto'"
            )
        if self.strategy == "fsdp" and self.precision == "16-mixed":
            raise ValueError(
                "precision = '16-mixed' does not run with strategy = fsdp (FSDP2 takes 32-true, bf16-mixed or "
                "bf16-true): use precision: bf16-mixed"
            )
        if self.strategy == "deepspeed":
            raise ValueError(
                "strategy = deepspeed is not supported: a DeepSpeed run writes its checkpoints as DeepSpeed "
                "directories, which tpkit can neither resume nor export. Use strategy: fsdp (FSDP2 shards "
                "parameters, gradients and optimizer state like ZeRO-3; its checkpoints resume and export) or ddp"
            )
        if self.checkpoint_every_n_steps < 0 or self.val_every_n_steps < 0:
            raise ValueError("checkpoint_every_n_steps and val_every_n_steps must be >= 0")
        if self.log_version is not None and self.log_version < 0:
            raise ValueError(f"log_version = {self.log_version} must be >= 0 (or null)")
        if why := logger_missing(self.logger):
            raise ValueError(why)


# logger -> the packages Lightning's logger needs (any one of them)
LOGGER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "mlflow": ("mlflow",)}


def logger_missing(logger: str) -> str | None:
    """Why ``logger`` cannot run here (its package is not installed), else None."""
    packages = LOGGER_PACKAGES.get(logger, ())
    if not packages or any(importlib.util.find_spec(p) is not None for p in packages):
        return None
    return (
        f"logger = {logger!r} needs the {packages[0]} package, which is not installed: pip install "
        f"{packages[0]}"
        + (" (or pip install tpkit[tensorboard])" if logger == "tensorboard" else "")
        + ", or choose logger: csv"
    )


@dataclass
class TrainConfig:
    """Everything ``tpkit train`` reads: one YAML file, sections below."""

    model: ModelConfig = field(default_factory=ModelConfig)
    pruning: PruningConfig = field(default_factory=PruningConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)

    def missing_inputs(self) -> str | None:
        """Why this run cannot start (a model, data or teacher-cache path that is not there), else
        None: checked by the command line before any heavy import."""
        if why := self.model.missing_paths():
            return why
        for key in ("train_json", "val_json"):
            path = getattr(self.data, key)
            if path is not None and not Path(path).is_file():
                return (
                    f"data.{key} = {path!r}: no such file (the synthetic benchmark's splits: `tpkit data "
                    "synthetic --out <dir>` writes <dir>/train.json and val.json)"
                )
        cache = self.distill.teacher_cache
        if cache and self.distill.alpha > 0 and not Path(cache).is_dir():
            return (
                f"distill.teacher_cache = {cache!r}: no such directory (`tpkit teacher-cache --config ... "
                f"--out {cache}` writes it; null: the online teacher)"
            )
        return None

    def validate(self) -> None:
        if self.data.train_json is None:
            raise ValueError("data.train_json is required for training")
        if self.trainer.val_every_n_steps and self.data.val_json is None:
            raise ValueError("trainer.val_every_n_steps > 0 needs data.val_json")
        s1 = self.pruning.stage1
        if s1.max_keep is not None and s1.min_keep > s1.max_keep:
            raise ValueError(
                f"pruning.stage1.min_keep = {s1.min_keep} > pruning.stage1.max_keep = {s1.max_keep}"
            )


def load_train_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """Load and validate; every problem is a ConfigError naming file, line and key."""
    return load_config(TrainConfig, path, overrides)
