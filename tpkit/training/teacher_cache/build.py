"""Teacher cache, build side: run the unpruned teacher over the training data once and write the
arrays that :class:`tpkit.training.teacher_cache.cache.TeacherCache` reads."""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from tpkit.data.collator import LlavaCollator
from tpkit.models.families import device_inputs
from tpkit.models.loading import load_base_model, load_processor_for, resolve_dtype
from tpkit.training.config import TrainConfig
from tpkit.training.losses import answer_positions
from tpkit.training.recipe import build_datamodule
from tpkit.training.teacher_cache.cache import FORMAT, TeacherCacheError, model_fingerprint, shard_dir

__all__ = ["build_teacher_cache"]


class _Writer:
    """Append-only writer of the cache arrays, with a progress file so that a stopped build continues."""

    FILES = ("values", "indices", "lse", "targets")

    def __init__(self, out: Path, meta: dict[str, Any]):
        self.out = out
        self.meta = meta
        self.ids: list[str] = []
        self.offsets = [0]
        out.mkdir(parents=True, exist_ok=True)
        prog = out / "progress.json"
        if prog.is_file():
            p = json.loads(prog.read_text())
            if p["meta"] != meta:
                raise TeacherCacheError(
                    f"{out} holds a partial build for another config or model; remove it or choose another --out"
                )
            self.ids, self.offsets = p["ids"], p["offsets"]
            self._truncate()
        else:
            for f in self.FILES:
                (out / f"{f}.bin").write_bytes(b"")
        self.handles = {f: open(out / f"{f}.bin", "ab") for f in self.FILES}

    def _truncate(self) -> None:
        """Cut each file back to the last recorded record (bytes written after it are discarded)."""
        rows, k = self.offsets[-1], self.meta["k"]
        sizes = {
            "values": rows * k * np.dtype(self.meta["dtype"]).itemsize,
            "indices": 0 if self.meta["full_vocab"] else rows * k * 4,
            "lse": rows * 4,
            "targets": rows * 4,
        }
        for f, size in sizes.items():
            with open(self.out / f"{f}.bin", "r+b") as fh:
                fh.truncate(size)

    def append(
        self, rid: str, values: np.ndarray, indices: np.ndarray | None, lse: np.ndarray, targets: np.ndarray
    ):
        self.handles["values"].write(np.ascontiguousarray(values, dtype=self.meta["dtype"]).tobytes())
        if indices is not None:
            self.handles["indices"].write(np.ascontiguousarray(indices, dtype=np.int32).tobytes())
        self.handles["lse"].write(np.ascontiguousarray(lse, dtype=np.float32).tobytes())
        self.handles["targets"].write(np.ascontiguousarray(targets, dtype=np.int32).tobytes())
        self.ids.append(rid)
        self.offsets.append(self.offsets[-1] + len(targets))

    def commit(self) -> None:
        """Flush the arrays, then record how far they go (atomically)."""
        for h in self.handles.values():
            h.flush()
            os.fsync(h.fileno())
        tmp = self.out / "progress.json.tmp"
        tmp.write_text(json.dumps({"meta": self.meta, "ids": self.ids, "offsets": self.offsets}))
        os.replace(tmp, self.out / "progress.json")

    def finish(self) -> None:
        self.commit()
        for h in self.handles.values():
            h.close()
        if self.meta["full_vocab"]:
            (self.out / "indices.bin").unlink(missing_ok=True)
        (self.out / "records.json").write_text(json.dumps({"ids": self.ids, "offsets": self.offsets}))
        meta = {**self.meta, "records": len(self.ids), "rows": self.offsets[-1]}
        tmp = self.out / "meta.json.tmp"
        tmp.write_text(json.dumps(meta, indent=1) + "\n")
        os.replace(tmp, self.out / "meta.json")
        (self.out / "progress.json").unlink()


def _check_ids(dataset: Any) -> None:
    """Every record needs a distinct ``id``: training looks its rows up by it."""
    cols = getattr(dataset, "column_names", None)
    ids = dataset["id"] if cols and "id" in cols else [r.get("id") for r in dataset]
    missing = sum(i is None for i in ids)
    if missing:
        raise TeacherCacheError(
            f"{missing} training records have no 'id': the teacher cache looks rows up by id"
        )
    dup = [(i, n) for i, n in Counter(map(str, ids)).items() if n > 1]
    if dup:
        shown = ", ".join(f"{i!r} x{n}" for i, n in dup[:5])
        raise TeacherCacheError(
            f"{len(dup)} record ids occur more than once in the training data ({shown}"
            f"{', ...' if len(dup) > 5 else ''}): the teacher cache looks rows up by id; make them unique"
        )


