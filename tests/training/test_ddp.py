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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]


@pytest.mark.parametrize("rank, sig", [(1, "SIGTERM"), (0, "SIGTERM"), (1, "SIGKILL")])
def test_a_signal_on_either_rank_stops_both(train_json, tmp_path, rank, sig):
    """Lightning's own handler ran a collective inside the signal handler: a SIGTERM that reached one
    rank hung both until the 30-minute gloo timeout. Now both stop at the next step boundary, with
    the checkpoint written by rank 0; a rank killed outright ends the other within seconds, which
    says how to resume, even when Lightning's process observer ends the run first."""
    import signal
    import time

    env = dict(os.environ, PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    for k in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR"):
        env.pop(k, None)
    # SIGKILL: rank 0 sleeps 8 s in each step, past Lightning's observer (it polls every 5 s), so the
    # observer, not a failed collective, ends the run: the path where only PeerExitNotice can speak
    step_s = "8" if sig == "SIGKILL" else "0.3"
    cmd = [sys.executable, str(ROOT / "scripts" / "ddp_check.py"), "--out", str(tmp_path), "--data", str(train_json),
           "--cli", "--steps", "40", "--step-seconds", step_s]  # fmt: skip
    proc = subprocess.Popen(
        cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        t0 = time.monotonic()
        after = tmp_path / ("step4" if sig == "SIGKILL" else "step2")  # SIGKILL: after the step-3 checkpoint
        while not ((tmp_path / "rank1.pid").exists() and after.exists()):
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() - t0 < 180, "the ranks did not start"
            time.sleep(0.1)
        pids = [int((tmp_path / f"rank{r}.pid").read_text()) for r in (0, 1)]
        os.kill(pids[rank], getattr(signal, sig))
        t_sig = time.monotonic()
        out, err = proc.communicate(timeout=120)
        while _alive(pids[1]) and time.monotonic() - t_sig < 60:  # rank 1 is rank 0's child
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            proc.kill()
        alive = [p for p in (int(f.read_text()) for f in tmp_path.glob("rank*.pid")) if _alive(p)]
        for pid in alive:  # never leave a hung rank behind
            os.kill(pid, signal.SIGKILL)
    assert not alive, "a rank still ran"
    assert time.monotonic() - t_sig < 60  # within seconds, not the 30-minute collective timeout
    ckpt = torch.load(tmp_path / "run" / "last.ckpt", map_location="cpu", weights_only=True)
    if sig == "SIGKILL":  # the observer ended rank 0 in its sleep, before any collective could fail
        assert proc.returncode not in (0, None) and "continue with: tpkit train --config" in err, err[-3000:]
        assert "terminated with code -9" in err and "stopping every rank" in err, err[-3000:]
        assert ckpt["global_step"] >= 3  # a periodic checkpoint, whole
        return
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "stopped by SIGTERM after step" in err and "--resume" in err
    step = int(err.split("stopped by SIGTERM after step ")[1].split(":")[0])
    assert ckpt["global_step"] == step and 2 <= step < 40
    assert not list((tmp_path / "run").glob(".last.ckpt.tmp*"))
