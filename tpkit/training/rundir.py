"""The run directory (``trainer.out_dir``): what a run leaves there, when a new run may start there,
and which config changes ``--resume`` accepts.

The command line asks :func:`existing_run` and :func:`check_run_dir` before anything heavy is imported
(torch only to read a checkpoint, lazily).

A run is the directory's ``config.yaml``, ``last.ckpt``, ``export/`` (and the rest of
:data:`RUN_FILES`). A new run into a directory that holds one is refused, naming ``--resume`` and
``--overwrite``; ``--overwrite`` removes the old run's files first. ``--resume`` compares the config
the checkpoint was written with to this one: changes to what the run computes (model, data,
pruning, LoRA, loss, optimizer, seed, ...) are refused, naming the keys; the others (a longer
``max_steps``, logging, checkpoint cadence, workers, ...) are accepted and announced.
"""

from __future__ import annotations

import os
import pickle
import shutil
import sys
from pathlib import Path
from typing import Any

import yaml

from tpkit.config import ConfigError, from_dict, to_dict
from tpkit.training.config import TrainConfig

__all__ = [
    "CONFIG",
    "SKIPPED",
    "RUN_FILES",
    "RESUME_SAFE_KEYS",
    "RunDirError",
    "CheckpointError",
    "load_checkpoint",
    "check_run_dir",
    "existing_run",
    "new_run_refusal",
    "clear_run",
    "remove_stale_tmp",
    "resume_changes",
    "flat",
]

CONFIG = "config.yaml"  # the resolved config of the run (written once the run has started)
SKIPPED = "skipped_records.jsonl"  # every record the run skipped (data.on_error: skip), one per line
# what a run writes into out_dir (last.ckpt: tpkit.training.checkpoint.LAST; logs/tb: the loggers)
RUN_FILES = (CONFIG, "last.ckpt", "export", "processor", "logs", "tb", "wandb", "mlruns", SKIPPED)

# keys a resumed run may change: where and how fast it runs, what it logs and when it saves, not
# what it computes (a longer max_steps stretches the lr schedule from the resumed step on)
RESUME_SAFE_KEYS = (
    "trainer.max_steps",
    "trainer.max_epochs",
    "trainer.accelerator",
    "trainer.strategy",
    "trainer.deepspeed_stage",
    "trainer.gradient_checkpointing",
    "trainer.deterministic",
    "trainer.checkpoint_every_n_steps",
    "trainer.val_every_n_steps",
    "trainer.limit_val_batches",
    "trainer.log_every_n_steps",
    "trainer.logger",
    "trainer.log_version",
    "trainer.progress_bar",
    "trainer.export_at_end",
    "model.attn_implementation",
    "data.val_json",
    "data.test_json",
    "data.eval_batch_size",
    "data.num_workers",
    "data.check_images",
    "data.on_error",  # skip: get past a record that fails at batch time (the data order is the same)
)
# compared as files, not as strings ("data/x.json" and "./data/x.json" are one file)
_PATH_KEYS = (
    "model.path",
    "model.processor_path",
    "data.train_json",
    "data.image_folder",
    "distill.teacher_cache",
)


class RunDirError(ValueError):
    """``out_dir`` holds a run that this command would overwrite or mix with another (message says what to do)."""


