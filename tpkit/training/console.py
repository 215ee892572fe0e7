"""What a training run shows and logs: one progress bar over optimizer steps, a metrics log that a
resumed run continues, and quiet about the dependency warnings a user cannot act on."""

from __future__ import annotations

import contextlib
import csv
import logging
import re
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from tqdm.auto import tqdm

__all__ = ["StepProgressBar", "ContinuedCSVLogger", "log_version", "quiet_dependencies"]


class StepProgressBar(ProgressBar):
    """``train 120/2000 [...] loss=0.41 acc=0.93``: optimizer steps of the whole run (a resumed run
    starts at its step), not batches of an epoch; the progress-bar metrics beside it, no ``v_num``."""

    def __init__(self) -> None:
        super().__init__()
        self._enabled = True
        self.bar: Any = None

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items

    def _postfix(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, str]:
        out = {}
        for k, v in self.get_metrics(trainer, pl_module).items():
            name = k.removeprefix("train/")
            out[name] = f"{v:.4g}" if isinstance(v, float) else str(v)
        return out

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._enabled and trainer.is_global_zero:
            total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
            self.bar = tqdm(
                total=total,
                initial=trainer.global_step,
                desc="train",
                unit="step",
                dynamic_ncols=True,
                file=sys.stderr,
            )

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self.bar is not None:
            self.bar.set_postfix(self._postfix(trainer, pl_module), refresh=False)
            self.bar.update(trainer.global_step - self.bar.n)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.bar is not None and not trainer.sanity_checking:
            self.bar.set_postfix(self._postfix(trainer, pl_module))

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._close()

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._close()


class _ContinuedWriter(ExperimentWriter):
    """A metrics.csv writer that keeps the rows of the steps before ``before`` (those the checkpoint
    covers) and appends after them, instead of deleting the file."""

    def __init__(self, log_dir: str, before: int | None) -> None:
        self._before = before
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if self._before is None or not path.is_file():
            super()._check_log_dir_exists()
            return
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            keys = list(reader.fieldnames or [])
            rows = [r for r in reader if r.get("step") and float(r["step"]) < self._before]
        with open(path, "w", newline="") as f:  # rows of a killed run's tail (after its last save) go
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
        self.metrics_keys = keys


class ContinuedCSVLogger(CSVLogger):
    """``CSVLogger`` whose given version continues an existing ``metrics.csv`` from step ``resume_step``."""

    def __init__(self, save_dir: str, name: str, version: int | None, resume_step: int | None) -> None:
        super().__init__(save_dir, name=name, version=version)
        self._resume_step = resume_step

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuedWriter(self.log_dir, self._resume_step)
        return self._experiment


def log_version(root: str | Path, asked: int | None, resume: bool) -> int | None:
    """The metrics log version: ``asked``, else a resumed run's own (the latest ``version_N`` under
    ``root``), else None (the logger takes the next free one)."""
    if asked is not None or not resume:
        return asked
    found = [int(m[1]) for p in Path(root).glob("version_*") if (m := re.fullmatch(r"version_(\d+)", p.name))]
    return max(found) if found else None


# (category, message regex) of dependency warnings that say nothing a tpkit user can act on
_QUIET = (
    (FutureWarning, r".*is_gradient_checkpointing.*is deprecated"),  # transformers, asked by peft
    (FutureWarning, r".*isinstance\(treespec, LeafSpec\)"),  # torch, asked by lightning
)


@contextlib.contextmanager
def quiet_dependencies() -> Iterator[None]:
    """Inside the block: no dependency warnings of :data:`_QUIET` and no Lightning adverts."""
    names = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")
    loggers = [logging.getLogger(n) for n in names]
    advert = _DropAdverts()
    with warnings.catch_warnings():
        for category, message in _QUIET:
            warnings.filterwarnings("ignore", message=message, category=category)
        for lg in loggers:
            lg.addFilter(advert)
        try:
            yield
        finally:
            for lg in loggers:
                lg.removeFilter(advert)


class _DropAdverts:
    """A logging filter: drops Lightning's tips about other products."""

    def filter(self, record: Any) -> bool:
        return "💡 Tip" not in str(record.getMessage())
