"""Teacher cache: the unpruned teacher's answer-token logits, computed once, read by every KD step.

The teacher is the base model with the adapter off and the pruner off: a fixed function of each
training record. Online distillation pays its dense forward on every step, which costs about as much
as the pruned student's whole step (``benchmarks/train_step.py``). A cache pays it once per record, in
inference mode and at a large batch, and is shared by every run on the same base model and data —
a sweep over pruning budgets, alphas or LoRA ranks, and every later epoch::

    python -m tpkit.training.teacher_cache --config configs/X.yaml --out runs/teacher_cache [--top-k 64]
    python train.py --config configs/X.yaml --set distill.teacher_cache=runs/teacher_cache

On N GPUs, one process per GPU, each a shard (``--shard i/N`` writes ``DIR/shard-i-of-N``); training
reads the directory of shards as one cache::

    for i in $(seq 0 7); do CUDA_VISIBLE_DEVICES=$i python -m tpkit.training.teacher_cache \
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
build appends records in dataset order and records its progress, so an interrupted build continues.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tpkit.config import ConfigError, TrainConfig, load_config

__all__ = [
    "FORMAT",
    "TeacherCacheError",
    "TeacherCache",
    "TeacherRows",
    "model_fingerprint",
    "build_teacher_cache",
    "main",
]

FORMAT = 1
_VOLATILE_CONFIG_KEYS = {
    "_name_or_path",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "_attn_implementation",
}


class TeacherCacheError(ValueError):
    """The teacher cache is missing, unfinished, or does not fit the run or the data (message says which)."""


def model_fingerprint(model: torch.nn.Module) -> dict[str, Any]:
    """What identifies the teacher: its config (less dtype/paths) and checksums of two weight matrices.

    The sums are float64 over the weights rounded to bfloat16, so a cache built in one dtype or on one
    device is recognised in another (compared with a relative tolerance); LoRA never touches the
    embeddings or ``lm_head``.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = {k: v for k, v in base.config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    for sub in ("text_config", "vision_config"):
        if isinstance(cfg.get(sub), dict):
            cfg[sub] = {k: v for k, v in cfg[sub].items() if k not in _VOLATILE_CONFIG_KEYS}
    blob = json.dumps(cfg, sort_keys=True, default=str).encode()
    emb = base.get_input_embeddings().weight
    head = base.get_output_embeddings().weight
    return {
        "class": type(base).__name__,
        "config_sha256": hashlib.sha256(blob).hexdigest(),
        "embed_sum": float(emb.detach().to(torch.bfloat16).double().sum()),
        "lm_head_sum": float(head.detach().to(torch.bfloat16).double().sum()),
        "vocab_size": int(head.shape[0]),
    }


def _fingerprint_diff(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    out = []
    for k in sorted(set(saved) | set(now)):
        a, b = saved.get(k), now.get(k)
        if isinstance(a, float) and isinstance(b, float):
            if abs(a - b) > 1e-6 * max(1.0, abs(a), abs(b)):
                out.append(f"{k}: {a!r} (cache) vs {b!r} (model)")
        elif a != b:
            out.append(f"{k}: {a!r} (cache) vs {b!r} (model)")
    return out


@dataclass
class TeacherRows:
    """Teacher rows for the N answer rows of a batch (in ``mask.nonzero()`` order)."""

    values: torch.Tensor  # (N, k) logits
    indices: torch.Tensor  # (N, k) vocabulary ids
    lse: torch.Tensor  # (N,) logsumexp(logits / temperature) over the vocabulary
    targets: torch.Tensor  # (N,) the answer token each row predicts


class _Part:
    """One finished cache directory (the whole cache, or one shard of it), memory-mapped."""

    def __init__(self, path: Path):
        self.path = path
        meta_path = path / "meta.json"
        if not meta_path.is_file():
            partial = (path / "progress.json").is_file()
            hint = " (a build was started but not finished: run it again to continue)" if partial else ""
            raise TeacherCacheError(f"distill.teacher_cache: no finished teacher cache at {path}{hint}")
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("format") != FORMAT:
            raise TeacherCacheError(
                f"{meta_path}: format {self.meta.get('format')!r}, this tpkit reads {FORMAT}"
            )
        rec = json.loads((path / "records.json").read_text())
        self.ids = rec["ids"]
        self.offsets = np.asarray(rec["offsets"], dtype=np.int64)  # (n + 1,)
        rows, k = int(self.meta["rows"]), int(self.meta["k"])
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


def _shard_dir(out: Path, shard: int, num_shards: int) -> Path:
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
            expected = [_shard_dir(self.path, i, n) for i in range(n)]
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
                + ". Rebuild it: python -m tpkit.training.teacher_cache --config <this config> --out <dir>"
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

    labels: (B, T) unshifted; position t predicts an answer token when ``labels[:, t + 1] != -100``.
    rows_b / orig: sample and original position of each student row.
    """
    from tpkit.training.losses import IGNORE_INDEX

    dense = torch.zeros_like(labels, dtype=torch.bool)
    dense[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    rank = dense.long().cumsum(1) - 1  # (B, T)
    return dense.sum(1), rank[rows_b, orig]


# --------------------------------------------------------------------------------------------
# Build


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
    from collections import Counter

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
    from tqdm import tqdm

    from tpkit.data.collator import LlavaCollator
    from tpkit.training.losses import IGNORE_INDEX
    from tpkit.training.run import build_datamodule, build_processor_for

    index, num_shards = shard
    if not 0 <= index < num_shards:
        raise TeacherCacheError(f"shard {index}/{num_shards}: need 0 <= i < n")
    out = Path(out) if num_shards == 1 else _shard_dir(Path(out), index, num_shards)
    if (out / "meta.json").is_file():
        raise TeacherCacheError(f"{out} already holds a finished teacher cache; remove it to rebuild")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if processor is None:
        processor = build_processor_for(cfg)
    if dataset is None:
        dm = build_datamodule(cfg, processor)
        dm.setup("fit")
        dataset = dm.train_dataset
    if base is None:
        from tpkit.training.modeling import load_base_model, resolve_dtype

        base = load_base_model(
            cfg.model, dtype=resolve_dtype(cfg.model.dtype, dev.type == "cuda"), processor=processor
        )
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
    collate = LlavaCollator(processor, max_length=cfg.data.max_length, mode="train")
    bs = batch_size or cfg.data.eval_batch_size
    mine = range(index, len(dataset), num_shards)
    start = len(writer.ids)
    # collation (image decoding and preprocessing) in worker processes, overlapping the teacher
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, list(mine[start:])),
        batch_size=bs,
        shuffle=False,
        collate_fn=collate,
        num_workers=cfg.data.num_workers if workers is None else workers,
        pin_memory=dev.type == "cuda",
    )
    dtype_in = next(base.parameters()).dtype
    bar = tqdm(total=len(mine), initial=start, desc="teacher cache", unit="rec", disable=not progress)
    last_commit = time.monotonic()
    for batch in loader:
        labels = batch["labels"]
        dense = torch.zeros_like(labels, dtype=torch.bool)
        dense[:, :-1] = labels[:, 1:] != IGNORE_INDEX  # (B, T): positions that predict an answer token
        positions = dense.any(0).nonzero()[:, 0]  # (P,) union over the batch
        logits = base(
            input_ids=batch["input_ids"].to(dev, non_blocking=True),
            pixel_values=batch["pixel_values"].to(dev, dtype=dtype_in, non_blocking=True),
            attention_mask=batch["attention_mask"].to(dev, non_blocking=True),
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m tpkit.training.teacher_cache",
        description="Precompute the unpruned teacher's answer-token logits for distill.teacher_cache.",
    )
    ap.add_argument("--config", required=True, help="the training YAML (model, data, distill.temperature)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.SUB=VALUE")
    ap.add_argument("--out", required=True, help="cache directory (an unfinished build there continues)")
    ap.add_argument(
        "--top-k", type=int, default=0, help="logits kept per row; 0 = the whole vocabulary (exact)"
    )
    ap.add_argument("--batch-size", type=int, default=None, help="default: data.eval_batch_size")
    ap.add_argument("--dtype", choices=["float32", "float16"], default="float32", help="stored logits")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument(
        "--workers", type=int, default=None, help="collation processes (default: data.num_workers)"
    )
    ap.add_argument(
        "--shard", default="0/1", metavar="I/N", help="build records I, I+N, ... only (one process per GPU)"
    )
    args = ap.parse_args(argv)
    if args.top_k < 0:
        ap.error("--top-k must be >= 0")
    try:
        shard = tuple(int(x) for x in args.shard.split("/"))
        assert len(shard) == 2 and 0 <= shard[0] < shard[1]
    except (ValueError, AssertionError):
        ap.error(f"--shard {args.shard!r}: expected I/N with 0 <= I < N, e.g. 3/8")
    try:
        cfg = load_config(TrainConfig, args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        out = build_teacher_cache(
            cfg,
            args.out,
            top_k=args.top_k,
            batch_size=args.batch_size,
            dtype=args.dtype,
            device=args.device,
            shard=shard,
            workers=args.workers,
        )
    except TeacherCacheError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    meta = json.loads((out / "meta.json").read_text())
    size = sum(f.stat().st_size for f in out.iterdir())
    print(
        f"teacher cache: {meta['records']} records, {meta['rows']} answer rows, k={meta['k']}, {size / 1e6:.1f} MB in {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
