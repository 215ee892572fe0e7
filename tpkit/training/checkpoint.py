"""Checkpoint policy: atomic writes, ``last.ckpt`` every N optimizer steps, a save on Ctrl-C/SIGTERM.

What goes into a checkpoint (trainable tensors only, loop/sampler/RNG state) is decided by
:class:`tpkit.training.module.DistillLoRAModule`; this module decides when and how it is written.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info

__all__ = ["AtomicCheckpointIO", "LastCheckpoint", "LAST"]

LAST = "last.ckpt"


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to a temporary file in the same directory, fsync, then ``os.replace``.

    A reader (``--resume`` after kill -9) sees either the previous complete file or the new one.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None
    ) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()


class LastCheckpoint(L.Callback):
    """Writes ``dirpath/last.ckpt`` every ``every_n_steps`` optimizer steps and at the end of fit.

    On Ctrl-C or SIGTERM (Lightning turns it into ``SIGTERMException`` on every rank) it saves
    once more, so an interrupted run loses nothing; kill -9 loses the steps since the last save.
    """

    def __init__(self, dirpath: str | Path, every_n_steps: int) -> None:
        self.dirpath = Path(dirpath)
        self.every_n_steps = every_n_steps
        self._saved_step = -1

    @property
    def path(self) -> Path:
        return self.dirpath / LAST

    def _save(self, trainer: L.Trainer) -> None:
        if trainer.global_step == self._saved_step:
            return
        trainer.save_checkpoint(self.path, weights_only=False)  # the whole state: --resume needs it
        self._saved_step = trainer.global_step

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._saved_step = trainer.global_step  # a resumed run does not rewrite what it loaded

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        dm = getattr(trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "commit"):
            dm.commit()  # the batch is done: move the loader's resume position past it, then save
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0:
            self._save(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        interrupted = isinstance(exception, (KeyboardInterrupt, SIGTERMException))
        # mid-accumulation the loader position and the optimizer state disagree: keep the last save
        if interrupted and trainer.global_step > 0 and trainer.accumulate_grad_batches == 1:
            rank_zero_info(f"interrupted at step {trainer.global_step}: saving {self.path}")
            try:
                self._save(trainer)
            except Exception as e:  # never mask the interrupt
                rank_zero_info(f"could not save on interrupt: {e}")

    def state_dict(self) -> dict[str, Any]:
        return {"every_n_steps": self.every_n_steps}
