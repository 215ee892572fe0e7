"""DataModule over :mod:`tpkit.data`, with a loader whose position is part of the checkpoint.

Exact resume needs the sampler's position (epoch, samples consumed) in the checkpoint: Lightning
saves ``state_dict()`` of any train loader that has one and restores it before iterating. The
position counts batches whose training step completed (``training_step`` marks the batch in flight,
the checkpoint callback commits it at batch end, before it saves), not batches the loader has
produced — Lightning fetches one batch ahead.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.utils.data import DataLoader, Sampler

from tpkit.data.collator import LlavaCollator
from tpkit.data.config import DataConfig
from tpkit.data.errors import RecordError, write_skipped
from tpkit.data.llava_json import load_llava_json
from tpkit.training.rundir import RunDirError

__all__ = ["ResumableSampler", "ResumableDataLoader", "LlavaDataModule", "ids_fingerprint"]


def ids_fingerprint(dataset: Sequence) -> str | None:
    """A short hash of the dataset's record ids in order (None: records without ids)."""
    cols = getattr(dataset, "column_names", None)
    if cols is not None:
        ids = dataset["id"] if "id" in cols else None
    else:
        ids = [r.get("id") if isinstance(r, dict) else None for r in dataset]
    if not ids or any(i is None for i in ids):
        return None
    return hashlib.sha256("\n".join(map(str, ids)).encode()).hexdigest()[:16]


