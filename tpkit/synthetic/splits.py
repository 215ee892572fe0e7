"""Split files of the synthetic benchmark: ``<dir>/<split>.json`` (LLaVA records) and
``<dir>/images/<split>/*.png``, with ``<split>.meta.json`` recording what wrote them.

    tpkit data synthetic --out runs/data/synthetic                 # the demo's train, val and test splits
    tpkit data synthetic --out outputs/synth --split test --n 300 --seed 0 --turns 3
    tpkit data synthetic --bench 5000                              # images/s of sample_batch on one core
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from PIL import Image

from tpkit.synthetic.questions import make_record
from tpkit.synthetic.scenes import SPLITS, SyntheticConfig, sample_batch

__all__ = ["FORMAT", "generate_split", "ensure_split", "bench"]

# the records' layout: 2 added ``named_objects``; a split written in another format is written again
FORMAT = 2


def _make_and_save(args: tuple[int, str, int, SyntheticConfig, str]) -> dict[str, Any]:
    index, split, seed, cfg, out_dir = args
    record, image = make_record(index, split, seed, cfg)
    Image.fromarray(image).save(Path(out_dir) / record["image"], format="PNG")
    return record


def _split_meta(split: str, n: int, seed: int, cfg: SyntheticConfig) -> dict[str, Any]:
    """What ``<split>.meta.json`` records: enough to tell whether a split on disk is the one asked for."""
    return {"format": FORMAT, "split": split, "n": n, "seed": seed, "config": dataclasses.asdict(cfg)}


def generate_split(
    out_dir: str | Path,
    split: str = "train",
    n: int = 1000,
    seed: int = 0,
    cfg: SyntheticConfig | None = None,
    turns: int | None = None,
    workers: int = 1,
    progress: bool = False,
) -> Path:
    """Write ``out_dir/<split>.json`` (a list of LLaVA records) and ``out_dir/images/<split>/*.png``.

    Also writes ``out_dir/<split>.meta.json`` (config, seed, n). Returns the JSON path. Output is
    byte-identical for the same arguments, whatever ``workers``.
    """
    if split not in SPLITS:
        raise ValueError(f"split = {split!r} is not one of {list(SPLITS)}")
    if n < 1:
        raise ValueError(f"n = {n} must be >= 1")
    cfg = cfg or SyntheticConfig.for_split(split)
    if turns is not None:
        cfg = dataclasses.replace(cfg, turns=turns)
    cfg.validate()
    out_dir = Path(out_dir)
    (out_dir / "images" / split).mkdir(parents=True, exist_ok=True)
    jobs = [(i, split, seed, cfg, str(out_dir)) for i in range(n)]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n, desc=f"synthetic {split}", unit="img")
    records: list[dict[str, Any]] = []
    if workers > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(workers) as pool:
            for r in pool.imap(_make_and_save, jobs, chunksize=64):
                records.append(r)
                if bar is not None:
                    bar.update()
    else:
        for job in jobs:
            records.append(_make_and_save(job))
            if bar is not None:
                bar.update()
    if bar is not None:
        bar.close()
    json_path = out_dir / f"{split}.json"
    json_path.write_text(json.dumps(records, indent=1) + "\n")
    (out_dir / f"{split}.meta.json").write_text(json.dumps(_split_meta(split, n, seed, cfg), indent=1) + "\n")
    return json_path


def ensure_split(
    out_dir: str | Path,
    split: str,
    n: int,
    seed: int,
    cfg: SyntheticConfig | None = None,
) -> Path:
    """``out_dir/<split>.json`` as ``generate_split`` would write it, reusing an existing copy.

    A split that this module wrote (it has ``<split>.meta.json``) is reused only if it was written
    with the same ``n``, ``seed`` and generator config; otherwise it is written again (its images
    first removed), with a note on stderr naming what changed -- a config that asks for 8,000
    training records never trains on the 2,000 left by an earlier run. A JSON file without that
    meta file is someone's own data and is returned untouched.
    """
    out_dir = Path(out_dir)
    json_path = out_dir / f"{split}.json"
    meta_path = out_dir / f"{split}.meta.json"
    cfg = cfg or SyntheticConfig.for_split(split)
    if json_path.exists():
        if not meta_path.is_file():
            return json_path
        try:
            old = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError):
            old = {}
        want = json.loads(json.dumps(_split_meta(split, n, seed, cfg)))  # as read back: tuples -> lists
        changed = [k for k in ("format", "n", "seed", "config") if old.get(k) != want[k]]
        if not changed:
            return json_path
        diff = ", ".join(
            f"{k} {old.get(k)!r} -> {want[k]!r}" if k != "config" else "generator config" for k in changed
        )
        print(f"note: rewriting {json_path} ({diff})", file=sys.stderr, flush=True)
        shutil.rmtree(out_dir / "images" / split, ignore_errors=True)
    return generate_split(out_dir, split=split, n=n, seed=seed, cfg=cfg)


def bench(n: int, seed: int) -> int:
    """Print sample_batch's rate (wall clock and per CPU-second of this process) on ``n`` images."""
    sample_batch(16, seed)  # warm the caches (masks, texture banks)
    wall, cpu = time.perf_counter(), time.process_time()
    sample_batch(n, seed)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(
        f"sample_batch: {n} images in {wall:.2f} s = {n / wall:.0f} images/s ({n / cpu:.0f} per CPU-second)"
    )
    return 0
