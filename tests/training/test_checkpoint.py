"""Checkpoints under real faults, in a real ``tpkit train`` process: SIGKILL while a checkpoint is
being written (the previous one stays whole, the resumed run equals an uninterrupted one, the
writer's temporary file is cleaned), SIGTERM and Ctrl-C (a save, a non-zero exit, the command to
continue), and no entry point unpickles anything but tensors."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tpkit.config import from_dict
from tpkit.models.loading import load_exported
from tpkit.training.config import TrainConfig
from tpkit.training.recipe import fit

from .conftest import tiny_cfg_dict

ROOT = Path(__file__).resolve().parents[2]

# Runs `tpkit train` in this process after two test hooks: every optimizer step takes at least
# STEP_S seconds (time for the test to act), and the checkpoint of step HOLD_AT is written to its
# temporary file, then the writer waits (a kill lands mid-write). Each event writes a marker file.
DRIVER = """
import os, sys, time, torch
torch.set_num_threads(1)
from tpkit.training import checkpoint
marks, hold_at, step_s = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
real_save, real_end = torch.save, checkpoint.LastCheckpoint.on_train_batch_end

def save(obj, f, *a, **k):
    real_save(obj, f, *a, **k)
    if isinstance(obj, dict) and obj.get("global_step") == hold_at:
        f.flush()
        open(os.path.join(marks, "writing"), "w").close()
        time.sleep(600)

def batch_end(self, trainer, *a):
    real_end(self, trainer, *a)
    open(os.path.join(marks, f"step{trainer.global_step}"), "w").close()
    time.sleep(step_s)

