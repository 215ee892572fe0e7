"""In-memory data for the base-model recipe: a vision-tower image pool and pre-tokenised VQA sets.

The recipe trains a tiny model for a few minutes, so the accelerator must never wait for Python.
Everything is rendered and tokenised once by a process pool (:class:`DataWorkers`, ``fork``ed
before CUDA is initialised; jobs run in submission order while the caller trains), and then lives
as tensors on the device:

- :meth:`DataWorkers.tower_images` - ``sample_batch`` images (uint8) + (shape, colour) multi-hot labels
  + which patches are object patches (for the premise term).
- :meth:`DataWorkers.vqa` - ``make_record`` records, their images (uint8) and, per record, the
  ``LlavaCollator`` train-mode encoding (input ids + labels), so that a training batch is a gather
  and a left-pad on the device: :class:`VQABatches`.

Images are normalised on the device with the processor's own rescale/mean/std; :func:`pixel_check`
measures the difference against the processor's output (0 on the CPU and PIL backends).

Every chunk of work is seeded by its index, so results do not depend on the number of workers.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from tpkit.data import synthetic

__all__ = [
    "default_workers",
    "DataWorkers",
    "Pending",
    "Ready",
    "VQASet",
    "VQABatches",
    "encode_train_records",
    "save_vqa_set",
    "load_vqa_set",
    "normalize_images",
    "image_norm",
    "pixel_check",
]

_CHUNK = 256  # images per work item (the seed of a chunk is its index)


def default_workers(requested: int = 0) -> int:
    """``requested`` if > 0, else one less than the CPU cores this process may use (the main
    process keeps one core to drive the accelerator while the workers render)."""
    if requested > 0:
        return requested
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores - 1)


def _worker_init() -> None:
    # One thread per worker: the pool already uses every core.
    torch.set_num_threads(1)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


_WORKER_COLLATOR: Any = None  # set in the parent before forking; workers inherit it


@dataclass
class VQASet:
    """A split held in memory. ``ids``/``labels`` are the collator's train encoding, one per record."""

    records: list[dict[str, Any]]  # LLaVA records (their "image" is a path that is never read)
    images: np.ndarray  # (N, S, S, 3) uint8
    ids: list[np.ndarray] | None = None  # per record (T_i,) int64
    labels: list[np.ndarray] | None = None  # per record (T_i,) int64, -100 except answer tokens

    def __len__(self) -> int:
        return len(self.records)


def _pool_chunk(job: tuple[int, int, int, int]) -> tuple[np.ndarray, ...]:
    seed, chunk, n, patch_size = job
    return synthetic.sample_batch(n, seed=seed * 1_000_003 + chunk, patch_size=patch_size)


CAPTION_QUESTION = "What is in the image?"


def caption_of(objects: list[dict[str, Any]]) -> str:
    """The objects left to right (then top to bottom) as "red circle, blue square"."""
    ordered = sorted(objects, key=lambda o: (o["box"][0], o["box"][1]))
    return ", ".join(f"{o['color']} {o['shape']}" for o in ordered)