class ResumableSampler(Sampler[int]):
    """Seeded per-epoch shuffling, sharded by rank, that restarts mid-epoch where it stopped.

    Like ``DistributedSampler``: the epoch's permutation (``seed + epoch``) is padded to a multiple
    of ``num_replicas`` (or truncated with ``drop_last``) and rank ``r`` takes every
    ``num_replicas``-th index from ``r``. ``consumed`` counts this rank's samples already trained
    on in the current epoch; iteration resumes after them.
    """

    def __init__(
        self,
        num_samples: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        drop_last: bool = False,
        fingerprint: str | None = None,
    ) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} not in [0, {num_replicas})")
        self.n = num_samples
        self.shuffle = shuffle
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.drop_last = drop_last
        self.fingerprint = fingerprint  # of the dataset's record ids: a resume must see the same data
        self.epoch = 0
        self.consumed = 0
        self.in_flight = 0
        if drop_last:
            self.per_rank = num_samples // num_replicas
        else:
            self.per_rank = math.ceil(num_samples / num_replicas)

    def __len__(self) -> int:
        return self.per_rank

    def epoch_indices(self, epoch: int) -> list[int]:
        """This rank's full index list for ``epoch``."""
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        total = self.per_rank * self.num_replicas
        if total > len(order):  # pad by wrapping around, as DistributedSampler does
            order = (order * math.ceil(total / max(len(order), 1)))[:total]
        order = order[:total]
        return order[self.rank : total : self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_indices(self.epoch)[self.consumed :])

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at every epoch start; a new epoch starts from its beginning."""
        if epoch != self.epoch:
            self.epoch = epoch
            self.consumed = 0
            self.in_flight = 0

    def mark_in_flight(self, n: int) -> None:
        """``n`` samples are being trained on (called by ``training_step``)."""
        self.in_flight = n

    def commit(self) -> None:
        """The in-flight batch finished its step: the resume position moves past it."""
        self.consumed += self.in_flight
        self.in_flight = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "consumed": self.consumed,
            "seed": self.seed,
            "n": self.n,
            "world": self.num_replicas,
            "fingerprint": self.fingerprint,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("n", self.n) != self.n or state.get("fingerprint") not in (None, self.fingerprint):
            raise RunDirError(
                f"--resume: the checkpoint was trained on {state['n']} training records, the training data "
                f"now has {self.n}"
                + (" (other records)" if state["n"] == self.n else "")
                + ": a resumed run "
                "must read the data it started with. Restore that data, or start a new run (--overwrite, "
                "or another trainer.out_dir)"
            )
        if state.get("world", self.num_replicas) != self.num_replicas:
            raise RunDirError(
                f"--resume: the checkpoint was written by {state['world']} processes (devices x nodes), this "
                f"run has {self.num_replicas}: the data order is sharded by process, so a run resumes on as "
                f"many (set trainer.devices / trainer.num_nodes to give {state['world']})"
            )
        self.epoch = int(state["epoch"])
        self.consumed = int(state["consumed"])
        self.in_flight = 0
        self.seed = int(state.get("seed", self.seed))


class ResumableDataLoader(DataLoader):
    """A DataLoader that Lightning treats as stateful (its position goes into the checkpoint)."""

    sampler: ResumableSampler

    def __len__(self) -> int:  # full epoch, also when resuming mid-epoch (Lightning counts batches)
        bs = self.batch_size or 1
        n = len(self.sampler)
        return n // bs if self.drop_last else math.ceil(n / bs)

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)


class LlavaDataModule(L.LightningDataModule):
    """LLaVA conversation-JSON train/val data; datasets and collate can be injected (tests).

    With ``data.on_error: skip`` every skipped record, at load time and at batch time (an image that
    does not decode), is appended to ``skipped_path`` (one JSON line each) and counted in a warning.
    """

    def __init__(
        self,
        cfg: DataConfig,
        processor: Any = None,
        *,
        seed: int = 0,
        train_dataset: Sequence | None = None,
        val_dataset: Sequence | None = None,
        collate_fn: Callable | None = None,
        skipped_path: str | Path | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.processor = processor
        self.seed = seed
        self.train_dataset = train_dataset
        self.val_dataset = val_dataset
        self.collate_fn = collate_fn
        self.skipped_path = None if skipped_path is None else Path(skipped_path)
        self.train_sampler: ResumableSampler | None = None
        self.n_skipped = 0

    def _load(self, path: str | None) -> Any:
        if path is None:
            return None
        # with the processor, over-long records are found now (raise / skip), not mid-run by the collator
        ds, report = load_llava_json(
            path,
            image_folder=self.cfg.image_folder,
            on_error=self.cfg.on_error,
            check_images=self.cfg.check_images,
            confine_images=self.cfg.confine_images,
            duplicate_ids=self.cfg.duplicate_ids,
            processor=self.processor,
            max_length=self.cfg.max_length,
        )
        if report.errors:
            self.report_skipped(report.errors, path, stage="load")
        if report.renamed:
            n = sum(map(len, report.renamed.values()))
            rank_zero_warn(f"{path}: {n} records of {len(report.renamed)} duplicate ids renamed (id#2, ...)")
        return ds

    def report_skipped(self, errors: list[RecordError], source: str | None = None, **where: Any) -> None:
        """Count and list skipped records (``where``: stage, step, ... of each line)."""
        source = source or str(self.cfg.train_json)
        self.n_skipped += len(errors)
        listed = ""
        if self.skipped_path is not None:
            write_skipped(self.skipped_path, source, errors, **where)
            listed = f"; every skipped record is listed in {self.skipped_path}"
        shown = "; ".join(str(e) for e in errors[:3]) + (" ..." if len(errors) > 3 else "")
        stage = where.get("stage", "")
        rank_zero_warn(f"{source}: skipped {len(errors)} bad records at {stage} time ({shown}){listed}")

    def setup(self, stage: str | None = None) -> None:
        if self.collate_fn is None:
            self.collate_fn = LlavaCollator(
                self.processor, max_length=self.cfg.max_length, mode="train", on_error=self.cfg.on_error
            )
        if self.train_dataset is None:
            self.train_dataset = self._load(self.cfg.train_json)
        if self.val_dataset is None:
            self.val_dataset = self._load(self.cfg.val_json)

    def _world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 1, 0
        return trainer.world_size, trainer.global_rank

    def train_dataloader(self) -> ResumableDataLoader:
        world, rank = self._world()
        sampler = ResumableSampler(
            len(self.train_dataset),
            shuffle=True,
            seed=self.seed,
            num_replicas=world,
            rank=rank,
            drop_last=True,
            fingerprint=ids_fingerprint(self.train_dataset),
        )
        self.train_sampler = sampler
        g = torch.Generator()  # the loader's base seed must not draw from the global RNG stream
        g.manual_seed(self.seed)
        return ResumableDataLoader(
            self.train_dataset,
            batch_size=self.cfg.batch_size,
            sampler=sampler,
            collate_fn=self.collate_fn,
            num_workers=self.cfg.num_workers,
            drop_last=False,
            generator=g,
            persistent_workers=self.cfg.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader | list:
        if self.val_dataset is None:
            return []
        world, rank = self._world()
        sampler = ResumableSampler(len(self.val_dataset), shuffle=False, num_replicas=world, rank=rank)
        return DataLoader(
            self.val_dataset,
            batch_size=self.cfg.eval_batch_size,
            sampler=sampler,
            collate_fn=self.collate_fn,
            num_workers=self.cfg.num_workers,
        )

    def mark_in_flight(self, n: int) -> None:
        if self.train_sampler is not None:
            self.train_sampler.mark_in_flight(n)

    def commit(self) -> None:
        if self.train_sampler is not None:
            self.train_sampler.commit()
