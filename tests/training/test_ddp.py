"""DDP on 2 CPU processes (gloo), as a subprocess script: both ranks end with the same weights."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def test_ddp_two_cpu_ranks_agree(train_json, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    for k in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR"):
        env.pop(k, None)
    cmd = [
        sys.executable,
        str(ROOT / "scripts" / "ddp_check.py"),
        "--out",
        str(tmp_path),
        "--data",
        str(train_json),
    ]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
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
