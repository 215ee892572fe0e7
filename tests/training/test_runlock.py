"""One live run per out_dir: two runs started together into one directory, a resume of a live run, a
lock left by a killed run (taken over, said), a lock from another machine (refused, with what to do)."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tpkit.cli import main
from tpkit.training.runlock import LOCK, RunLockedError, owner_process, run_lock

from .conftest import tiny_cfg_dict

ROOT = Path(__file__).resolve().parents[2]


def _dead_pid() -> int:
    return int(
        subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True).stdout
    )


def _held_elsewhere(out: Path) -> subprocess.Popen:
    """Another process that holds ``out``'s lock until it is killed."""
    code = (
        "import sys, time\nfrom tpkit.training.runlock import run_lock\n"
        f"with run_lock({str(out)!r}, 'tpkit train --config other.yaml'):\n"
        "    print('held', flush=True)\n    time.sleep(60)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_live_lock_is_refused_naming_its_owner_and_given_back_on_any_exit(tmp_path):
    out = tmp_path / "run"
    other = _held_elsewhere(out)
    try:
        with pytest.raises(RunLockedError) as e, run_lock(out):
            pass
        msg = str(e.value)
        assert f"is in use by a live run: pid {other.pid} on {socket.gethostname()}, started " in msg
        assert "`tpkit train --config other.yaml`" in msg and f"`kill {other.pid}`" in msg
    finally:
        other.kill()
        other.wait()
    # the holder was killed (-9): its file stays, its kernel lock does not; the next run takes over
    with run_lock(out) as note:
        assert f"{out / LOCK} was left by a run that no longer runs (pid {other.pid} on " in note
        assert json.loads((out / LOCK).read_text())["pid"] == os.getpid()
        with run_lock(out) as inner:  # re-entrant: the command line and fit() both hold it
            assert inner is None
        assert (out / LOCK).exists()
    assert not (out / LOCK).exists()
    with pytest.raises(ZeroDivisionError), run_lock(out):
        raise ZeroDivisionError
    assert not (out / LOCK).exists()  # given back on an exception


def test_a_lock_taken_but_not_yet_written_is_named_once_its_owner_writes_itself_in(tmp_path):
    """A starting run takes the kernel lock, then writes itself in: a run refused in between waits for
    the name (up to 2 s) instead of saying "no owner"; a lock that stays empty is refused as starting."""
    import fcntl
    import threading

    out = tmp_path / "run"
    out.mkdir()
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another open file: flock refuses run_lock's
    try:
        with pytest.raises(RunLockedError, match="names no owner yet: it is starting"), run_lock(out):
            pass
        owner = {"pid": 4242, "host": socket.gethostname(), "started": "?", "command": "tpkit train"}
        writer = threading.Timer(0.3, lambda: os.pwrite(fd, json.dumps(owner).encode(), 0))
        writer.start()
        with pytest.raises(RunLockedError, match="in use by a live run: pid 4242 on"), run_lock(out):
            pass
        writer.join()
    finally:
        os.close(fd)


def test_sigterm_outside_training_gives_the_lock_back(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e, run_lock(out):
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises here
    assert e.value.code == 128 + signal.SIGTERM
    assert not (out / LOCK).exists() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_lock_from_another_machine_or_a_dead_pid(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    owner = {
        "pid": 4242,
        "host": "gpu-node-7",
        "started": "2026-01-01T00:00:00+00:00",
        "command": "tpkit train",
    }
    (out / LOCK).write_text(json.dumps(owner))
    with pytest.raises(RunLockedError) as e, run_lock(out):
        pass
    assert (
        "is locked by a run on another machine: pid 4242 on gpu-node-7, started 2026-01-01T00:00:00+00:00"
        in str(e.value)
    )
    assert f"if it no longer runs, remove {out / LOCK} and run again" in str(e.value)
    assert json.loads((out / LOCK).read_text()) == owner  # untouched
    dead = _dead_pid()
    (out / LOCK).write_text(json.dumps({**owner, "pid": dead, "host": socket.gethostname()}))
    with run_lock(out) as note:
        assert f"was left by a run that no longer runs (pid {dead} on {socket.gethostname()}" in note
    assert not (out / LOCK).exists()


def test_only_the_process_that_started_a_ddp_run_takes_the_lock(tmp_path, monkeypatch):
    assert owner_process()
    monkeypatch.setenv("LOCAL_RANK", "1")  # what Lightning's launcher sets for rank 1
    assert not owner_process()
    other = _held_elsewhere(tmp_path / "run")
    try:
        with run_lock(tmp_path / "run") as note:  # a rank inside the run: never refused, never writes
            assert note is None
    finally:
        other.kill()
        other.wait()


def test_a_refused_run_leaves_no_directory(train_json, tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(tiny_cfg_dict(train_json, tmp_path / "new")))
    assert main(["train", "--config", str(cfg), "--resume"]) == 2
    assert "no checkpoint at" in capsys.readouterr().err and not (tmp_path / "new").exists()


@pytest.mark.slow
def test_two_runs_started_together_into_one_out_dir(train_json, processor, tmp_path, capsys):
    """Both exited 0 before, the first run silently lost, metrics.csv mixing both: now one trains and
    the other is refused at once, naming it; a --resume while it trains is refused too."""
    processor.save_pretrained(str(tmp_path / "proc"))
    trainer = {"max_steps": 2, "export_at_end": True, "logger": "csv", "log_every_n_steps": 1}
    d = tiny_cfg_dict(train_json, tmp_path / "run", trainer=trainer)
    d["model"]["processor_path"] = str(tmp_path / "proc")
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(d))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "tpkit", "train", "--config", "cfg.yaml"]
    runs = [
        subprocess.Popen(
            cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    try:
        t0 = time.monotonic()
        while not (tmp_path / "run" / LOCK).exists():
            assert all(r.poll() is None for r in runs) and time.monotonic() - t0 < 120
            time.sleep(0.05)
        owner = json.loads((tmp_path / "run" / LOCK).read_text())
        (winner,) = [r for r in runs if r.pid == owner["pid"]]
        capsys.readouterr()
        assert main(["train", "--config", str(tmp_path / "cfg.yaml"), "--resume"]) == 2
        if winner.poll() is None:  # it still trained after the refusal: so it did during it
            assert f"is in use by a live run: pid {winner.pid}" in capsys.readouterr().err
        results = {r.pid: (r.wait(timeout=300), *r.communicate()) for r in runs}
    finally:
        for r in runs:
            if r.poll() is None:
                r.kill()
    rc, out, _ = results.pop(winner.pid)
    assert rc == 0 and "done: step 2" in out
    ((rc, out, err),) = results.values()
    assert rc == 2 and f"is in use by a live run: pid {winner.pid} on {socket.gethostname()}" in err
    assert "Traceback" not in err and "done" not in out
    (log,) = (tmp_path / "run" / "logs").glob("version_*/metrics.csv")  # one run's log
    with open(log) as f:
        assert [row["step"] for row in csv.DictReader(f)] == ["0", "1"]
    assert torch.load(tmp_path / "run" / "last.ckpt", weights_only=True)["global_step"] == 2
    assert not (tmp_path / "run" / LOCK).exists()