class CheckpointError(ValueError):
    """A file that is not a readable tpkit checkpoint (the message names it and says why)."""


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint's contents (CPU), with ``weights_only`` unpickling: tensors and plain containers
    only, so a crafted file cannot run code. Memory-mapped: reading a few keys costs little."""
    import torch  # lazy: the command line checks a resume before the heavy imports

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path}: refused - it holds objects other than tensors and plain containers, which are not "
            f"loaded (weights_only): {first}. A tpkit checkpoint never does; was it made elsewhere?"
        ) from None
    except (RuntimeError, EOFError, OSError) as e:  # truncated, not a torch file
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or "state_dict" not in state:
        raise CheckpointError(f"{path}: not a training checkpoint (no state_dict)")
    return state


def existing_run(out: str | os.PathLike) -> list[str]:
    """The names of :data:`RUN_FILES` present in ``out`` (empty: no run there)."""
    d = Path(out)
    return [name for name in RUN_FILES if (d / name).exists()] if d.is_dir() else []


def new_run_refusal(out: str | os.PathLike, command: str = "tpkit train --config ...") -> str | None:
    """Why a new run may not start in ``out`` (it holds one), else None."""
    found = existing_run(out)
    if not found:
        return None
    return (
        f"trainer.out_dir {str(out)!r} already holds a run ({', '.join(found)}); a new run would overwrite it. "
        f"Continue it: `{command} --resume`; start over: the same with --overwrite (removes "
        f"{', '.join(found)}); or choose another trainer.out_dir"
    )


def clear_run(out: str | os.PathLike) -> list[str]:
    """Remove the run files of ``out`` (``--overwrite``); returns what was removed."""
    d = Path(out)
    removed = existing_run(d)
    for name in removed:
        p = d / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    return removed + [p.name for p in remove_stale_tmp(d, any_pid=True)]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_tmp(out: str | os.PathLike, any_pid: bool = False) -> list[Path]:
    """Remove the temporary checkpoint files (``.last.ckpt.tmp<PID>``) that a killed writer left in
    ``out``: those of processes that no longer run (``any_pid``: all). Returns the removed paths."""
    d = Path(out)
    removed = []
    for p in d.glob(".*.tmp*") if d.is_dir() else []:
        pid = p.name.rpartition(".tmp")[2]
        if pid.isdigit() and (any_pid or not _alive(int(pid))):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {dotted key: value}."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and key != "model.tiny":  # model.tiny is one value: kwargs
            out.update(flat(v, key + "."))
        else:
            out[key] = v
    return out


def _same(key: str, a: Any, b: Any) -> bool:
    if key in _PATH_KEYS and isinstance(a, str) and isinstance(b, str):
        return os.path.abspath(os.path.expanduser(a)) == os.path.abspath(os.path.expanduser(b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b


def resume_changes(saved: dict[str, Any], now: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(refused, accepted) changes from the config a run was started with (``saved``, a nested dict)
    to ``now``, each as ``"key: old -> new"``."""
    a, b = flat(saved), flat(now)
    refused, accepted = [], []
    for key in sorted(set(a) | set(b)):
        old, new = a.get(key, "(unset)"), b.get(key, "(unset)")
        if _same(key, old, new):
            continue
        change = f"{key}: {old!r} -> {new!r}"
        (accepted if key in RESUME_SAFE_KEYS else refused).append(change)
    return refused, accepted


def _saved_config(ckpt_state: dict, out: Path) -> dict | None:
    """The config a checkpoint was written with (older checkpoints: the run's config.yaml), with
    today's defaults for keys it predates."""
    saved = ckpt_state.get("tpkit_config")
    if saved is None and (out / CONFIG).is_file():
        saved = yaml.safe_load((out / CONFIG).read_text())
    if saved is None:
        return None
    try:
        return to_dict(from_dict(TrainConfig, saved))
    except ConfigError:
        return saved


def check_run_dir(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    rank0: bool = True,
    announce: bool = True,
) -> int | None:
    """Refuse what would overwrite a run or mix two (before any model work); returns the step a
    resumed run starts from (None: a new run). ``overwrite`` removes an old run's files first;
    ``rank0``: this process writes (removes, announces) for the run; ``announce``: say which safe
    changes a resume accepts."""
    out = Path(cfg.trainer.out_dir)
    ckpt = out / "last.ckpt"
    if resume and overwrite:
        raise RunDirError("--resume continues the run in trainer.out_dir, --overwrite removes it: give one")
    if not resume:
        if why := new_run_refusal(out):
            if not overwrite:
                raise RunDirError(why)
            if rank0:
                print(f"--overwrite: removed {', '.join(clear_run(out))} from {out}", file=sys.stderr)
        return None
    if not ckpt.is_file():
        raise RunDirError(
            f"--resume: no checkpoint at {ckpt} (a run writes it every trainer.checkpoint_every_n_steps); "
            "start the run without --resume"
        )
    state = load_checkpoint(ckpt)
    step = int(state.get("global_step", 0))
    saved = _saved_config(state, out)
    if saved is not None:
        refused, accepted = resume_changes(saved, to_dict(cfg))
        if refused:
            raise RunDirError(
                f"--resume: {ckpt} (step {step}) was trained with another config; these changes would make "
                "the resumed run not the run that was started:\n  " + "\n  ".join(refused) + "\nResume "
                "with the run's own values (they are in the checkpoint and in "
                f"{out / CONFIG}), or start a new run (--overwrite, or another trainer.out_dir)"
            )
        if cfg.trainer.max_steps <= step:
            raise RunDirError(
                f"--resume: {ckpt} is at step {step} and trainer.max_steps = {cfg.trainer.max_steps}: nothing "
                f"left to train (a longer run: --set trainer.max_steps=N with N > {step})"
            )
        if accepted and rank0 and announce:
            print(f"resuming from step {step} with changes: " + "; ".join(accepted), file=sys.stderr)
    if rank0:
        remove_stale_tmp(out)
    return step
