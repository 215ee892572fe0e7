"""The base recipe survives interruption: Ctrl-C/SIGTERM saves and stops, kill -9 loses at most the
steps since the last checkpoint, and ``--resume`` ends bit-identical to an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tpkit.training import base_loop
from tpkit.training.base_loop import StepPlan
from tpkit.training.base_recipe import main

from .test_base_recipe import CONFIG, ROOT, TINY

# a few more steps than the shared toy run, so that each phase can be cut in the middle
ARGS = [*TINY, "tower.max_steps=4", "lm.max_steps=4", "eval.n_ood=0"]


def _weights(out: Path) -> dict:
    return load_file(str(out / "model.safetensors"))


def _assert_same_model(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not (wa[k] == wb[k]).all()]
    assert not different, f"weights differ after resume: {different[:5]}"
    ma, mb = json.loads((a / "metrics.json").read_text()), json.loads((b / "metrics.json").read_text())
    assert ma["tower"]["f1"] == mb["tower"]["f1"]
    assert [h["loss"] for h in ma["llava"]["history"]] == [h["loss"] for h in mb["llava"]["history"]]
    assert ma["eval"]["test"]["accuracy"] == mb["eval"]["test"]["accuracy"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("resume") / "straight"
    assert main(["--config", str(CONFIG), "--out", str(out), "--set", *ARGS]) == 0
    return out


def _stop_at(monkeypatch, calls: set[int], how: str) -> None:
    """After the n-th training step of the process (both phases counted), for n in ``calls``:
    ``how="signal"`` asks for a stop as the SIGINT/SIGTERM handler does; ``how="crash"`` dies at once,
    like kill -9, without saving anything."""
    original = StepPlan.after_step
    seen = {"n": 0}

    def after_step(self, done: int) -> None:
        original(self, done)
        seen["n"] += 1
        if seen["n"] in calls:
            if how == "crash":
                raise SystemExit("killed")
            base_loop._STOP["requested"] = True

    monkeypatch.setattr(StepPlan, "after_step", after_step)


def test_stop_and_resume_in_each_phase_equals_uninterrupted(uninterrupted, tmp_path, monkeypatch, capsys):
    out = tmp_path / "stopped"
    cmd = ["--config", str(CONFIG), "--out", str(out), "--set", *ARGS]
    _stop_at(monkeypatch, {2}, "signal")  # the tower's 2nd step
    assert main(cmd) == 130
    assert (out / ".resume" / "tower.pt").exists() and not (out / "model.safetensors").exists()

    _stop_at(monkeypatch, {2 + 3}, "signal")  # resumed: 2 tower steps left, then the LLaVA's 3rd
    assert main([*cmd, "--resume"]) == 130
    assert {p.name for p in (out / ".resume").iterdir()} == {"tower_done.pt", "llava.pt"}

    monkeypatch.undo()
    assert main([*cmd, "--resume"]) == 0
    assert not (out / ".resume").exists()  # finished: no state left behind in the model directory
    _assert_same_model(uninterrupted, out)
    # the log reports the training time of all three processes, from each phase's clock saved with its state
    m = json.loads((out / "metrics.json").read_text())
    tower_s, llava_s = m["tower"]["seconds"], m["llava"]["seconds"]
    assert (
        f"training seconds, all resumed processes: tower {tower_s}, llava {llava_s}"
        in capsys.readouterr().out
    )


def test_kill_loses_only_the_steps_since_the_last_checkpoint(uninterrupted, tmp_path, monkeypatch, capsys):
    out = tmp_path / "killed"
    # a checkpoint after every step; the process dies after the LLaVA's 3rd step, before saving it
    cmd = ["--config", str(CONFIG), "--out", str(out), "--set", *ARGS, "checkpoint_every_s=1e-9"]
    _stop_at(monkeypatch, {4 + 3}, "crash")
    with pytest.raises(SystemExit, match="killed"):
        main(cmd)
    import torch

    saved = torch.load(out / ".resume" / "llava.pt", weights_only=True)
    assert saved["step"] == 2  # the 3rd step was lost with the process, nothing more
    # a checkpointing run keeps its rendered VQA data: the resumed run reads it, not renders it
    assert {p.name for p in (out / ".resume" / "data").iterdir()} == {"train", "val", "test"}
    monkeypatch.undo()
    assert main([*cmd, "--resume"]) == 0
    assert "vqa train: 32 records read from" in capsys.readouterr().out
    _assert_same_model(uninterrupted, out)


def test_refuses_to_overwrite_or_resume_under_another_config(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    cmd = ["--config", str(CONFIG), "--out", str(out), "--set", *ARGS]
    _stop_at(monkeypatch, {1}, "signal")
    assert main(cmd) == 130
    monkeypatch.undo()
    assert main(cmd) == 2  # no --resume: the saved state is not silently thrown away
    assert "--resume" in capsys.readouterr().err
    assert main([*cmd, "tower.max_steps=5", "--resume"]) == 2  # the tower's own settings
    err = capsys.readouterr().err
    assert "tower.max_steps: 4 -> 5" in err and ".resume" in err
    # where and how fast it runs may change: device, workers, checkpoint interval, attention kernel
    assert main([*cmd, "workers=1", "checkpoint_every_s=60", "attention=eager", "--resume"]) == 0
    assert "attn" not in (out / "config.json").read_text()  # the saved model does not pin a kernel


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_saves_the_state(tmp_path):
    """A real SIGTERM to a running recipe: it stops at a step boundary with exit code 130 and its state saved."""
    out = tmp_path / "term"
    args = [*TINY, "tower.max_steps=100000", "tower.log_every=100000", "eval.n_ood=0"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tpkit.training.base_recipe",
            "--config",
            str(CONFIG),
            "--out",
            str(out),
            "--set",
            *args,
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    for line in proc.stdout:  # wait until the tower is training
        if "tower images ready" in line:
            break
    import time

    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    rest = proc.stdout.read()
    assert proc.wait(timeout=60) == 130, rest
    assert "SIGTERM" in rest and "--resume" in rest
    assert (out / ".resume" / "tower.pt").exists()


def test_a_trained_tower_is_kept_when_only_the_llava_phase_changes(
    uninterrupted, tmp_path, monkeypatch, capsys
):
    """Changing lm.* after phase 1 keeps the tower (hours on a CPU): only phase 2 is redone."""
    out = tmp_path / "changed"
    cmd = ["--config", str(CONFIG), "--out", str(out), "--set", *ARGS]
    assert main([*cmd, "--snapshot", str(tmp_path / "early")]) == 2  # nothing of phase 2 saved yet
    assert "has not saved phase 2 yet" in capsys.readouterr().err
    _stop_at(monkeypatch, {4 + 2}, "signal")  # the LLaVA's 2nd step
    assert main(cmd) == 130
    monkeypatch.undo()
    # the state mid-phase, as a stock model directory (what --snapshot is for: evaluating a long run)
    snap = tmp_path / "snap"
    assert main([*cmd, "--snapshot", str(snap)]) == 0
    import torch
    from transformers import LlavaForConditionalGeneration

    saved = torch.load(out / ".resume" / "llava.pt", weights_only=True)["model"]
    loaded = LlavaForConditionalGeneration.from_pretrained(snap).state_dict()
    assert saved.keys() == loaded.keys() and all(torch.equal(loaded[k], v) for k, v in saved.items())
    assert json.loads((snap / "snapshot.json").read_text())["step"] == 2
    assert (snap / "processor_config.json").exists() or (snap / "preprocessor_config.json").exists()
    changed = [*cmd, "lm.lr=0.001"]
    assert main([*changed, "--snapshot", str(tmp_path / "other")]) == 2  # another config: refused
    assert main([*changed, "--resume"]) == 2
    assert "llava.pt to retrain the LLaVA phase on the finished tower" in capsys.readouterr().err
    (out / ".resume" / "llava.pt").unlink()
    assert main([*changed, "--resume"]) == 0
    a, b = _weights(uninterrupted), _weights(out)
    tower = [k for k in a if "vision_tower" in k]
    assert tower and all((a[k] == b[k]).all() for k in tower)  # the same tower, not retrained
    lm = [k for k in a if "language_model" in k]
    assert any(not (a[k] == b[k]).all() for k in lm)  # phase 2 under the new lr
    ma, mb = (json.loads((p / "metrics.json").read_text()) for p in (uninterrupted, out))
    assert mb["tower"]["f1"] == ma["tower"]["f1"] and mb["config"]["lm"]["lr"] == 0.001
