"""Teacher cache, read side: the unpruned teacher's answer-token logits, computed once, read by every KD step.

The teacher is the base model with the adapter off and the pruner off: a fixed function of each
training record. Online distillation pays its dense forward on every step, which costs about as much
as the pruned student's whole step (``benchmarks/train_step.py``). A cache pays it once per record, in
inference mode and at a large batch, and is shared by every run on the same base model and data —
a sweep over pruning budgets, alphas or LoRA ranks, and every later epoch::

    tpkit teacher-cache --config configs/X.yaml --out runs/teacher_cache [--top-k 64]
    tpkit train --config configs/X.yaml --set distill.teacher_cache=runs/teacher_cache

On N GPUs, one process per GPU, each a shard (``--shard i/N`` writes ``DIR/shard-i-of-N``); training
reads the directory of shards as one cache::

    for i in $(seq 0 7); do CUDA_VISIBLE_DEVICES=$i tpkit teacher-cache \
        --config configs/X.yaml --out DIR --shard $i/8 --top-k 64 --dtype float16 & done; wait

What is stored, per record (by its ``id``), for each position that predicts an answer token (the
dense sequence, in order): the teacher's top-k logits and their vocabulary ids (all of them when
``top_k`` is 0 or covers the vocabulary: then KD on the cache equals online KD), the logsumexp of
``logits / temperature`` over the full vocabulary (so the top-k probabilities are exact), and the
target token. Training looks rows up by record id and by rank among the record's answer positions,
so a student that pruned some of them still gets the right rows; a record whose answer count or
targets differ from the cache's (other data, another ``max_length``, another tokenizer) is an error.

Layout of ``DIR``: ``meta.json`` (format, model fingerprint, temperature, top_k, dtype, counts,
data), ``records.json`` (ids, row offsets), ``values.bin`` (R, k) logits, ``indices.bin`` (R, k)
int32 (absent for the full vocabulary), ``lse.bin`` (R,) float32, ``targets.bin`` (R,) int32. The
build (:mod:`tpkit.training.teacher_cache.build`) appends records in dataset order and records its
progress, so an interrupted build continues.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tpkit.models.checks import fingerprint_diff, model_fingerprint
from tpkit.training.losses import answer_positions

__all__ = [
    "FORMAT",
    "TeacherCacheError",
    "TeacherCache",
    "TeacherRows",
    "answer_ranks",
    "model_fingerprint",
    "shard_dir",
]

FORMAT = 1


class TeacherCacheError(ValueError):
    """The teacher cache is missing, unfinished, or does not fit the run or the data (message says which)."""


def _fingerprint_diff(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    return fingerprint_diff(saved, now, ("cache", "model"))


@dataclass
class TeacherRows:
    """Teacher rows for the N answer rows of a batch (in ``mask.nonzero()`` order)."""

    values: torch.Tensor  # (N, k) logits
    indices: torch.Tensor  # (N, k) vocabulary ids
    lse: torch.Tensor  # (N,) logsumexp(logits / temperature) over the vocabulary
    targets: torch.Tensor  # (N,) the answer token each row predicts


_REBUILD = ". Rebuild it: tpkit teacher-cache --config <the run's config> --out <dir>"
_DTYPES = ("float32", "float16")  # what the build writes (--dtype)


def _read_json(path: Path) -> Any:
    """A cache file's JSON, or a TeacherCacheError naming the file and what is wrong with it."""
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise TeacherCacheError(f"{path}: missing{_REBUILD}") from None
    except UnicodeDecodeError as e:
        raise TeacherCacheError(f"{path}: not UTF-8 text (byte {e.start}){_REBUILD}") from None
    except json.JSONDecodeError as e:
        raise TeacherCacheError(f"{path}: not valid JSON ({e}){_REBUILD}") from None