@torch.inference_mode()
def build_teacher_cache(
    cfg: TrainConfig,
    out: str | Path,
    *,
    top_k: int = 0,
    batch_size: int | None = None,
    dtype: str = "float32",
    device: str = "auto",
    dataset: Any = None,
    processor: Any = None,
    base: torch.nn.Module | None = None,
    progress: bool = True,
    shard: tuple[int, int] = (0, 1),
    workers: int | None = None,
    commit_every_s: float = 30.0,
) -> Path:
    """Run the teacher over ``cfg.data.train_json`` in order and write the cache to ``out``.

    ``top_k`` 0 (or >= vocab) stores the full vocabulary (exact); otherwise the k largest logits.
    ``shard=(i, n)``: only records i, i + n, i + 2n, ... into ``out/shard-i-of-n`` (one process per
    GPU; training reads the directory of shards as one cache). Returns the directory written.
    ``workers``: collation processes (default ``data.num_workers``). Progress is made durable every
    ``commit_every_s``: a stopped build loses at most that much and continues where it stopped.
    ``dataset``/``processor``/``base`` may be injected (tests); by default they come from ``cfg``.
    """
    index, num_shards = shard
    if not 0 <= index < num_shards:
        raise TeacherCacheError(f"shard {index}/{num_shards}: need 0 <= i < n")
    out = Path(out) if num_shards == 1 else shard_dir(Path(out), index, num_shards)
    if (out / "meta.json").is_file():
        raise TeacherCacheError(f"{out} already holds a finished teacher cache; remove it to rebuild")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if processor is None:
        processor = load_processor_for(cfg.model)
    if dataset is None:
        dm = build_datamodule(cfg, processor)
        dm.setup("fit")
        dataset = dm.train_dataset
    if base is None:
        base = load_base_model(cfg.model, dtype=resolve_dtype(cfg.model.dtype, dev), processor=processor)
    base = base.to(dev).eval()
    vocab = int(base.get_output_embeddings().weight.shape[0])
    full = top_k <= 0 or top_k >= vocab
    k = vocab if full else top_k
    T = float(cfg.distill.temperature)
    meta = {
        "format": FORMAT,
        "model": model_fingerprint(base),
        "model_path": cfg.model.path,
        "model_dtype": str(next(base.parameters()).dtype).replace("torch.", ""),
        "temperature": T,
        "max_length": cfg.data.max_length,
        "train_json": cfg.data.train_json,
        "top_k": top_k,
        "k": k,
        "full_vocab": full,
        "dtype": dtype,
        "shard": [index, num_shards],
    }
    _check_ids(dataset)  # before hours of teacher forwards, not after
    writer = _Writer(out, meta)
    # data.on_error skip: a record that fails at batch time is left out here as in training
    collate = LlavaCollator(
        processor, max_length=cfg.data.max_length, mode="train", on_error=cfg.data.on_error
    )
    bs = batch_size or cfg.data.eval_batch_size
    mine = range(index, len(dataset), num_shards)
    start = len(writer.ids)
    # collation (image decoding and preprocessing) in worker processes, overlapping the teacher
    loader = DataLoader(
        Subset(dataset, list(mine[start:])),
        batch_size=bs,
        shuffle=False,
        collate_fn=collate,
        num_workers=cfg.data.num_workers if workers is None else workers,
        pin_memory=dev.type == "cuda",
    )
    bar = tqdm(total=len(mine), initial=start, desc="teacher cache", unit="rec", disable=not progress)
    last_commit = time.monotonic()
    for batch in loader:
        if batch.get("skipped"):
            bar.write(f"teacher cache: skipped {', '.join(str(e) for e in batch['skipped'])}")
            bar.update(len(batch["skipped"]))
        if not batch["ids"]:
            continue
        labels = batch["labels"]
        dense = answer_positions(labels)  # (B, T): positions that predict an answer token
        positions = dense.any(0).nonzero()[:, 0]  # (P,) union over the batch
        logits = base(
            **device_inputs(base, batch, dev),
            logits_to_keep=positions.to(dev),
            use_cache=False,
        ).logits.float()  # (B, P, V)
        rows_b, rows_t = dense.nonzero(as_tuple=True)  # (N,) each: sample-major, positions in order
        col = torch.searchsorted(positions, rows_t)  # (N,) column of each row in ``logits``
        rows = logits[rows_b.to(dev), col.to(dev)]  # (N, V)
        lse = torch.logsumexp(rows / T, dim=-1).cpu().numpy()  # (N,)
        if full:
            vals, idx = rows.cpu().numpy(), None
        else:
            v, i = rows.topk(k, dim=-1)  # (N, k), sorted
            vals, idx = v.cpu().numpy(), i.cpu().numpy()
        targets = labels[rows_b, rows_t + 1].numpy()  # (N,)
        ends = np.cumsum(dense.sum(1).numpy())
        for b, rid in enumerate(batch["ids"]):
            sl = slice(ends[b - 1] if b else 0, ends[b])
            writer.append(str(rid), vals[sl], None if idx is None else idx[sl], lse[sl], targets[sl])
        if time.monotonic() - last_commit > commit_every_s:
            writer.commit()
            last_commit = time.monotonic()
        bar.update(len(batch["ids"]))
    bar.close()
    writer.finish()
    return out