checkpoint.torch.save = save
checkpoint.LastCheckpoint.on_train_batch_end = batch_end
from tpkit.cli import main
sys.exit(main(sys.argv[4:]))
"""


def _start(tmp_path: Path, cfg_path: Path, *extra: str, hold_at: int = -1, step_s: float = 0.0):
    marks = tmp_path / "marks"
    marks.mkdir(exist_ok=True)
    for m in marks.iterdir():
        m.unlink()
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [
        sys.executable,
        str(driver),
        str(marks),
        str(hold_at),
        str(step_s),
        "train",
        "--config",
        str(cfg_path),
        *extra,
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, marks


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.monotonic()
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"the run ended before {path.name}: {proc.stderr.read()[-3000:]}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            pytest.fail(f"no {path.name} after {timeout} s")
        time.sleep(0.05)


def _config(
    train_json: Path, tmp_path: Path, processor, out: str = "run", **trainer
) -> tuple[Path, TrainConfig]:
    processor.save_pretrained(str(tmp_path / "proc"))
    trainer = {"max_steps": 6, "checkpoint_every_n_steps": 2, **trainer}
    d = tiny_cfg_dict(train_json, tmp_path / out, trainer=trainer)
    d["model"]["processor_path"] = str(tmp_path / "proc")
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump(d))
    return path, from_dict(TrainConfig, d)


def test_sigkill_while_writing_a_checkpoint_then_resume_is_exact(train_json, processor, tmp_path):
    cfg_path, cfg = _config(train_json, tmp_path, processor)
    proc, marks = _start(tmp_path, cfg_path, hold_at=4)
    _wait_for(marks / "writing", proc)
    tmp = list((tmp_path / "run").glob(".last.ckpt.tmp*"))
    assert len(tmp) == 1 and tmp[0].stat().st_size > 0  # step 4's checkpoint, whole but not yet in place
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    ckpt = torch.load(tmp_path / "run" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2  # the previous checkpoint, intact
    resumed = fit(cfg, resume=True, processor=processor)
    assert resumed.metrics["global_step"] == 6
    assert not list((tmp_path / "run").glob(".last.ckpt.tmp*"))  # the killed writer's file is gone
    ref = fit(_config(train_json, tmp_path, processor, out="ref")[1], processor=processor)
    for (name, a), (_, b) in zip(
        ref.module.model.named_parameters(), resumed.module.model.named_parameters()
    ):
        if a.requires_grad:
            torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_a_stopped_run_saves_exits_non_zero_and_says_how_to_continue(train_json, processor, tmp_path, sig):
    cfg_path, _ = _config(
        train_json,
        tmp_path,
        processor,
        export_at_end=True,
        checkpoint_every_n_steps=0,
        progress_bar=True,
        logger="csv",
        log_every_n_steps=1,
    )
    proc, marks = _start(tmp_path, cfg_path, step_s=1.0)
    _wait_for(marks / "step2", proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err[-3000:]
    assert f"stopped by {signal.Signals(sig).name} after step" in err
    assert f"continue with: tpkit train --config {cfg_path} --resume" in err
    step = torch.load(tmp_path / "run" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"]
    assert 2 <= step < 6 and not (tmp_path / "run" / "export").exists()
    # what the user reads before the bar: none of the dependency warnings they cannot act on
    for noise in ("LeafSpec", "Tip:", "is_gradient_checkpointing", "v_num", "Epoch 0/"):
        assert noise not in err, noise
    assert "train:" in err and "/6" in err  # the bar counts the run's optimizer steps
    if sig == signal.SIGINT:
        return  # the rest is the same after either signal
    # the printed command continues the run to the end, its bar from the saved step
    proc, _ = _start(tmp_path, cfg_path, "--resume")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "done: step 6" in out and (tmp_path / "run" / "export").is_dir()
    assert f" {step}/6 " in err.replace("\r", "\n") or f"{step}/6" in err
    # one metrics log for the run, continued: each step once, in order
    assert [p.name for p in (tmp_path / "run" / "logs").iterdir()] == ["version_0"]
    rows = (tmp_path / "run" / "logs" / "version_0" / "metrics.csv").read_text().splitlines()
    steps = [int(r.split(",")[rows[0].split(",").index("step")]) for r in rows[1:]]
    assert steps == list(range(6))


class _Boom:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = Path("/tmp/tpkit_crafted_checkpoint_ran")


def _crafted(path: Path) -> Path:
    """A checkpoint-looking file whose unpickling runs a shell command."""
    MARKER.unlink(missing_ok=True)
    torch.save({"state_dict": {}, "global_step": 1, "tpkit_config": {}, "x": _Boom()}, path)
    return path


def test_no_entry_point_unpickles_a_crafted_checkpoint(make_cfg, processor, tmp_path, capsys):
    from tpkit.cli import main
    from tpkit.training.rundir import CheckpointError

    cfg = make_cfg()
    fit(cfg, processor=processor)
    out = Path(cfg.trainer.out_dir)
    _crafted(out / "last.ckpt")
    assert main(["export", "--ckpt", str(out / "last.ckpt"), "--out", str(tmp_path / "exp")]) == 2
    assert "refused - it holds objects other than tensors" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="weights_only"):
        fit(cfg, resume=True, processor=processor)
    assert not MARKER.exists()
    # an export whose adapter weights are a pickle (adapter_model.bin): peft reads it weights_only too
    res = fit(
        make_cfg(trainer={"out_dir": str(tmp_path / "run2"), "export_at_end": True}), processor=processor
    )
    (res.export_dir / "adapter_model.safetensors").unlink()
    _crafted(res.export_dir / "adapter_model.bin")
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported global"):
        load_exported(res.export_dir)
    assert not MARKER.exists()


@pytest.fixture(scope="module")
def finished(train_json, processor, tmp_path_factory):
    """A finished 4-step run (checkpoint, config.yaml, processor) to copy and damage."""
    root = tmp_path_factory.mktemp("finished")
    d = tiny_cfg_dict(train_json, root / "run")
    d["model"]["processor_path"] = str(root / "proc")
    processor.save_pretrained(str(root / "proc"))
    fit(from_dict(TrainConfig, d), processor=processor)
    return root / "run", d


def _edit(sd: dict, key_part: str, f) -> dict:
    k = next(k for k in sd if key_part in k)
    return {**sd, k: f(sd[k])}


# what is damaged -> (the edit, what the error says, found before any model is built)
DAMAGE = {
    "transposed tensor": (
        lambda s: {**s, "state_dict": _edit(s["state_dict"], ".lora_A.", lambda t: t.t().contiguous())},
        r"state_dict\['model\..*\.lora_A\.default\.weight'\] has shape \(32, 4\), which is not LoRA rank 4",
        True,
    ),
    "empty state dict": (
        lambda s: {**s, "state_dict": {}},
        "state_dict is empty: it holds no trained tensors",
        True,
    ),
    "list state dict": (
        lambda s: {**s, "state_dict": list(s["state_dict"].values())},
        "state_dict is a list, not a mapping of tensor names to tensors",
        True,
    ),
    "config a string": (
        lambda s: {**s, "tpkit_config": "lora: {r: 4}"},
        "tpkit_config is a str 'lora: {r: 4}', not the run's config",
        True,
    ),
    "negative step": (lambda s: {**s, "global_step": -3}, r"global_step = -3 is not a step count", True),
    "loops missing": (
        lambda s: {k: v for k, v in s.items() if k != "loops"},
        "loops is missing: --resume needs the loop and optimizer state",
        True,
    ),
    "cut tensor": (
        lambda s: {**s, "state_dict": _edit(s["state_dict"], ".lora_A.", lambda t: t[:, :31].contiguous())},
        r"its tensors do not fit the model this config builds \((model\.)?base_model\..*lora_A\.default\.weight: "
        r"shape \(4, 31\), the model's is \(4, 32\)\)",
        False,
    ),
    "extra tensor": (
        lambda s: {**s, "state_dict": {**s["state_dict"], "model.extra.weight": torch.zeros(2)}},
        r"\((model\.)?extra\.weight: not a trainable tensor of this model\)",
        False,
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_checkpoint_that_loads_safely_but_is_wrong_is_named(
    finished, tmp_path, monkeypatch, capsys, damage
):
    """Raw tracebacks (KeyError, TypeError, size mismatch) or silently accepted before; now each
    names the file and what is wrong, the structural ones before any model is built."""
    import shutil

    from tpkit.cli import main
    from tpkit.training import export, recipe

    edit, message, early = DAMAGE[damage]
    out = tmp_path / "run"
    shutil.copytree(finished[0], out)
    ckpt = out / "last.ckpt"
    torch.save(edit(torch.load(ckpt, weights_only=True)), ckpt)
    d = {**finished[1], "trainer": {**finished[1]["trainer"], "out_dir": str(out), "max_steps": 6}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(d))
    if early:
        for module, name in ((recipe, "build_student"), (export, "load_base_model")):
            monkeypatch.setattr(module, name, lambda *a, **k: pytest.fail("a model was built"))
    assert main(["train", "--config", str(tmp_path / "cfg.yaml"), "--resume"]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith(f"error: {ckpt}: ") and re.search(message, err), err
    if damage != "loops missing":  # an export needs no loop state
        assert main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "export")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {ckpt}: ") and re.search(message, err), err
        assert not (tmp_path / "export").exists()


def test_rank0_says_how_to_resume_before_the_process_observer_kills_it(capsys):
    """A rank killed outright: Lightning's observer SIGKILLs rank 0 too, so the notice must be printed
    from inside the observer, first. The stand-in has the real observer's name and method."""
    import threading
    from types import SimpleNamespace

    from lightning.fabric.strategies.launchers.subprocess_script import _ChildProcessObserver

    from tpkit.training.checkpoint import OBSERVER_THREAD, PeerExitNotice

    real = _ChildProcessObserver(main_pid=os.getpid(), child_processes=[])  # not started
    assert real.name == OBSERVER_THREAD and callable(real._terminate_all)
    killed: list[str] = []
    stop = threading.Event()

    class Observer(threading.Thread):
        def run(self) -> None:
            stop.wait(30)

        def _terminate_all(self) -> None:  # what the notice printed by the time the kill comes
            killed.append(capsys.readouterr().err)

    obs = Observer(name=OBSERVER_THREAD, daemon=True)
    obs.start()
    try:
        notice = PeerExitNotice(lambda: "\ncontinue with: tpkit train --config c.yaml --resume")
        notice.setup(SimpleNamespace(is_global_zero=False), None, "fit")
        assert notice.wrapped == 0  # only rank 0 launched the others
        notice.setup(SimpleNamespace(is_global_zero=True), None, "fit")
        notice.setup(SimpleNamespace(is_global_zero=True), None, "validate")  # wrapped once
        assert notice.wrapped == 1
        obs._terminate_all()
    finally:
        stop.set()
        obs.join()
    assert len(killed) == 1
    assert (
        "stopping every rank" in killed[0]
        and "continue with: tpkit train --config c.yaml --resume" in killed[0]
    )