def _int(value: Any, minimum: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _meta_problems(meta: Any) -> list[str]:
    """What ``meta.json`` lacks or holds wrong (the fields the read side relies on)."""
    if not isinstance(meta, dict):
        return [f"the top level is a {type(meta).__name__}, not a mapping"]
    problems = []
    if meta.get("dtype") not in _DTYPES:
        problems.append(f"dtype = {meta.get('dtype')!r}, expected one of {list(_DTYPES)}")
    for key, minimum in (("k", 1), ("rows", 0), ("records", 0), ("max_length", 1)):
        if not _int(meta.get(key), minimum):
            problems.append(f"{key} = {meta.get(key)!r}, expected an integer >= {minimum}")
    if not isinstance(meta.get("full_vocab"), bool):
        problems.append(f"full_vocab = {meta.get('full_vocab')!r}, expected true or false")
    t = meta.get("temperature")
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0:
        problems.append(f"temperature = {t!r}, expected a number > 0")
    model = meta.get("model")
    if not isinstance(model, dict) or not _int(model.get("vocab_size"), 1):
        problems.append("model: expected the base model's fingerprint, with its vocab_size")
    return problems


def _records_problems(rec: Any) -> list[str]:
    """What ``records.json`` holds wrong: ids (strings) and row offsets (from 0, non-decreasing; that
    they end at meta.json's rows is :meth:`_Part._check_arrays`'s)."""
    if not isinstance(rec, dict):
        return [f"the top level is a {type(rec).__name__}, not a mapping"]
    ids, offsets = rec.get("ids"), rec.get("offsets")
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        return ["ids: expected a list of record ids (strings)"]
    if not isinstance(offsets, list) or not all(_int(o, -(2**62)) for o in offsets):
        return ["offsets: expected a list of integers"]
    if len(offsets) != len(ids) + 1 or offsets[0] != 0:
        return [
            f"{len(ids)} ids and {len(offsets)} offsets from {offsets[:1]}: expected {len(ids) + 1} from 0"
        ]
    bad = next((i for i in range(len(ids)) if offsets[i + 1] < offsets[i]), None)
    if bad is not None:
        return [
            f"offsets[{bad + 1}] = {offsets[bad + 1]} < offsets[{bad}] = {offsets[bad]} (record {ids[bad]!r})"
        ]
    return []


def _out_of_range(array: np.ndarray, vocab: int, chunk: int = 1 << 24) -> tuple[int, int] | None:
    """(row, value) of the first vocabulary id outside [0, vocab) in ``array`` (R,) or (R, k), read in
    chunks of the memory map; None when all are in range."""
    flat = array.reshape(-1)
    width = array.shape[1] if array.ndim == 2 else 1
    for start in range(0, flat.shape[0], chunk):
        part = flat[start : start + chunk]
        bad = np.flatnonzero((part < 0) | (part >= vocab))
        if bad.size:
            i = start + int(bad[0])
            return i // width, int(flat[i])
    return None


class _Part:
    """One finished cache directory (the whole cache, or one shard of it), memory-mapped and checked:
    a damaged or edited file is refused, naming it, before any model is loaded."""

    def __init__(self, path: Path):
        self.path = path
        meta_path = path / "meta.json"
        if not meta_path.is_file():
            partial = (path / "progress.json").is_file()
            hint = " (a build was started but not finished: run it again to continue)" if partial else ""
            raise TeacherCacheError(f"distill.teacher_cache: no finished teacher cache at {path}{hint}")
        self.meta = _read_json(meta_path)
        if isinstance(self.meta, dict) and self.meta.get("format") != FORMAT:
            raise TeacherCacheError(
                f"{meta_path}: format {self.meta.get('format')!r}, this tpkit reads {FORMAT}"
            )
        if problems := _meta_problems(self.meta):
            raise TeacherCacheError(f"{meta_path}: {'; '.join(problems)}{_REBUILD}")
        rows, k = self.meta["rows"], self.meta["k"]
        rec_path = path / "records.json"
        rec = _read_json(rec_path)
        if problems := _records_problems(rec):
            raise TeacherCacheError(f"{rec_path}: {'; '.join(problems)}{_REBUILD}")
        self.ids = rec["ids"]
        self.offsets = np.asarray(rec["offsets"], dtype=np.int64)  # (n + 1,)
        self._check_arrays(rows, k)
        self.values = np.memmap(
            path / "values.bin", dtype=np.dtype(self.meta["dtype"]), mode="r", shape=(rows, k)
        )
        self.indices = (
            None
            if self.meta["full_vocab"]
            else np.memmap(path / "indices.bin", dtype=np.int32, mode="r", shape=(rows, k))
        )
        self.lse = np.memmap(path / "lse.bin", dtype=np.float32, mode="r", shape=(rows,))
        self.targets = np.memmap(path / "targets.bin", dtype=np.int32, mode="r", shape=(rows,))
        self._check_ids()

    def _check_ids(self) -> None:
        """Every stored vocabulary id (targets, top-k indices) is one of the model's: an id out of range
        would be read as another token, or fail deep inside a training step."""
        vocab = self.meta["model"]["vocab_size"]
        if self.meta["full_vocab"] and self.meta["k"] != vocab:
            raise TeacherCacheError(
                f"{self.path / 'meta.json'}: full_vocab with k = {self.meta['k']}, but the model's vocabulary "
                f"has {vocab} ids{_REBUILD}"
            )
        arrays = {"targets.bin": self.targets} | (
            {} if self.indices is None else {"indices.bin": self.indices}
        )
        for name, array in arrays.items():
            if (bad := _out_of_range(array, vocab)) is not None:
                raise TeacherCacheError(
                    f"{self.path / name}: row {bad[0]} holds vocabulary id {bad[1]}, outside [0, {vocab}) "
                    f"(the model's vocabulary){_REBUILD}"
                )

    def _check_arrays(self, rows: int, k: int) -> None:
        """The arrays hold what ``meta.json`` and ``records.json`` say (an edited ``k`` or a cut file
        would otherwise be read as other rows, silently)."""
        problems = []
        if self.offsets[-1] != rows:
            problems.append(
                f"records.json: {len(self.ids)} ids and offsets up to {self.offsets[-1]}, meta.json: {rows} rows"
            )
        if self.meta["records"] != len(self.ids):
            problems.append(f"meta.json: {self.meta['records']} records, records.json: {len(self.ids)}")
        files = {
            "values.bin": rows * k * np.dtype(self.meta["dtype"]).itemsize,
            "lse.bin": rows * 4,
            "targets.bin": rows * 4,
        }
        if not self.meta["full_vocab"]:
            files["indices.bin"] = rows * k * 4
        for name, size in files.items():
            f = self.path / name
            have = f.stat().st_size if f.is_file() else None
            if have != size:
                problems.append(
                    f"{name}: {have if have is not None else 'missing'} bytes, meta.json "
                    f"(rows={rows}, k={k}, dtype={self.meta['dtype']}) needs {size}"
                )
        if problems:
            raise TeacherCacheError(
                f"teacher cache {self.path} is inconsistent: "
                + "; ".join(problems)
                + ". Rebuild it: tpkit teacher-cache --config <the run's config> --out <dir>"
            )


# what every shard of one cache must agree on
_SHARED_META = (
    "format",
    "model",
    "temperature",
    "max_length",
    "train_json",
    "top_k",
    "k",
    "full_vocab",
    "dtype",
)


def shard_dir(out: Path, shard: int, num_shards: int) -> Path:
    return out / f"shard-{shard:05d}-of-{num_shards:05d}"


class TeacherCache:
    """Read side: memory-mapped arrays, rows looked up by record id and answer rank.

    ``path`` is a cache directory, or a directory of shards built with ``--shard i/N`` (all N must be
    finished); a record is looked up in whichever shard holds it.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        shards = sorted(self.path.glob("shard-*-of-*"))
        if (self.path / "meta.json").is_file() or (self.path / "progress.json").is_file() or not shards:
            self.parts = [_Part(self.path)]
        else:
            n = int(shards[0].name.rsplit("-", 1)[1])
            expected = [shard_dir(self.path, i, n) for i in range(n)]
            missing = [p.name for p in expected if not p.is_dir()]
            if missing or len(shards) != n:
                raise TeacherCacheError(
                    f"teacher cache {self.path}: expected the {n} shards {expected[0].name} .. "
                    f"{expected[-1].name}; missing {missing[:3]}, found {[p.name for p in shards][:4]}"
                )
            self.parts = [_Part(p) for p in expected]
            for part in self.parts[1:]:
                diff = [k for k in _SHARED_META if part.meta.get(k) != self.parts[0].meta.get(k)]
                if diff:
                    raise TeacherCacheError(f"{part.path} was built differently from {expected[0]}: {diff}")
        self.meta = self.parts[0].meta
        self.row_of: dict[str, tuple[int, int]] = {}
        for p, part in enumerate(self.parts):
            for i, rid in enumerate(part.ids):
                if rid in self.row_of:
                    raise TeacherCacheError(f"teacher cache {self.path}: record id {rid!r} is cached twice")
                self.row_of[rid] = (p, i)

    def check(self, model: torch.nn.Module, temperature: float, max_length: int) -> None:
        """Refuse a cache made for another teacher, temperature or ``max_length`` (naming what differs)."""
        problems = _fingerprint_diff(self.meta["model"], model_fingerprint(model))
        if float(self.meta["temperature"]) != float(temperature):
            problems.append(
                f"temperature: {self.meta['temperature']} (cache) vs {temperature} (distill.temperature)"
            )
        if int(self.meta["max_length"]) != int(max_length):
            problems.append(
                f"max_length: {self.meta['max_length']} (cache) vs {max_length} (data.max_length)"
            )
        if problems:
            raise TeacherCacheError(
                f"teacher cache {self.path} does not fit this run: "
                + "; ".join(problems)
                + ". Rebuild it: tpkit teacher-cache --config <this config> --out <dir>"
            )

    def lookup(
        self,
        ids: list[str],
        dense_counts: torch.Tensor,
        rows_b: torch.Tensor,
        ranks: torch.Tensor,
        device: Any,
    ) -> TeacherRows:
        """Rows for a batch: ``ids`` (B,) record ids; ``dense_counts`` (B,) answer rows of each record in
        the batch's (unpruned) labels; ``rows_b`` (N,) / ``ranks`` (N,) sample and answer rank of each
        student row."""
        part_of = np.empty(len(ids), dtype=np.int64)
        starts = np.empty(len(ids), dtype=np.int64)
        counts = dense_counts.tolist()
        for b, rid in enumerate(ids):
            hit = self.row_of.get(str(rid))
            if hit is None:
                raise TeacherCacheError(
                    f"record id {rid!r} is not in the teacher cache {self.path} (built from other data?)"
                )
            part = self.parts[hit[0]]
            have = int(part.offsets[hit[1] + 1] - part.offsets[hit[1]])
            if have != counts[b]:
                raise TeacherCacheError(
                    f"record id {rid!r}: {counts[b]} answer tokens in this batch, {have} in the teacher cache "
                    f"{self.path}: the data, tokenizer or max_length changed since the cache was built"
                )
            part_of[b], starts[b] = hit[0], part.offsets[hit[1]]
        rb = rows_b.cpu().numpy()
        sel = starts[rb] + ranks.cpu().numpy()  # (N,) row in its part
        pr = part_of[rb]  # (N,) part of each row
        n, k = len(sel), int(self.meta["k"])
        values = np.empty((n, k), dtype=np.float32)
        indices = None if self.meta["full_vocab"] else np.empty((n, k), dtype=np.int64)
        lse = np.empty(n, dtype=np.float32)
        targets = np.empty(n, dtype=np.int64)
        for p in np.unique(pr):
            where = np.nonzero(pr == p)[0]
            order = where[np.argsort(sel[where], kind="stable")]  # memmap reads in file order
            rows, part = sel[order], self.parts[p]
            values[order] = part.values[rows]
            if indices is not None:
                indices[order] = part.indices[rows]
            lse[order] = part.lse[rows]
            targets[order] = part.targets[rows]
        if indices is None:
            indices_t = torch.arange(k, device=device).expand(n, -1)
        else:
            indices_t = torch.from_numpy(indices).to(device)
        return TeacherRows(
            torch.from_numpy(values).to(device),
            indices_t,
            torch.from_numpy(lse).to(device),
            torch.from_numpy(targets).to(device),
        )


def answer_ranks(
    labels: torch.Tensor, rows_b: torch.Tensor, orig: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dense answer rows per sample (B,), rank of each student row among its sample's (N,)).

    labels: (B, T) unshifted (:func:`tpkit.training.losses.answer_positions`); rows_b / orig: sample
    and original position of each student row.
    """
    dense = answer_positions(labels)
    rank = dense.long().cumsum(1) - 1  # (B, T)
    return dense.sum(1), rank[rows_b, orig]
