"""Checkpoint policy: atomic writes, ``last.ckpt`` every N optimizer steps, a save when a stop is requested.

What goes into a checkpoint (trainable tensors only, loop/sampler/RNG state) is decided by
:class:`tpkit.training.module.DistillLoRAModule`; this module decides when and how it is written
(:func:`tpkit.training.rundir.load_checkpoint` reads it back, tensors and plain containers only).

Stopping (Ctrl-C, SIGTERM): the first signal on any rank only sets a flag; every rank looks at all
ranks' flags at the next step boundary, and all of them stop there together, after one checkpoint.
Lightning's own SIGTERM handler calls a collective inside the handler, which hangs a DDP run when
the signal reaches one rank only: ours replaces it for the training loop. A second signal aborts at
once, keeping the last checkpoint.

A rank that dies outright (SIGKILL, the OOM killer) cannot say anything, and Lightning's process
observer in rank 0 kills every other rank within seconds, SIGKILL included, before rank 0 may see
the error of its next collective: :class:`PeerExitNotice` has rank 0 print how to resume first.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from tpkit.data.errors import LlavaDataError

__all__ = ["AtomicCheckpointIO", "LastCheckpoint", "PeerExitNotice", "TrainingStopped", "LAST"]

LAST = "last.ckpt"  # tpkit.training.rundir.RUN_FILES names it too


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to a temporary file in the same directory, fsync, then ``os.replace``.

    A reader (``--resume`` after kill -9) sees either the previous complete file or the new one; the
    temporary file a killed writer leaves (``.last.ckpt.tmp<PID>``) is removed when the next run
    starts there (:func:`tpkit.training.rundir.remove_stale_tmp`).
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


# the thread Lightning's subprocess launcher starts in rank 0 to watch the ranks it launched
OBSERVER_THREAD = "child-process-observer"


class PeerExitNotice(L.Callback):
    """Rank 0 prints ``message()`` (what to do next: where the checkpoint is, how to resume) when a
    rank it launched exits with an error, before Lightning's observer kills the run.

    That observer polls the launched ranks every few seconds and, when one failed, SIGKILLs them
    all and rank 0 itself: no ``except`` or ``finally`` runs, so without this notice the run ends
    silently whenever the observer wins the race against rank 0's failing collective (a busy
    machine, a collective that hangs instead of failing). A launcher without that observer (one
    process, torchrun, SLURM) leaves nothing to wrap.
    """

    def __init__(self, message: Callable[[], str]) -> None:
        self.message = message
        self.threads: set[threading.Thread] = set()  # the observer threads wrapped

    @property
    def wrapped(self) -> int:
        return len(self.threads)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not trainer.is_global_zero:
            return
        for thread in threading.enumerate():
            terminate = getattr(thread, "_terminate_all", None)
            if thread.name == OBSERVER_THREAD and callable(terminate) and thread not in self.threads:
                thread._terminate_all = self._announcing(terminate)  # type: ignore[attr-defined]
                self.threads.add(thread)

    def _announcing(self, terminate: Callable[[], None]) -> Callable[[], None]:
        def terminate_all() -> None:
            try:
                msg = f"a training process ended with an error: stopping every rank.{self.message()}"
                print(msg, file=sys.stderr, flush=True)
            finally:
                terminate()

        return terminate_all


class TrainingStopped(Exception):
    """A stop was requested (Ctrl-C or SIGTERM, on any rank): every rank stopped after ``step``, with
    the checkpoint saved."""

    def __init__(self, signum: int, step: int, checkpoint: Path):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}: saved {checkpoint}")


class LastCheckpoint(L.Callback):
    """Writes ``dirpath/last.ckpt`` every ``every_n_steps`` optimizer steps, at the end of fit, and
    when a stop is requested (module docstring); ``run_config`` (the resolved config as a dict) and
    ``run_data`` (the training data's fingerprint, :func:`tpkit.training.rundir.data_fingerprint`)
    go into every checkpoint, for ``--resume`` to compare with.

    A bad record at batch time (``data.on_error: raise``) ends the run after a save too: the batch
    it was in was not trained on, so the run resumes before it once the data is fixed.
    """

    def __init__(
        self,
        dirpath: str | Path,
        every_n_steps: int,
        run_config: dict[str, Any] | None = None,
        stop_signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM),
        run_data: dict[str, Any] | None = None,
    ) -> None:
        self.dirpath = Path(dirpath)
        self.every_n_steps = every_n_steps
        self.run_config = run_config
        self.run_data = run_data
        self.stop_signals = stop_signals
        self._saved_step = -1
        self._requested = 0  # the signal number of a stop request on this rank, 0 = none
        self._last_step = -1
        self._stopping: TrainingStopped | None = None
        self._previous: dict[int, Any] = {}

    @property
    def path(self) -> Path:
        return self.dirpath / LAST

    def _save(self, trainer: L.Trainer) -> None:
        if trainer.global_step == self._saved_step:
            return
        trainer.save_checkpoint(self.path, weights_only=False)  # the whole state: --resume needs it
        self._saved_step = trainer.global_step

    # ---- stop requests ----------------------------------------------------------------------
    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._requested:
            raise KeyboardInterrupt  # a second signal: stop now, the last checkpoint stays
        self._requested = signum
        rank_zero_info(
            f"\n{signal.Signals(signum).name}: stopping after this step with a checkpoint (again: stop now)"
        )

    def _install(self) -> None:
        if threading.current_thread() is threading.main_thread() and not self._previous:
            self._previous = {s: signal.signal(s, self._on_signal) for s in self.stop_signals}

    def _restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def stop_requested(self, trainer: L.Trainer, device: torch.device) -> int:
        """The signal of a stop request on any rank (0: none); a collective under DDP, at a step boundary."""
        flag = self._requested
        if trainer.world_size > 1:
            t = trainer.strategy.reduce(torch.tensor([flag], device=device), reduce_op="max")
            flag = int(t.item())
        return flag

    # ---- hooks ------------------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._saved_step = trainer.global_step  # a resumed run does not rewrite what it loaded
        self._last_step = trainer.global_step
        self._stopping = None
        self._requested = 0
        self._install()  # after Lightning registered its own SIGTERM handler: ours replaces it

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        dm = getattr(trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "commit"):
            dm.commit()  # the batch is done: move the loader's resume position past it, then save
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0:
            self._save(trainer)
        # a step boundary: this batch ended with an optimizer step (mid-accumulation the loader
        # position and the optimizer state disagree)
        boundary, self._last_step = step != self._last_step, step
        signum = self.stop_requested(trainer, pl_module.device)
        if signum and boundary and step < trainer.max_steps and self._stopping is None:
            self._save(trainer)
            # raised at the next hook, once Lightning has logged this step's metrics
            self._stopping = TrainingStopped(signum, step, self.path)

    def _stop_if_saved(self) -> None:
        if self._stopping is not None:
            raise self._stopping

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._stop_if_saved()

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop_if_saved()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop_if_saved()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()
        self._save(trainer)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._restore()
        # a batch that failed to collate was fetched, not trained on: the state is the last step's.
        # Single process only: a save under DDP is a collective the other ranks are not in.
        consistent = isinstance(exception, LlavaDataError) and trainer.world_size == 1
        if consistent and trainer.global_step > 0 and trainer.accumulate_grad_batches == 1:
            try:
                self._save(trainer)
            except Exception as e:  # never mask the error itself
                rank_zero_info(f"could not save a checkpoint: {e}")

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore()

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if self.run_config is not None:
            checkpoint["tpkit_config"] = self.run_config
        if self.run_data is not None:
            checkpoint["tpkit_data"] = self.run_data

    def state_dict(self) -> dict[str, Any]:
        return {"every_n_steps": self.every_n_steps}
