"""The training recipe: config -> student, data, trainer -> fit -> checkpoint -> export.

``tpkit train`` (and ``train.py``) only parse arguments and call :func:`fit`. Lifecycle
(torchtune-style): :func:`tpkit.training.config.load_train_config` (all config errors, before
anything heavy), :func:`tpkit.training.runlock.run_lock` (one live run per out_dir, held to the end),
:func:`tpkit.training.rundir.check_run_dir` (no run overwritten or mixed with another, before any
model work), :func:`build_student`, :func:`build_module`, :func:`build_datamodule`,
:func:`build_trainer`, :func:`fit`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from tpkit.config import save_config, to_dict
from tpkit.models.checks import check_pruning_fits
from tpkit.models.core.attach import unwrap
from tpkit.models.families import attach_pruner
from tpkit.models.loading import load_base_model, load_processor_for, resolve_dtype
from tpkit.models.registry import family_of
from tpkit.training.checkpoint import LAST, AtomicCheckpointIO, LastCheckpoint
from tpkit.training.config import TrainConfig
from tpkit.training.console import ContinuedCSVLogger, StepProgressBar, log_version, quiet_dependencies
from tpkit.training.data import LlavaDataModule
from tpkit.training.export import export_adapter, export_checkpoint
from tpkit.training.lora import apply_lora
from tpkit.training.module import DistillLoRAModule, NothingTrainedError
from tpkit.training.rundir import (
    CONFIG,
    EXPORT,
    SKIPPED,
    RunFinished,
    check_run_dir,
    check_tensors,
    data_fingerprint,
    load_checkpoint,
)
from tpkit.training.runlock import run_lock
from tpkit.training.sharding import FullyShardedStrategy
from tpkit.training.teacher_cache.cache import TeacherCache

__all__ = [
    "build_student",
    "build_module",
    "open_teacher_cache",
    "build_datamodule",
    "build_trainer",
    "fit",
    "TrainResult",
]


def _on_gpu(cfg: TrainConfig) -> bool:
    acc = cfg.trainer.accelerator
    return acc in ("gpu", "cuda") or (acc == "auto" and torch.cuda.is_available())


def build_student(
    cfg: TrainConfig, processor: Any = None, base: torch.nn.Module | None = None
) -> tuple[Any, bool]:
    """Base model (or ``base``) -> PeftModel with LoRA on the LM -> pruner on the base model.

    Returns ``(peft_model, pruning_attached)``. PeftModel.forward passes ``answer_mask`` through
    to the base model's (pruned) forward unchanged.
    """
    if base is None:
        device = "cuda" if _on_gpu(cfg) else "cpu"
        base = load_base_model(cfg.model, dtype=resolve_dtype(cfg.model.dtype, device), processor=processor)
    if cfg.pruning.enabled:
        check_pruning_fits(base, cfg.pruning)
    peft_model = apply_lora(base, cfg.lora)
    if cfg.pruning.enabled:
        attach_pruner(peft_model.get_base_model(), cfg.pruning)
    return peft_model, cfg.pruning.enabled


def open_teacher_cache(cfg: TrainConfig) -> TeacherCache | None:
    """The run's teacher cache, its files checked (no model needed), or None (online teacher)."""
    if cfg.distill.teacher_cache and cfg.distill.alpha > 0:
        return TeacherCache(cfg.distill.teacher_cache)
    return None


def build_module(
    cfg: TrainConfig, peft_model: Any, pruning_attached: bool, teacher_cache: TeacherCache | None = None
) -> DistillLoRAModule:
    """The LightningModule; ``teacher_cache``: the cache already opened (default: opened here)."""
    if cfg.trainer.gradient_checkpointing:
        base = peft_model.get_base_model()
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # non-reentrant checkpointing needs no input that requires grad: transformers' hooks that make
        # every input embedding's output require grad (the vision tower's too: the frozen tower would
        # then run a backward, and a checkpointed one a second forward, every step) go
        base.disable_input_require_grads()
    cache = teacher_cache if teacher_cache is not None else open_teacher_cache(cfg)
    if cache is not None:
        cache.check(peft_model, cfg.distill.temperature, cfg.data.max_length)
    return DistillLoRAModule(
        peft_model,
        cfg.distill,
        cfg.optim,
        max_steps=cfg.trainer.max_steps,
        pruning_attached=pruning_attached,
        teacher_cache=cache,
    )


def build_datamodule(cfg: TrainConfig, processor: Any, **kwargs: Any) -> LlavaDataModule:
    kwargs.setdefault("skipped_path", Path(cfg.trainer.out_dir) / SKIPPED)
    return LlavaDataModule(cfg.data, processor, seed=cfg.trainer.seed, **kwargs)


