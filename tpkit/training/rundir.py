"""The run directory (``trainer.out_dir``): what a run leaves there, when a new run may start there,
and which config changes ``--resume`` accepts.

The command line asks :func:`existing_run` and :func:`check_run_dir` before anything heavy is imported
(torch only to read a checkpoint, lazily).

A run is the directory's ``config.yaml``, ``last.ckpt``, ``export/`` (and the rest of
:data:`RUN_FILES`). A new run into a directory that holds one (a checkpoint or an export: what a
run that trained leaves) is refused, naming ``--resume`` and ``--overwrite``; ``--overwrite`` removes
the old run's files first. What a run that failed before its first checkpoint left (its config,
processor, skipped-records list, logs) blocks nothing: the next run replaces it. ``--resume``
compares the config the checkpoint was written with to this one: changes to what the run computes
(model, data, pruning, LoRA, loss, optimizer, seed, the training data's content, ...) are refused,
naming the keys or the file; the others (a longer ``max_steps``, logging, checkpoint cadence,
workers, where the run directory is, ...) are accepted and announced. One live run per directory:
:mod:`tpkit.training.runlock`.
"""

from __future__ import annotations

import hashlib
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
    "EXPORT",
    "EXPORT_FILES",
    "RunDirError",
    "RunFinished",
    "CheckpointError",
    "alive",
    "data_fingerprint",
    "incomplete_export",
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
EXPORT = "export"  # the run's export directory (tpkit.training.export writes it whole, or not at all)
# what a whole export holds (tpkit.training.export checks that it wrote each before it renames the
# directory into place; an export cut short by an older tpkit lacks some)
EXPORT_FILES = (
    "adapter_config.json",
    "adapter_model.safetensors",
    "pruning.json",
    "tpkit_export.json",
    "README.md",
)
# what a run writes into out_dir (last.ckpt: tpkit.training.checkpoint.LAST; logs/tb: the loggers)
RUN_FILES = (CONFIG, "last.ckpt", EXPORT, "processor", "logs", "tb", "wandb", "mlruns", SKIPPED)
# a run that trained leaves one of these: only they make out_dir "hold a run"
_KEPT = ("last.ckpt", EXPORT)
# what a run that never saved a checkpoint leaves and the next run writes anew (the logs stay: the
# next run takes the next log version)
_LEFTOVERS = (CONFIG, "processor", SKIPPED)

