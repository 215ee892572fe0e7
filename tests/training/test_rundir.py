"""The run directory: no run is overwritten silently, a resume that would mix two runs is refused
(naming the keys) before any model work and without touching the run, safe changes are announced."""

from __future__ import annotations

import json

import pytest
import yaml

from tpkit.cli import main

from .conftest import tiny_cfg_dict


@pytest.fixture
def run(train_json, processor, tmp_path):
    """A finished 4-step run (checkpoint at 2 and 4, export) through the command line, and its config file."""
    processor.save_pretrained(str(tmp_path / "proc"))
    data = tmp_path / "train.json"  # a copy this test may change; the images stay where they are
    data.write_text(train_json.read_text())
    d = tiny_cfg_dict(data, tmp_path / "run", trainer={"export_at_end": True})
    d["data"]["image_folder"] = str(train_json.parent)
    d["model"]["processor_path"] = str(tmp_path / "proc")
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(d))
    assert main(["train", "--config", str(cfg_path)]) == 0
    return tmp_path / "run", cfg_path


def _snapshot(out) -> dict[str, bytes]:
    return {
        p.name: p.read_bytes()
        for p in (out / "last.ckpt", out / "config.yaml", out / "export/adapter_model.safetensors")
    }


def test_a_second_run_into_the_same_out_dir_is_refused_then_overwritten_on_request(run, capsys):
    out, cfg_path = run
    before = _snapshot(out)
    capsys.readouterr()
    argv = ["train", "--config", str(cfg_path), "--set", "trainer.max_steps=2"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"error: trainer.out_dir '{out}' already holds a run (config.yaml, last.ckpt, export" in err
    assert f"`tpkit train --config {cfg_path} --set trainer.max_steps=2 --resume`" in err
    assert "--overwrite" in err
    assert _snapshot(out) == before  # nothing touched
    assert main([*argv, "--overwrite"]) == 0
    captured = capsys.readouterr()
    assert "--overwrite: removed config.yaml, last.ckpt, export" in captured.err
    assert "done: step 2" in captured.out
    assert main([*argv, "--overwrite", "--resume"]) == 2


def test_resume_refuses_changes_to_what_the_run_computes(run, tmp_path, capsys):
    out, cfg_path = run
    before = _snapshot(out)
    other = tmp_path / "other.json"  # another data file that exists (a missing one is refused first)
    other.write_text((tmp_path / "train.json").read_text())
    capsys.readouterr()
    changes = ["optim.lr=0.01", "lora.r=2", "lora.alpha=4.0", f"data.train_json={other}", "trainer.seed=3"]
    assert (
        main(["train", "--config", str(cfg_path), "--set", "trainer.max_steps=6", *changes, "--resume"]) == 2
    )
    err = capsys.readouterr().err
    for key in (
        "optim.lr: 0.005 -> 0.01",
        "lora.r: 4 -> 2",
        "lora.alpha: 8.0 -> 4.0",
        "data.train_json:",
        "trainer.seed: 0 -> 3",
    ):
        assert key in err, key
    assert "trainer.max_steps" not in err  # a longer run is a safe change
    assert _snapshot(out) == before  # the run's config.yaml is not rewritten by a refused resume
    assert main(["train", "--config", str(cfg_path), "--resume"]) == 2  # max_steps 4: nothing left
    assert "is at step 4 and trainer.max_steps = 4: nothing left to train" in capsys.readouterr().err


def test_resume_accepts_and_announces_safe_changes(run, capsys):
    out, cfg_path = run
    capsys.readouterr()
    argv = ["train", "--config", str(cfg_path), "--set", "trainer.max_steps=6", "trainer.log_every_n_steps=1"]
    assert main([*argv, "--resume"]) == 0
    captured = capsys.readouterr()
    assert (
        "resuming from step 4 with changes: trainer.log_every_n_steps: 10 -> 1; trainer.max_steps: 4 -> 6"
        in captured.err
    )
    assert "done: step 6" in captured.out
    assert yaml.safe_load((out / "config.yaml").read_text())["trainer"]["max_steps"] == 6


def test_resume_on_other_training_data_under_the_same_path_is_refused(run, capsys):
    out, cfg_path = run
    before = _snapshot(out)
    data = out.parent / "train.json"
    data.write_text(json.dumps(json.loads(data.read_text())[:12]))
    capsys.readouterr()
    assert main(["train", "--config", str(cfg_path), "--set", "trainer.max_steps=6", "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"data.train_json {data}: changed since the run started (" in err and " -> " in err
    assert _snapshot(out) == before


def test_resume_changes_are_classified():
    from tpkit.training.rundir import RESUME_SAFE_KEYS, resume_changes

    saved = {"trainer": {"max_steps": 4, "logger": "csv", "seed": 0}, "data": {"train_json": "d/x.json"}}
    now = {"trainer": {"max_steps": 8, "logger": "none", "seed": 0}, "data": {"train_json": "./d/x.json"}}
    refused, accepted = resume_changes(saved, now)
    assert refused == [] and accepted == ["trainer.logger: 'csv' -> 'none'", "trainer.max_steps: 4 -> 8"]
    _, accepted = resume_changes({"data": {"on_error": "raise"}}, {"data": {"on_error": "skip"}})
    assert accepted == ["data.on_error: 'raise' -> 'skip'"]  # the way past a record that fails to decode
    refused, _ = resume_changes(saved, {**now, "pruning": {"stage1": {"min_keep": 8}}})
    assert refused == ["pruning.stage1.min_keep: '(unset)' -> 8"]
    assert not any(
        k.startswith(("model.path", "lora.", "optim.", "distill.", "pruning.")) for k in RESUME_SAFE_KEYS
    )


def test_resume_from_a_deepspeed_checkpoint_directory_says_so(train_json, tmp_path):
    from tpkit.config import from_dict
    from tpkit.training.config import TrainConfig
    from tpkit.training.rundir import RunDirError, check_run_dir

    cfg = from_dict(TrainConfig, tiny_cfg_dict(train_json, tmp_path / "run"))
    # Lightning's DeepSpeed strategy has the engine write last.ckpt as a directory
    (tmp_path / "run" / "last.ckpt" / "checkpoint").mkdir(parents=True)
    with pytest.raises(RunDirError, match="is a directory \\(a DeepSpeed checkpoint\\): tpkit resumes"):
        check_run_dir(cfg, resume=True)


def test_a_run_started_with_relative_paths_resumes_with_the_absolute_ones(tmp_path, monkeypatch):
    """Configs load their paths absolute; a checkpoint written before they did holds them relative to
    the directory the run started in: from there, the same files, not changed keys."""
    from tpkit.training.rundir import resume_changes

    monkeypatch.chdir(tmp_path)
    saved = {"model": {"path": "assets/tiny-llava"}, "trainer": {"out_dir": "runs/x/"}}
    now = {
        "model": {"path": str(tmp_path / "assets" / "tiny-llava")},
        "trainer": {"out_dir": str(tmp_path / "runs" / "x")},
    }
    assert resume_changes(saved, now) == ([], [])
    # another directory is a moved run (accepted); another model is another run
    moved = {**now, "trainer": {"out_dir": str(tmp_path / "runs" / "y")}}
    assert resume_changes(saved, moved) == (
        [],
        [f"trainer.out_dir: 'runs/x/' -> '{tmp_path / 'runs' / 'y'}'"],
    )
    other = {**now, "model": {"path": str(tmp_path / "assets" / "other")}}
    assert resume_changes(saved, other) == (
        [f"model.path: 'assets/tiny-llava' -> '{tmp_path / 'assets' / 'other'}'"],
        [],
    )


def test_stale_checkpoint_temporaries_are_removed(tmp_path):
    import os
    import subprocess
    import sys

    from tpkit.training.rundir import new_run_refusal, remove_stale_tmp

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    stale = tmp_path / f".last.ckpt.tmp{int(dead.stdout)}"
    live = tmp_path / f".last.ckpt.tmp{os.getpid()}"  # a writer that still runs: kept
    stale.write_bytes(b"x")
    live.write_bytes(b"x")
    assert remove_stale_tmp(tmp_path) == [stale]
    assert live.exists() and not stale.exists()
    assert new_run_refusal(tmp_path) is None


def test_an_export_is_written_whole_or_not_at_all(run, monkeypatch, capsys):
    """Killed during export, a run left export/ without pruning.json or tpkit_export.json, and
    --resume said "nothing left to train"; now the export is renamed into place once whole, and a
    resume of a finished run whose export is missing or cut short writes it."""
    from tpkit.training import export

    out, cfg_path = run
    before = {p.name: p.read_bytes() for p in (out / "export").iterdir() if p.is_file()}

    def killed(meta):
        raise KeyboardInterrupt  # the process dies while the model card is written

    monkeypatch.setattr(export, "_card", killed)
    with pytest.raises(KeyboardInterrupt):
        main(["train", "--config", str(cfg_path), "--set", "trainer.max_steps=6", "--resume"])
    assert {p.name: p.read_bytes() for p in (out / "export").iterdir() if p.is_file()} == before
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # no half export beside it
    monkeypatch.undo()
    (out / "export" / "pruning.json").unlink()  # an export cut short by an older tpkit
    capsys.readouterr()
    assert main(["train", "--config", str(cfg_path), "--set", "trainer.max_steps=6", "--resume"]) == 0
    captured = capsys.readouterr()
    assert f"the run had finished (step 6) without a whole export: wrote {out / 'export'}" in captured.err
    assert "done: step 6" in captured.out
    assert json.loads((out / "export" / "pruning.json").read_text())["stage2"]["layer"] == 1
    assert json.loads((out / "export" / "tpkit_export.json").read_text())["metrics"]["global_step"] == 6.0
    assert main(["train", "--config", str(cfg_path), "--set", "trainer.max_steps=6", "--resume"]) == 2
    assert "nothing left to train" in capsys.readouterr().err  # whole now: nothing to do


def test_resume_compares_resolved_paths_and_lets_a_moved_run_resume(run, capsys):
    import shutil

    out, cfg_path = run
    capsys.readouterr()
    argv = ["train", "--config", str(cfg_path), "--resume"]
    assert main([*argv, "--set", f"trainer.out_dir={out}/", "trainer.max_steps=5"]) == 0
    captured = capsys.readouterr()
    assert "done: step 5" in captured.out and "trainer.out_dir" not in captured.err  # the same directory
    moved = out.parent / "moved" / "run"
    moved.parent.mkdir()
    shutil.move(out, moved)
    assert main([*argv, "--set", f"trainer.out_dir={moved}", "trainer.max_steps=6"]) == 0
    captured = capsys.readouterr()
    assert (
        # a path loads normalised: the trailing / given with --set is gone
        f"resuming from step 5 with changes: trainer.max_steps: 5 -> 6; trainer.out_dir: '{out}' -> '{moved}'"
        in (captured.err)
    )
    assert "done: step 6" in captured.out


def test_resume_on_training_data_edited_in_place_is_refused_naming_the_file(run, capsys):
    """Every answer changed, the ids and the record count the same: it resumed silently before."""
    out, cfg_path = run
    before = _snapshot(out)
    data = out.parent / "train.json"
    records = json.loads(data.read_text())
    size = data.stat().st_size
    for r in records:  # another answer of the same length: the same ids, count and size
        r["conversations"][1]["value"] = "x" * len(r["conversations"][1]["value"])
    data.write_text(json.dumps(records, indent=1) + "\n")  # as tpkit.synthetic.splits writes it
    assert data.stat().st_size == size
    capsys.readouterr()
    assert main(["train", "--config", str(cfg_path), "--set", "trainer.max_steps=6", "--resume"]) == 2
    err = capsys.readouterr().err
    assert (
        f"data.train_json {data}: changed since the run started (same size ({size} bytes), other content)"
        in err
    )
    assert _snapshot(out) == before
