"""The base recipe's training-loop machinery, shared by its two phases: device and precision, step
plans under a time budget, the learning-rate schedule and optimiser, and the resumable state that
lets a run of hours on a CPU stop (Ctrl-C, SIGTERM, a crash) and continue exactly where it was.

Plain torch, no Lightning: ``tpkit.training.base_recipe`` is a fixture builder, not the kit's
training path (that is ``train.py``).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
from tqdm import tqdm

from tpkit.config import to_dict

if TYPE_CHECKING:
    from tpkit.training.base_recipe import BaseRecipeConfig


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but torch.cuda.is_available() is False")
    return torch.device(name)


def autocast_for(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def log(msg: str) -> None:
    tqdm.write(msg, file=sys.stdout)
    sys.stdout.flush()


class StepPlan:
    """How many steps a phase runs: ``max_steps``, or fewer if ``budget_s`` would run out.

    ``total`` is first set at step ``calib[1]`` from the seconds per step measured since step
    ``calib[0]``, then re-estimated every ``replan_every`` steps from the latest window (the first
    steps can be slow while data workers still load the CPU), so that a cosine schedule reading
    ``total`` ends where training ends. ``expired`` is a hard stop at the budget. Between
    :meth:`start` and :meth:`close` it also drives the phase's progress bar.
    """

    def __init__(
        self,
        max_steps: int,
        budget_s: float,
        device: torch.device,
        calib: tuple[int, int] = (10, 40),
        replan_every: int = 250,
    ):
        self.total = max_steps
        self.max_steps = max_steps
        self.budget_s = budget_s
        self.device = device
        self.calib = calib
        self.replan_every = replan_every
        self.t0 = time.perf_counter()
        self._mark: tuple[int, float] | None = None
        self.bar: tqdm | None = None

    def start(self, step: int, elapsed: float, desc: str) -> None:
        """Start the clock, ``elapsed`` seconds into the phase (a resumed run), and the progress bar
        at ``step``."""
        self.t0 = time.perf_counter() - elapsed
        self.bar = tqdm(
            total=self.total, initial=step, desc=desc, unit="step", dynamic_ncols=True, mininterval=2.0
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def after_step(self, done: int) -> None:
        self._replan(done)
        if self.bar is not None:
            self.bar.total = self.total
            self.bar.update()

    def _replan(self, done: int) -> None:
        if not self.budget_s or self.max_steps <= self.calib[1]:
            return
        first, second = self.calib
        if done == first or (done > second and (done - second) % self.replan_every == 0) or done == second:
            sync(self.device)
            now = time.perf_counter()
            if done > first and self._mark is not None:
                per_step = (now - self._mark[1]) / (done - self._mark[0])
                left = self.budget_s - (now - self.t0)
                self.total = max(done + 1, min(self.max_steps, done + int(0.98 * left / per_step)))
            self._mark = (done, now)

    def expired(self) -> bool:
        return bool(self.budget_s) and self.elapsed() > self.budget_s


# Set by the SIGINT/SIGTERM handler that ``main`` installs: the training loops see it at the next step
# boundary, save their state (a consistent one, never half a step) and stop with KeyboardInterrupt.
_STOP = {"requested": False}


def install_stop_handlers() -> dict[int, Any]:
    """First Ctrl-C / SIGTERM: stop at the next step boundary with the state saved; second: now.

    Returns the previous handlers (for :func:`restore_handlers`).
    """
    import signal

    def handler(signum: int, frame: Any) -> None:
        if _STOP["requested"]:
            raise KeyboardInterrupt
        _STOP["requested"] = True
        log(
            f"[base] {signal.Signals(signum).name}: saving the state at the end of this step (again to abort)"
        )

    _STOP["requested"] = False
    return {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}


def restore_handlers(previous: dict[int, Any]) -> None:
    import signal

    for sig, h in previous.items():
        signal.signal(sig, h)
    _STOP["requested"] = False


# Keys that may change between an interrupted run and its ``--resume`` (where and how fast it runs,
# not what it computes, up to floating-point rounding).
_RESUME_FREE_KEYS = ("device", "workers", "archive", "checkpoint_every_s", "attention")


class ResumeError(RuntimeError):
    """An interrupted run's state is in the way (no ``--resume``) or does not fit (another config)."""