# keys a resumed run may change: where and how fast it runs, what it logs and when it saves, not
# what it computes (a longer max_steps stretches the lr schedule from the resumed step on)
RESUME_SAFE_KEYS = (
    "trainer.out_dir",  # a run directory moved or copied elsewhere is the same run
    "trainer.max_steps",
    "trainer.max_epochs",
    "trainer.accelerator",
    "trainer.strategy",
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
# compared as files, not as strings ("data/x.json" and "./data/x.json" are one file; a config loads
# its paths absolute, and a run started before they were keeps them relative to where it started)
_PATH_KEYS = (
    "trainer.out_dir",
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


class RunFinished(RunDirError):
    """``--resume`` of a run that reached ``trainer.max_steps``; ``export_missing``: what its export
    lacks (empty: whole, or not asked for), which a resume writes."""

    def __init__(self, message: str, step: int, export_missing: list[str]) -> None:
        super().__init__(message)
        self.step, self.export_missing = step, export_missing


def load_checkpoint(path: str | Path, *, resume: bool = False) -> dict[str, Any]:
    """A checkpoint's contents (CPU), with ``weights_only`` unpickling: tensors and plain containers
    only, so a crafted file cannot run code. Memory-mapped: reading a few keys costs little. A file
    that unpickles but is not what tpkit writes (an empty or non-tensor state dict, a negative step,
    a config that is not a mapping, LoRA tensors of another rank; for ``resume`` no loop or optimizer
    state) is a CheckpointError naming what is wrong, before any model is built."""
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
    if why := _malformed(state, resume):
        raise CheckpointError(f"{path}: {why}; was it written by another program, or edited?")
    return state


def _kind(value: Any) -> str:
    return (
        f"{type(value).__name__} {value!r}" if isinstance(value, (str, int, float)) else type(value).__name__
    )


def _malformed(state: dict[str, Any], resume: bool) -> str | None:
    """What is wrong with a checkpoint that unpickled (tensors and plain containers only) but is not
    one tpkit wrote, else None; ``resume``: it must also hold the loop and optimizer state."""
    import torch

    sd = state["state_dict"]
    if not isinstance(sd, dict):
        return f"state_dict is a {_kind(sd)}, not a mapping of tensor names to tensors"
    if not sd:
        return "state_dict is empty: it holds no trained tensors"
    for k, v in sd.items():
        if not isinstance(k, str) or not torch.is_tensor(v):
            return f"state_dict[{k!r}] is a {_kind(v)}, not a tensor"
    step = state.get("global_step", 0)
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        return f"global_step = {step!r} is not a step count (an integer >= 0)"
    config = state.get("tpkit_config")
    if config is not None and not isinstance(config, dict):
        return f"tpkit_config is a {_kind(config)}, not the run's config (a mapping)"
    data = state.get("tpkit_data")
    if data is not None and not (
        isinstance(data, dict)
        and all(isinstance(v, dict) and {"bytes", "sha256"} <= set(v) for v in data.values())
    ):
        return "tpkit_data is not the data fingerprint a tpkit run saves ({key: {bytes, sha256}})"
    lora = (config or {}).get("lora")
    r = lora.get("r") if isinstance(lora, dict) else None
    if isinstance(r, int):  # LoRA A is (r, in), B (out, r): a rank the config does not give is another run's
        for k, v in sd.items():
            dim = 0 if ".lora_A." in k else 1 if ".lora_B." in k else None
            if dim is not None and (v.dim() != 2 or v.shape[dim] != r):
                return f"state_dict[{k!r}] has shape {tuple(v.shape)}, which is not LoRA rank {r} (lora.r)"
    if resume:
        for key, kind in (("loops", dict), ("optimizer_states", list), ("lr_schedulers", list)):
            if not isinstance(state.get(key), kind):
                what = "missing" if key not in state else f"a {_kind(state[key])}"
                return f"{key} is {what}: --resume needs the loop and optimizer state a tpkit run saves"
    return None


def check_tensors(state: dict[str, Any], expected: dict[str, tuple[int, ...]], path: str | Path) -> None:
    """CheckpointError, naming a tensor, when a checkpoint's state dict is not exactly the trainable
    tensors ``expected`` ({name: shape}) of the model it is loaded into."""
    sd = state["state_dict"]
    problems = [f"{k}: not a trainable tensor of this model" for k in sorted(set(sd) - set(expected))]
    problems += [f"{k}: missing" for k in sorted(set(expected) - set(sd))]
    problems += [
        f"{k}: shape {tuple(sd[k].shape)}, the model's is {shape}"
        for k, shape in expected.items()
        if k in sd and tuple(sd[k].shape) != tuple(shape)
    ]
    if problems:
        more = f"; {len(problems) - 1} more" if len(problems) > 1 else ""
        raise CheckpointError(
            f"{path}: its tensors do not fit the model this config builds ({problems[0]}{more}): it was "
            "written by another model, LoRA or projector setting, or edited"
        )


def data_fingerprint(paths: dict[str, str | None]) -> dict[str, dict[str, Any]]:
    """{config key: {"bytes": size, "sha256": hash of the content}} of the data files ``paths``
    ({config key: path}; a None path is left out). One streaming pass over each file's bytes: a
    resumed run must read the records its checkpoint was trained on, whatever their ids say."""
    out = {}
    for key, path in paths.items():
        if path is None or not Path(path).is_file():
            continue
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        out[key] = {"bytes": Path(path).stat().st_size, "sha256": h.hexdigest()}
    return out


def _data_changes(saved: dict[str, Any], cfg: TrainConfig) -> list[str]:
    """The data files whose content differs from the fingerprint a checkpoint recorded."""
    now = data_fingerprint({key: _path_of(cfg, key) for key in saved})
    changes = []
    for key, was in saved.items():
        path, have = _path_of(cfg, key), now.get(key)
        if have is None:
            changes.append(f"{key} {path}: missing")
        elif have != was:
            size = (
                f"{was.get('bytes')} -> {have['bytes']} bytes"
                if was.get("bytes") != have["bytes"]
                else f"same size ({have['bytes']} bytes), other content"
            )
            changes.append(f"{key} {path}: changed since the run started ({size})")
    return changes


def _path_of(cfg: TrainConfig, key: str) -> str | None:
    """The path a dotted config key (``data.train_json``) names in ``cfg`` (None: no such key)."""
    section, _, name = key.partition(".")
    path = getattr(getattr(cfg, section, None), name, None)
    return path if isinstance(path, str) else None


def existing_run(out: str | os.PathLike) -> list[str]:
    """The names of :data:`RUN_FILES` present in ``out`` (empty: no run there)."""
    d = Path(out)
    return [name for name in RUN_FILES if (d / name).exists()] if d.is_dir() else []


def incomplete_export(out: str | os.PathLike) -> list[str]:
    """What ``out``'s export lacks of :data:`EXPORT_FILES` (``["export/"]``: no export at all)."""
    d = Path(out) / EXPORT
    if not d.is_dir():
        return [f"{EXPORT}/"]
    return [name for name in EXPORT_FILES if not (d / name).is_file()]


def new_run_refusal(out: str | os.PathLike, command: str = "tpkit train --config ...") -> str | None:
    """Why a new run may not start in ``out`` (it holds a run that trained: a checkpoint or an
    export), else None."""
    found = existing_run(out)
    if not any(name in found for name in _KEPT):
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


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_tmp(out: str | os.PathLike, any_pid: bool = False) -> list[Path]:
    """Remove the temporary files (``.last.ckpt.tmp<PID>``, ``.export.tmp<PID>/``) that a killed
    writer left in ``out``: those of processes that no longer run (``any_pid``: all). Returns the
    removed paths."""
    d = Path(out)
    removed = []
    for p in d.glob(".*.tmp*") if d.is_dir() else []:
        pid = p.name.rpartition(".tmp")[2]
        if pid.isdigit() and (any_pid or not alive(int(pid))):
            if p.is_dir() and not p.is_symlink():  # an export being written (.export.tmp<PID>)
                shutil.rmtree(p, ignore_errors=True)
            else:
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
        try:
            saved = yaml.safe_load((out / CONFIG).read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{out / CONFIG}: not the run's config ({type(e).__name__}: {e})") from None
    if not isinstance(saved, dict):
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
    changes a resume accepts. A resume of a run that reached ``max_steps`` raises
    :class:`RunFinished` (which says whether its export is whole)."""
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
        elif rank0 and (left := [n for n in _LEFTOVERS if (out / n).exists()]):
            for name in left:
                p = out / name
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            print(
                f"note: removed {', '.join(left)} from {out}: left by a run that saved no checkpoint",
                file=sys.stderr,
            )
        return None
    if ckpt.is_dir():  # what Lightning's DeepSpeed strategy writes in place of the file
        raise RunDirError(
            f"--resume: {ckpt} is a directory (a DeepSpeed checkpoint): tpkit resumes the single-file "
            "checkpoints of trainer.strategy ddp and fsdp only"
        )
    if not ckpt.is_file():
        raise RunDirError(
            f"--resume: no checkpoint at {ckpt} (a run writes it every trainer.checkpoint_every_n_steps); "
            "start the run without --resume"
        )
    state = load_checkpoint(ckpt, resume=True)
    step = state.get("global_step", 0)
    saved = _saved_config(state, out)
    accepted: list[str] = []
    if saved is not None:
        refused, accepted = resume_changes(saved, to_dict(cfg))
        refused += _data_changes(state.get("tpkit_data") or {}, cfg)
        if refused:
            raise RunDirError(
                f"--resume: {ckpt} (step {step}) was trained with another config or data; these changes "
                "would make the resumed run not the run that was started:\n  " + "\n  ".join(refused) + "\n"
                f"Resume with the run's own values (they are in the checkpoint and in {out / CONFIG}) and "
                "data, or start a new run (--overwrite, or another trainer.out_dir)"
            )
    if cfg.trainer.max_steps <= step:
        missing = incomplete_export(out) if cfg.trainer.export_at_end else []
        export = f"; its export lacks {', '.join(missing)}, which this resume writes" if missing else ""
        raise RunFinished(
            f"--resume: {ckpt} is at step {step} and trainer.max_steps = {cfg.trainer.max_steps}: nothing "
            f"left to train (a longer run: --set trainer.max_steps=N with N > {step}){export}",
            step,
            missing,
        )
    if accepted and rank0 and announce:
        print(f"resuming from step {step} with changes: " + "; ".join(accepted), file=sys.stderr)
    if rank0:
        remove_stale_tmp(out)
    return step
