"""DDP on 2 CPU processes (gloo), as a subprocess script: both ranks end with the same weights."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _run(train_json: Path, out: Path, *extra: str) -> tuple[dict, dict]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    for k in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR"):
        env.pop(k, None)
    out.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        str(ROOT / "scripts" / "ddp_check.py"),
        "--out",
        str(out),
        "--data",
        str(train_json),
        *extra,
    ]
    proc = subprocess.run(cmd, env=env, cwd=out, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return (
        torch.load(out / "rank0.pt", weights_only=False),
        torch.load(out / "rank1.pt", weights_only=False),
    )


def _check_ranks_agree(r0: dict, r1: dict) -> None:
    assert r0["world_size"] == r1["world_size"] == 2
    # each rank trained on its own shard: 2 steps x batch 2, no record on both ranks
    ids0 = [i for b in r0["ids"] for i in b]
    ids1 = [i for b in r1["ids"] for i in b]
    assert len(ids0) == len(ids1) == 4 and not set(ids0) & set(ids1)
    assert r0["weights"].keys() == r1["weights"].keys()
    moved = 0
    for k, v in r0["weights"].items():
        torch.testing.assert_close(r1["weights"][k], v, rtol=0, atol=0, msg=k)
        moved += int("lora_B" in k and v.abs().sum() > 0)
    assert moved > 0  # gradients were all-reduced and applied


@pytest.fixture(scope="module")
def online(train_json, tmp_path_factory):
    return _run(train_json, tmp_path_factory.mktemp("ddp_online"))


def test_ddp_two_cpu_ranks_agree(online):
    _check_ranks_agree(*online)


def test_ddp_with_a_teacher_cache_trains_like_the_online_teacher(online, train_json, tmp_path):
    r0, r1 = _run(train_json, tmp_path / "run", "--teacher-cache", str(tmp_path / "cache"))
    _check_ranks_agree(r0, r1)
    assert r0["ids"] == online[0]["ids"]
    for k, v in online[0]["weights"].items():  # the cache holds the whole vocabulary: same KD
        torch.testing.assert_close(r0["weights"][k], v, rtol=1e-3, atol=1e-6, msg=k)