class RecipeState:
    """The recipe's resumable state in ``OUT/.resume/``: one file per phase, written atomically.

    ``tower.pt`` / ``llava.pt`` hold a phase in progress (weights, optimiser, scheduler, sampler and
    generator states, history); ``tower_done.pt`` the finished tower, so that a resumed run skips
    phase 1 and its data. Each file carries the resolved config (less :data:`_RESUME_FREE_KEYS`);
    resuming under a different one is refused, naming the keys. Removed when the recipe finishes.
    """

    def __init__(self, out_dir: Path, cfg: BaseRecipeConfig, enabled: bool = True):
        self.dir = Path(out_dir) / ".resume"
        self.every_s = cfg.checkpoint_every_s
        self.enabled = enabled
        self.config = {k: v for k, v in to_dict(cfg).items() if k not in _RESUME_FREE_KEYS}
        self.code = code_version() if enabled else None
        self.last = time.perf_counter()

    def due(self) -> bool:
        return self.enabled and self.every_s > 0 and time.perf_counter() - self.last >= self.every_s

    def save(self, name: str, state: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"{name}.pt"
        tmp = path.with_suffix(".tmp")
        torch.save({"config": self.config, "code": self.code, **state}, tmp)
        os.replace(tmp, path)
        self.last = time.perf_counter()

    def load(self, name: str, resuming: bool = True) -> dict[str, Any] | None:
        """The saved state (on the CPU: ``load_state_dict`` moves it where it belongs), or None.

        Its ``code`` is the tpkit version that saved it; ``resuming`` warns when that is not this one.
        """
        path = self.dir / f"{name}.pt"
        if not (self.enabled and path.exists()):
            return None
        state = torch.load(path, map_location="cpu", weights_only=True)
        saved = state.pop("config")
        code = state.setdefault("code", None)
        if resuming and code != self.code:
            log(
                f"[base] WARNING: {path} was saved by tpkit {code}, this is {self.code}: the resumed run mixes both"
            )
        diff = _config_diff(_phase_view(saved, name), _phase_view(self.config, name))
        if diff:
            hint = (
                f"remove {path} to retrain the LLaVA phase on the finished tower, or {self.dir} to start over"
                if name == "llava"
                else f"remove {self.dir} to start over"
            )
            raise ResumeError(
                f"{path} was saved under another config; differing keys (saved -> now): "
                + ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
                + f". Resume with the same config, or {hint}."
            )
        return state

    def verify(self) -> None:
        """Check every saved file's config now, before minutes of data rendering (see :meth:`load`)."""
        for path in sorted(self.dir.glob("*.pt")):
            self.load(path.stem)

    def remove(self, name: str) -> None:
        (self.dir / f"{name}.pt").unlink(missing_ok=True)

    def clear(self) -> None:
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)


# What phase 1 depends on: a finished (or half-trained) tower is reused when only the LLaVA phase's
# settings changed, e.g. to retrain phase 2 without repeating hours of CPU tower training.
_TOWER_KEYS = ("seed", "precision", "tower")


def _phase_view(config: dict, name: str) -> dict:
    return {k: config.get(k) for k in _TOWER_KEYS} if name.startswith("tower") else config


def _config_diff(a: dict, b: dict, prefix: str = "") -> dict[str, tuple[Any, Any]]:
    out: dict[str, tuple[Any, Any]] = {}
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            out.update(_config_diff(x, y, f"{prefix}{k}."))
        elif x != y:
            out[f"{prefix}{k}"] = (x, y)
    return out


def loop_state(model: nn.Module, opt: Any, sched: Any, plan: StepPlan, step: int, history: list) -> dict:
    """What every phase's snapshot holds (each adds its sampler and running sums)."""
    return {
        "model": model.state_dict(),
        "opt": opt.state_dict(),
        "sched": sched.state_dict(),
        "step": step,
        "history": history,
        "plan_total": plan.total,
        "elapsed": plan.elapsed(),
    }


def restore_loop(
    saved: dict, model: nn.Module, opt: Any, sched: Any, plan: StepPlan
) -> tuple[int, list, float]:
    """Load :func:`loop_state` back -> (step, history, seconds already trained)."""
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    sched.load_state_dict(saved["sched"])
    plan.total = int(saved["plan_total"])
    return int(saved["step"]), list(saved["history"]), float(saved["elapsed"])


def check_stop(state: RecipeState, name: str, snapshot: Any) -> None:
    """At a step boundary: save ``snapshot()`` when due or when a stop was requested (then stop)."""
    if _STOP["requested"]:
        state.save(name, snapshot())
        _STOP["requested"] = False
        raise KeyboardInterrupt(f"stopped; state saved in {state.dir} (continue with --resume)")
    if state.due():
        state.save(name, snapshot())


def warmup_cosine(plan: StepPlan, warmup: int, min_ratio: float):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, plan.total - warmup))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def adamw(model: nn.Module, lr: float, weight_decay: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW with decay on matrices only (not on norms, biases, embeddings of position)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and "position_embedding" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), fused=device.type == "cuda")


def code_version() -> str | None:
    """``git describe`` of the tpkit checkout (``-dirty`` with local changes), None outside git."""
    import subprocess

    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=12"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None