def add_caption_turn(record: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``record`` with a last turn that lists its objects (LLaVA's caption-style alignment)."""
    turns = [
        {"from": "human", "value": CAPTION_QUESTION},
        {"from": "gpt", "value": caption_of(record["objects"])},
    ]
    return {**record, "conversations": list(record["conversations"]) + turns}


def add_position_turn(record: dict[str, Any], seed: int) -> dict[str, Any]:
    """A copy of ``record`` with one more question, where one of its objects is relative to another,
    unless it asks one already or no pair has exactly one relation (then ``record`` itself).

    Position questions can be asked of few images (two objects of distinct shapes, one clear
    relation), so without this they are ~14% of the questions of a 3-turn train split, the hardest
    type with the least supervision. The pair is drawn from ``(seed, record index)``.
    """
    kinds = list(record.get("qtypes") or [record.get("qtype")])
    if "position" in kinds:
        return record
    index = int(str(record["id"]).rsplit("-", 1)[1])
    qa = synthetic._q_position(np.random.default_rng([seed, 7, index]), record["objects"])
    if qa is None:
        return record
    question, answer, _ = qa
    turns = [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    out = {**record, "conversations": list(record["conversations"]) + turns, "qtypes": [*kinds, "position"]}
    out["neg_types"] = [*(record.get("neg_types") or [record.get("neg_type")]), None]
    return out


def _vqa_chunk(
    job: tuple[str, int, int, int, bool, int, bool, bool],
) -> tuple[list, np.ndarray, list, list]:
    split, seed, start, n, encode, turns, caption, position = job
    cfg = synthetic.SyntheticConfig.for_split(split, turns=turns) if turns != 1 else None
    records, images, ids, labels = [], [], [], []
    for i in range(start, start + n):
        rec, img = synthetic.make_record(i, split, seed, cfg)
        rec = add_position_turn(rec, seed) if position else rec
        records.append(add_caption_turn(rec) if caption else rec)
        images.append(img)
    if encode:
        ids, labels = encode_train_records(_WORKER_COLLATOR, records, images)
    return records, np.stack(images), ids, labels


class Pending:
    """Work queued on :class:`DataWorkers`; :meth:`result` waits for it (with a progress bar)."""

    def __init__(
        self, workers: DataWorkers, fn: Callable, jobs: list, combine: Callable, desc: str, total: int
    ):
        self._fn, self._jobs, self._combine, self.desc, self.total = fn, jobs, combine, desc, total
        # imap queues every job now; the pool runs jobs in submission order
        self._it = workers.pool.imap(fn, jobs) if workers.pool is not None else None
        self._value: Any = None
        self._done = False

    def result(self) -> Any:
        if not self._done:
            outs = []
            bar = tqdm(total=self.total, desc=self.desc, unit="img", dynamic_ncols=True, mininterval=2.0)
            for out in self._it if self._it is not None else map(self._fn, self._jobs):
                outs.append(out)
                bar.update(len(out[0]))
            bar.close()
            self._value, self._done = self._combine(outs), True
            self._fn = self._jobs = self._it = None
        return self._value


class Ready:
    """A :class:`Pending` whose value is already at hand (e.g. read from a cache)."""

    def __init__(self, value: Any):
        self._value = value

    def result(self) -> Any:
        return self._value


class DataWorkers:
    """A ``fork`` process pool for data generation, to create before CUDA is initialised.

    Jobs run in submission order while the caller goes on (e.g. trains the tower on the GPU while
    the VQA data renders). With ``workers <= 1`` jobs run in-process when their result is asked.
    ``collator`` (train mode) is what :meth:`vqa` encodes records with; workers inherit it.
    """

    def __init__(self, workers: int, collator: Any = None):
        global _WORKER_COLLATOR
        _WORKER_COLLATOR = collator
        self.collator = collator
        self.pool = mp.get_context("fork").Pool(workers, initializer=_worker_init) if workers > 1 else None

    def tower_images(self, n: int, seed: int, patch_size: int, desc: str = "tower images") -> Pending:
        """``n`` scenes from ``synthetic.sample_batch`` -> (images uint8 (n, S, S, 3), labels float32
        (n, 13), object patches bool (n, P))."""
        jobs = [(seed, c, min(_CHUNK, n - c * _CHUNK), patch_size) for c in range((n + _CHUNK - 1) // _CHUNK)]

        def combine(outs: list) -> tuple[np.ndarray, ...]:
            return tuple(np.concatenate([o[k] for o in outs]) for k in range(3))

        return Pending(self, _pool_chunk, jobs, combine, desc, n)

    def vqa(
        self,
        split: str,
        n: int,
        seed: int,
        encode: bool = True,
        turns: int = 1,
        caption: bool = False,
        position: bool = False,
        cache: str | Path | None = None,
    ) -> Pending | Ready:
        """Records ``0..n-1`` of ``split`` with their images (and train encodings if ``encode``).

        ``turns`` > 1: multi-turn records (the first question as in the single-turn split, then
        other question types about the same image); their images differ from the ``turns=1`` split.
        ``caption``: each record gets a last turn listing its objects (:func:`add_caption_turn`).
        ``position``: a position question is added where one can be (:func:`add_position_turn`).
        ``cache``: a directory; the set is read from it when it holds this very request and its
        first and last records re-render identically (so a changed generator or tokenizer is
        caught), else rendered and written there (:func:`save_vqa_set`).
        """
        if encode and self.collator is None:
            raise ValueError("DataWorkers has no collator to encode records with")
        job = (split, seed, 0, n, encode, turns, caption, position)
        key = dict(zip(("split", "seed", "start", "n", "encode", "turns", "caption", "position"), job))
        if cache is not None:
            cached = load_vqa_set(cache, key)
            if cached is not None and _spot_check(cached, job):
                print(f"vqa {split}: {n} records read from {cache}", flush=True)
                return Ready(cached)
        jobs = [(split, seed, s, min(_CHUNK, n - s), *job[4:]) for s in range(0, n, _CHUNK)]

        def combine(outs: list) -> VQASet:
            records, ids, labels = [], [], []
            for r, _, i, lab in outs:
                records += r
                ids += i
                labels += lab
            images = np.concatenate([o[1] for o in outs])
            data = VQASet(records, images, ids if encode else None, labels if encode else None)
            if cache is not None:
                save_vqa_set(data, cache, key)
            return data

        return Pending(self, _vqa_chunk, jobs, combine, f"vqa {split}", n)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool.join()
            self.pool = None

    def __enter__(self) -> DataWorkers:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None and self.pool is not None:
            self.pool.terminate()
        self.close()


# --------------------------------------------------------------------------------------------
# Device-side batches


def normalize_images(
    images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, scale: float
) -> torch.Tensor:
    """uint8 (B, S, S, 3) -> float32 pixel values (B, 3, S, S): ``(x * scale - mean) / std``."""
    x = images.permute(0, 3, 1, 2).float() * scale
    return (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)


def image_norm(processor: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(mean (3,), std (3,), rescale factor) of ``processor``'s image processor, on ``device``."""
    ip = processor.image_processor
    mean = torch.tensor(ip.image_mean, dtype=torch.float32, device=device)
    std = torch.tensor(ip.image_std, dtype=torch.float32, device=device)
    return mean, std, float(ip.rescale_factor)


def pixel_check(processor: Any, images: np.ndarray) -> float:
    """Max |processor pixel_values - normalize_images| over ``images`` (uint8 (n, S, S, 3))."""
    from PIL import Image

    ref = processor.image_processor([Image.fromarray(a) for a in images], return_tensors="pt")["pixel_values"]
    mean, std, scale = image_norm(processor, torch.device("cpu"))
    mine = normalize_images(torch.from_numpy(images), mean, std, scale)
    if ref.shape != mine.shape:
        return float("inf")
    return float((ref.float() - mine).abs().max())


class VQABatches:
    """Random training batches of a :class:`VQASet`, gathered and left-padded on ``device``.

    The encodings are stored once as a left-padded (N, T_max) matrix; a batch takes its rows and
    drops the leading columns that are padding in every row, which is exactly what the collator's
    own left padding produces for the same records.
    """

    def __init__(self, data: VQASet, pad_id: int, device: torch.device, seed: int):
        if data.ids is None or data.labels is None:
            raise ValueError("VQABatches needs a VQASet built with a collator (train encodings)")
        n = len(data)
        lengths = np.array([len(x) for x in data.ids])
        t_max = int(lengths.max())
        # scatter the ragged rows right-aligned into (N, T_max) in one go
        rows = np.repeat(np.arange(n), lengths)
        first = np.repeat(t_max - lengths, lengths)
        offsets = np.repeat(np.cumsum(lengths) - lengths, lengths)
        cols = first + np.arange(len(rows)) - offsets
        ids = np.full((n, t_max), pad_id, dtype=np.int64)
        labels = np.full((n, t_max), -100, dtype=np.int64)
        ids[rows, cols] = np.concatenate(data.ids)
        labels[rows, cols] = np.concatenate(data.labels)
        self.ids = torch.from_numpy(ids).to(device)  # (N, T_max)
        self.labels = torch.from_numpy(labels).to(device)  # (N, T_max)
        self.starts_cpu = torch.from_numpy(t_max - lengths)  # (N,) first real column of each row
        self.starts = self.starts_cpu.to(device)
        self.images = torch.from_numpy(data.images).to(device)  # (N, S, S, 3) uint8
        self.n = n
        self.device = device
        self.gen = torch.Generator().manual_seed(seed)
        self._perm = torch.empty(0, dtype=torch.long)
        self._pos = 0
        self.epoch = 0

    def sample(self, batch_size: int) -> tuple[torch.Tensor, ...]:
        """Next batch (epoch-wise permutation) -> (input_ids, attention_mask, labels, images uint8)."""
        if self._pos + batch_size > len(self._perm):
            self._perm = torch.randperm(self.n, generator=self.gen)
            self._perm_dev = self._perm.to(self.device)  # one copy per epoch, not one per step
            self._pos = 0
            self.epoch += 1
        sl = slice(self._pos, self._pos + batch_size)
        self._pos += batch_size
        return self.take(self._perm[sl], self._perm_dev[sl])

    def state_dict(self) -> dict[str, Any]:
        """The sampler's position: generator, current permutation, offset in it, epoch."""
        return {
            "gen": self.gen.get_state(),
            "perm": self._perm.clone(),
            "pos": self._pos,
            "epoch": self.epoch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gen.set_state(state["gen"])
        self._perm = state["perm"].clone()
        self._perm_dev = self._perm.to(self.device)
        self._pos = int(state["pos"])
        self.epoch = int(state["epoch"])

    def take(self, idx: torch.Tensor, idx_dev: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """CPU row indices (and the same on the device, if at hand) ->
        (input_ids (B, T), attention_mask (B, T), labels (B, T), images (B, S, S, 3)).

        Nothing here waits for the device: the trim column comes from a CPU copy of the row starts.
        """
        first = int(self.starts_cpu[idx].min())
        idx = idx.to(self.device) if idx_dev is None else idx_dev
        ids = self.ids[idx, first:]
        labels = self.labels[idx, first:]
        cols = torch.arange(first, self.ids.shape[1], device=self.device)
        mask = (cols[None, :] >= self.starts[idx, None]).long()
        return ids, mask, labels, self.images[idx]


def encode_train_records(
    collator: Any, records: list[dict[str, Any]], images: list[np.ndarray]
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The collator's train-mode encoding of each record -> (input ids, labels), padding removed."""
    from PIL import Image

    batch = collator([{**r, "image": Image.fromarray(im)} for r, im in zip(records, images)])
    mask = batch["attention_mask"].bool()  # (B, T), left-padded
    ids = [row[m].numpy().astype(np.int64) for row, m in zip(batch["input_ids"], mask)]
    labels = [row[m].numpy().astype(np.int64) for row, m in zip(batch["labels"], mask)]
    return ids, labels


# --------------------------------------------------------------------------------------------
# On-disk cache of a rendered VQA set: a resumed CPU run skips minutes of rendering


def save_vqa_set(data: VQASet, path: str | Path, key: dict[str, Any]) -> None:
    """Write ``data`` to the directory ``path`` with ``key`` (what was asked for), atomically: a
    reader sees the old directory or the complete new one, never a part."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    np.save(tmp / "images.npy", data.images)
    (tmp / "records.json").write_text(json.dumps(data.records))
    if data.ids is not None and data.labels is not None:
        lengths = np.array([len(x) for x in data.ids], dtype=np.int64)
        np.savez(
            tmp / "tokens.npz",
            lengths=lengths,
            ids=np.concatenate(data.ids),
            labels=np.concatenate(data.labels),
        )
    (tmp / "key.json").write_text(json.dumps(key, sort_keys=True))
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def load_vqa_set(path: str | Path, key: dict[str, Any]) -> VQASet | None:
    """The set :func:`save_vqa_set` wrote to ``path`` under the same ``key``, else None."""
    path = Path(path)
    try:
        if json.loads((path / "key.json").read_text()) != json.loads(json.dumps(key)):
            return None
        records = json.loads((path / "records.json").read_text())
        images = np.load(path / "images.npy")
        ids = labels = None
        if (path / "tokens.npz").exists():
            with np.load(path / "tokens.npz") as z:
                cut = np.cumsum(z["lengths"])[:-1]
                ids, labels = np.split(z["ids"], cut), np.split(z["labels"], cut)
    except (OSError, ValueError) as e:  # missing, truncated or unreadable: render again
        print(f"cache {path} not used: {e}", flush=True)
        return None
    if len(records) != len(images) or (ids is not None and len(ids) != len(records)):
        return None
    return VQASet(records, images, ids, labels)


def _spot_check(data: VQASet, job: tuple) -> bool:
    """Do the first and last records of a cached set re-render to exactly what the cache holds?"""
    n, encode = job[3], job[4]
    for i in sorted({0, n - 1}):
        records, images, ids, labels = _vqa_chunk((*job[:2], i, 1, *job[4:]))
        same = json.loads(json.dumps(records[0])) == data.records[i] and np.array_equal(
            images[0], data.images[i]
        )
        if encode and data.ids is not None and data.labels is not None:
            same = same and np.array_equal(ids[0], data.ids[i]) and np.array_equal(labels[0], data.labels[i])
        if not same:
            print(
                f"cache not used: record {i} renders differently now (generator or tokenizer changed)",
                flush=True,
            )
            return False
    return True
