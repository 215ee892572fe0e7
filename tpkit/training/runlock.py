"""One live run per ``trainer.out_dir``: the lock file ``out_dir/run.lock``.

A run takes the lock before it writes anything into ``out_dir`` and gives it back on every way out
(return, exception, Ctrl-C, SIGTERM); a second ``tpkit train`` into the same directory, or a
``--resume`` of a run that still trains, is refused at once, naming the owner. The file says who
owns it (pid, host, start time, command); the kernel lock on it (``flock``) says whether the owner
still lives, so a lock left by a killed run (kill -9, a node that went down) is noticed, reported and
taken over. A lock written on another machine (a shared filesystem) is refused with what to do: this
machine cannot tell whether that run still runs.

Under DDP only the launching process (rank 0 of node 0) takes the lock; the other ranks run inside
its run and never touch the file (:func:`owner_process`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import json
import os
import shlex
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # not a POSIX system: the owner's pid is all there is to go by
    fcntl = None  # type: ignore[assignment]

from tpkit.training.rundir import RunDirError, alive

__all__ = ["LOCK", "RunLockedError", "owner_process", "run_lock"]

LOCK = "run.lock"

# launchers' rank variables (Lightning, torchrun, SLURM, LSF): set and non-zero in every process but
# the one that started the run
_RANK_VARS = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")


class RunLockedError(RunDirError):
    """``out_dir`` belongs to another live run (or to one on another machine); the message names it."""


def owner_process() -> bool:
    """Whether this process is the one that owns a run's directory: rank 0 of node 0 (every process
    of a single-process run)."""
    return all(os.environ.get(v, "0").strip() in ("", "0") for v in _RANK_VARS)


def _describe(owner: dict[str, Any]) -> str:
    started = owner.get("started", "?")
    try:
        age = dt.datetime.now(dt.timezone.utc) - dt.datetime.fromisoformat(started)
        started = f"{started} ({int(age.total_seconds() // 60)} min ago)"
    except (TypeError, ValueError):
        pass
    return f"pid {owner.get('pid')} on {owner.get('host')}, started {started}: `{owner.get('command', '?')}`"


def _read(fd: int) -> dict[str, Any] | None:
    """The owner written in the lock file (None: empty, or not a tpkit lock)."""
    try:
        raw = os.pread(fd, 1 << 16, 0)
        owner = json.loads(raw.decode()) if raw.strip() else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return owner if isinstance(owner, dict) else None


def _owner_once_written(fd: int, wait_s: float = 2.0) -> dict[str, Any] | None:
    """The owner of a lock that a starting run holds but has not yet written (it takes the kernel
    lock first, then writes itself in): read again for up to ``wait_s``, so the refusal can name it."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        time.sleep(0.02)
        owner = _read(fd)
        if owner is not None:
            return owner
    return None


def _flock(fd: int) -> bool | None:
    """Take the kernel lock without waiting: True taken, False held by a live process, None when the
    filesystem has no such locks (then the owner's pid is all there is to go by)."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        return None
    return True


class _Lock:
    def __init__(self, out: Path, command: str) -> None:
        self.path = out / LOCK
        self.command = command
        self.fd: int | None = None
        self.created = False
        self.depth = 0
        self._previous_sigterm: Any = None

    def refusal(self, owner: dict[str, Any] | None, other_host: bool = False) -> str:
        out = self.path.parent
        if owner is None:
            return (
                f"trainer.out_dir {str(out)!r} is in use by another run (its lock {self.path} names no owner "
                "yet: it is starting). Wait for it to end, or choose another trainer.out_dir"
            )
        if other_host:
            return (
                f"trainer.out_dir {str(out)!r} is locked by a run on another machine: {_describe(owner)}. "
                f"This machine cannot tell whether it still runs: if it does, wait for it or stop it there; "
                f"if it no longer runs, remove {self.path} and run again"
            )
        return (
            f"trainer.out_dir {str(out)!r} is in use by a live run: {_describe(owner)}. Wait for it to end, "
            f"or stop it (Ctrl-C or `kill {owner.get('pid')}`: it saves a checkpoint) and continue it with "
            "--resume; or choose another trainer.out_dir"
        )

    def acquire(self) -> str | None:
        """Take the lock; returns a note when a stale lock was taken over, raises RunLockedError when
        another run holds it."""
        self.created = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        host = socket.gethostname()
        for _ in range(5):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            locked = _flock(fd)
            owner = _read(fd)
            if locked is False:
                owner = owner or _owner_once_written(fd)
                os.close(fd)
                raise RunLockedError(self.refusal(owner))
            try:  # the owner releases by unlinking the file: a lock on an unlinked file is no lock
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            if owner is not None and owner.get("host") != host:
                os.close(fd)
                raise RunLockedError(self.refusal(owner, other_host=True))
            if locked is None and owner is not None and alive(int(owner.get("pid", 0))):
                os.close(fd)
                raise RunLockedError(self.refusal(owner))
            mine = {
                "pid": os.getpid(),
                "host": host,
                "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "command": self.command,
            }
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(mine) + "\n").encode(), 0)
            os.fsync(fd)
            self.fd = fd
            self._on_sigterm()
            if owner is None:
                return None
            return f"note: {self.path} was left by a run that no longer runs ({_describe(owner)}): taken over"
        raise RunLockedError(f"{self.path}: could not take the lock (it kept changing hands); try again")

    def _on_sigterm(self) -> None:
        """SIGTERM ends the process through the normal exit path (as Ctrl-C does), so that the lock is
        given back; a handler someone else installed stays (training installs its own)."""
        if threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            self._previous_sigterm = signal.signal(signal.SIGTERM, _exit_on_sigterm)

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                self.path.unlink()  # before the kernel lock goes: see acquire's inode check
        os.close(self.fd)
        self.fd = None
        if self.created:  # a refused run leaves no empty directory behind
            with contextlib.suppress(OSError):
                self.path.parent.rmdir()
        if self._previous_sigterm is not None and threading.current_thread() is threading.main_thread():
            if signal.getsignal(signal.SIGTERM) is _exit_on_sigterm:
                signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


_HELD: dict[str, _Lock] = {}  # resolved out_dir -> the lock this process holds on it


@contextlib.contextmanager
def run_lock(out: str | os.PathLike, command: str | None = None) -> Iterator[str | None]:
    """Hold ``out``'s lock inside the block (re-entrant within a process; a no-op on the DDP ranks
    that do not own the run). Yields the note about a stale lock taken over (None: none); raises
    :class:`RunLockedError`, naming the owner, when another live run holds it."""
    if not owner_process():
        yield None
        return
    key = os.path.realpath(out)
    lock = _HELD.get(key)
    note = None
    if lock is None:
        lock = _Lock(
            Path(key), command or " ".join(map(shlex.quote, [Path(sys.argv[0]).name, *sys.argv[1:]]))
        )
        note = lock.acquire()
        _HELD[key] = lock
    lock.depth += 1
    try:
        yield note
    finally:
        lock.depth -= 1
        if lock.depth == 0:
            del _HELD[key]
            lock.release()