def _strategy(cfg: TrainConfig, model: torch.nn.Module | None = None) -> Any:
    t = cfg.trainer
    if t.strategy == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(find_unused_parameters=False, checkpoint_io=AtomicCheckpointIO())
    if t.strategy == "fsdp":
        if model is None:
            raise ValueError("trainer.strategy = fsdp: the model is needed to choose its FSDP units")
        # FSDP2, one unit per decoder layer and vision block (the family's, from the model's own
        # _no_split_modules): tpkit.training.sharding says why not Lightning's FSDPStrategy
        return FullyShardedStrategy(family_of(model).fsdp_blocks(unwrap(model)))
    return "auto"


def _precision(cfg: TrainConfig) -> str:
    p = cfg.trainer.precision
    if p == "auto":
        return "bf16-mixed" if _on_gpu(cfg) else "32-true"
    return "32-true" if p == "32" else p


def _logger(cfg: TrainConfig, resume_step: int | None) -> Any:
    t = cfg.trainer
    out = Path(t.out_dir)
    resume = resume_step is not None
    if t.logger == "csv":  # logs/version_N; a resumed run continues its own version
        version = log_version(out / "logs", t.log_version, resume)
        return ContinuedCSVLogger(str(out), "logs", version, resume_step if resume else None)
    if t.logger == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        return TensorBoardLogger(str(out), name="tb", version=log_version(out / "tb", t.log_version, resume))
    if t.logger == "wandb":
        from lightning.pytorch.loggers import WandbLogger

        return WandbLogger(project="tpkit", name=out.name, save_dir=str(out))
    if t.logger == "mlflow":
        from lightning.pytorch.loggers import MLFlowLogger

        return MLFlowLogger(
            experiment_name="tpkit", run_name=out.name, tracking_uri=(out / "mlruns").resolve().as_uri()
        )
    return False


def build_trainer(
    cfg: TrainConfig,
    extra_callbacks: list | None = None,
    resume_step: int | None = None,
    model: torch.nn.Module | None = None,
    run_data: dict[str, Any] | None = None,
    **overrides: Any,
) -> L.Trainer:
    """The Lightning Trainer of ``cfg``; ``resume_step``: the step of the checkpoint a resumed run
    starts from (its metrics log continues from there); ``model``: the student (a sharded strategy
    wraps its blocks); ``run_data``: the training data's fingerprint
    (:func:`tpkit.training.rundir.data_fingerprint`), kept in every checkpoint."""
    t = cfg.trainer
    out = Path(t.out_dir)
    callbacks: list = [
        LastCheckpoint(out, t.checkpoint_every_n_steps, run_config=to_dict(cfg), run_data=run_data)
    ]
    if t.progress_bar:
        callbacks.append(StepProgressBar())
    callbacks += extra_callbacks or []
    logger = _logger(cfg, resume_step)
    strategy = _strategy(cfg, model)
    kwargs: dict[str, Any] = dict(
        default_root_dir=str(out),
        max_steps=t.max_steps,
        max_epochs=t.max_epochs,
        accelerator="gpu" if t.accelerator == "cuda" else t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=strategy,
        precision=_precision(cfg),
        accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=cfg.optim.grad_clip,
        log_every_n_steps=t.log_every_n_steps,
        logger=logger,
        callbacks=callbacks,
        enable_checkpointing=False,  # LastCheckpoint is the policy
        enable_progress_bar=t.progress_bar,
        enable_model_summary=False,
        deterministic=t.deterministic,
        use_distributed_sampler=False,  # LlavaDataModule shards by rank with a resumable sampler
        num_sanity_val_steps=0,
        limit_val_batches=t.limit_val_batches if t.val_every_n_steps else 0,
        val_check_interval=t.val_every_n_steps or None,
        check_val_every_n_epoch=None if t.val_every_n_steps else 1,
    )
    if strategy == "auto":
        kwargs["plugins"] = [AtomicCheckpointIO()]
    kwargs.update(overrides)
    return L.Trainer(**kwargs)


@dataclass
class TrainResult:
    out_dir: Path
    checkpoint: Path
    export_dir: Path | None
    metrics: dict[str, float]
    module: DistillLoRAModule | None  # None: a finished run whose export was written, nothing trained

    @property
    def losses(self) -> tuple[float, float, int] | None:
        """(first, last, k): the training loss of the run's first batch and its mean over the last k
        (:meth:`tpkit.training.module.LossWatch.summary`); None when nothing was trained."""
        return self.module.loss_watch.summary() if self.module is not None else None


class _RunFiles(L.Callback):
    """Writes the run's config.yaml and processor once training starts: after a resumed run's
    checkpoint was accepted and restored, never before (a refused resume changes nothing)."""

    def __init__(self, cfg: TrainConfig, processor: Any) -> None:
        self.cfg, self.processor = cfg, processor

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            out = Path(self.cfg.trainer.out_dir)
            save_config(self.cfg, out / CONFIG)
            self.processor.save_pretrained(str(out / "processor"))  # the run's exact processor, for export


def fit(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    processor: Any = None,
    base: torch.nn.Module | None = None,
    datamodule: LlavaDataModule | None = None,
    callbacks: list | None = None,
    trainer_overrides: dict[str, Any] | None = None,
) -> TrainResult:
    """Run the recipe. ``resume`` continues from ``out_dir/last.ckpt`` (refused when it is missing or
    the config or the training data changed what the run computes; a run that had finished gets its
    export written when it lacks one); a new run into an ``out_dir`` that holds one is refused unless
    ``overwrite``; a run that holds ``out_dir`` (:func:`tpkit.training.runlock.run_lock`) refuses
    both. Raises :class:`tpkit.training.checkpoint.TrainingStopped` when a stop was requested
    (Ctrl-C, SIGTERM), after the checkpoint was saved, and
    :class:`tpkit.training.module.NothingTrainedError` when every record was skipped."""
    with run_lock(cfg.trainer.out_dir) as note:
        if note and rank_zero_only.rank == 0:
            print(note, file=sys.stderr)
        return _fit(cfg, resume, overwrite, processor, base, datamodule, callbacks, trainer_overrides)


def _fit(
    cfg: TrainConfig,
    resume: bool,
    overwrite: bool,
    processor: Any,
    base: torch.nn.Module | None,
    datamodule: LlavaDataModule | None,
    callbacks: list | None,
    trainer_overrides: dict[str, Any] | None,
) -> TrainResult:
    out = Path(cfg.trainer.out_dir)
    ckpt = out / LAST
    rank0 = rank_zero_only.rank == 0
    try:
        resume_step = check_run_dir(cfg, resume=resume, overwrite=overwrite, rank0=rank0)
    except RunFinished as e:
        if not e.export_missing:
            raise
        export_dir = None
        if rank0:
            with quiet_dependencies():
                export_dir = export_checkpoint(ckpt, out / EXPORT, config=cfg)
            print(
                f"the run had finished (step {e.step}) without a whole export: wrote {export_dir}",
                file=sys.stderr,
            )
        return TrainResult(out, ckpt, export_dir, {"global_step": float(e.step)}, None)
    data = data_fingerprint({"data.train_json": cfg.data.train_json})
    with quiet_dependencies():
        L.seed_everything(cfg.trainer.seed, workers=True, verbose=False)
        cache = open_teacher_cache(cfg)  # its files checked before any model is loaded
        if processor is None:
            processor = load_processor_for(cfg.model)
        dm = datamodule or build_datamodule(cfg, processor)
        dm.setup("fit")  # every record checked (images opened, lengths) before any weights load
        peft_model, attached = build_student(cfg, processor, base=base)
        module = build_module(cfg, peft_model, attached, teacher_cache=cache)
        if resume:  # every tensor named and shaped as this model's, before Lightning loads them
            expected = {n: tuple(p.shape) for n, p in module.named_parameters() if p.requires_grad}
            check_tensors(load_checkpoint(ckpt, resume=True), expected, ckpt)
        extra = [_RunFiles(cfg, processor), *(callbacks or [])]
        trainer = build_trainer(
            cfg,
            extra_callbacks=extra,
            resume_step=resume_step,
            model=peft_model,
            run_data=data,
            **(trainer_overrides or {}),
        )
        # weights_only: a checkpoint is tensors and plain containers; nothing else is unpickled
        trainer.fit(module, datamodule=dm, ckpt_path=str(ckpt) if resume else None, weights_only=True)
    metrics = {
        k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1
    }
    metrics["global_step"] = float(trainer.global_step)
    if module.records_trained == 0 and not trainer.interrupted:
        skipped = out / SKIPPED
        n = sum(1 for _ in open(skipped)) if skipped.is_file() else getattr(dm, "n_skipped", 0)
        raise NothingTrainedError(
            f"every record the run read was skipped (data.on_error: skip): {n} skipped, each listed in "
            f"{skipped}; nothing was trained and nothing exported. Fix the records, then start the run "
            "again with --overwrite"
        )
    export_dir = None
    if cfg.trainer.export_at_end and trainer.is_global_zero and not trainer.interrupted:
        if isinstance(trainer.strategy, FullyShardedStrategy):
            # each rank holds shards only: the export rebuilds the student from the checkpoint the run
            # wrote at its end, as `tpkit export --ckpt` does
            export_dir = export_checkpoint(ckpt, out / EXPORT, config=cfg, metrics=metrics)
        else:
            export_dir = export_adapter(module.model, cfg, out / EXPORT, processor=processor, metrics=metrics)
    return TrainResult(out, ckpt, export_dir, metrics, module)
