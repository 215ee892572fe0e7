"""`tpkit train` end to end: config -> fit -> last.ckpt/export -> --resume."""

from __future__ import annotations

import pytest
import torch
import yaml

from tpkit.cli import main

from .conftest import tiny_cfg_dict


def test_train_main_then_resume(train_json, processor, tmp_path, capsys):
    out = tmp_path / "run"
    processor.save_pretrained(str(tmp_path / "proc"))
    d = tiny_cfg_dict(
        train_json,
        out,
        trainer={"max_steps": 2, "export_at_end": True, "logger": "csv", "log_every_n_steps": 1},
    )
    d["model"]["processor_path"] = str(tmp_path / "proc")
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(d))
    assert main(["train", "--config", str(cfg_path)]) == 0
    assert "done: step 2" in capsys.readouterr().out
    for name in ("config.yaml", "last.ckpt", "export/adapter_model.safetensors", "export/README.md"):
        assert (out / name).is_file(), name
    assert list((out / "logs").glob("version_*/metrics.csv"))
    assert main(["train", "--config", str(cfg_path), "--set", "trainer.max_steps=3", "--resume"]) == 0
    assert "done: step 3" in capsys.readouterr().out
    assert torch.load(out / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 3


def test_train_main_names_a_missing_model_directory(tmp_path, capsys):
    from tpkit.cli import main

    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text("model:\n  path: ./no-such-model\ndata:\n  train_json: train.json\n")
    assert main(["train", "--config", str(cfg_path)]) == 2
    # relative to the config file's directory, and said where it looked
    assert f"model.path = '{tmp_path / 'no-such-model'}': no such directory" in capsys.readouterr().err


def test_path_and_data_errors_come_before_the_run_lock_and_write_nothing(
    train_json, tmp_path, monkeypatch, capsys
):
    """A missing data file, or a record whose image is not there, is answered before the run's
    directory is locked (a live run there does not hide the mistake) and leaves nothing behind."""
    import json

    from tpkit.training import runlock

    monkeypatch.setattr(runlock, "run_lock", lambda *a, **k: pytest.fail("the lock came before the checks"))
    records = json.loads(train_json.read_text())
    records[5]["image"] = "images/nope.png"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(records))
    d = tiny_cfg_dict(train_json, tmp_path / "run", data={"image_folder": str(train_json.parent)})
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(d))
    assert (
        main(["train", "--config", str(cfg_path), "--set", f"data.train_json={tmp_path / 'nope.json'}"]) == 2
    )
    assert capsys.readouterr().err.startswith(
        f"error: data.train_json = '{tmp_path / 'nope.json'}': no such file"
    )
    assert main(["train", "--config", str(cfg_path), "--set", f"data.train_json={bad}"]) == 2
    missing = train_json.parent / "images" / "nope.png"
    assert capsys.readouterr().err == (
        f"error: data.train_json: {bad}: record #5 (id='train-000005'): image file not found: {missing}\n"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.json", "cfg.yaml"]


def test_fit_checks_every_record_before_any_weights_load(train_json, processor, tmp_path, monkeypatch):
    """An image that is there but does not open is found by the data load, before the base model."""
    import json

    from tpkit.config import from_dict
    from tpkit.data.errors import LlavaDataError
    from tpkit.training import recipe
    from tpkit.training.config import TrainConfig

    records = json.loads(train_json.read_text())
    (tmp_path / "broken.png").write_bytes(b"not a png")
    records[3]["image"] = str(tmp_path / "broken.png")
    data = tmp_path / "train.json"
    data.write_text(json.dumps(records))
    cfg = from_dict(
        TrainConfig, tiny_cfg_dict(data, tmp_path / "run", data={"image_folder": str(train_json.parent)})
    )
    monkeypatch.setattr(
        recipe, "build_student", lambda *a, **k: pytest.fail("weights loaded before the data")
    )
    with pytest.raises(LlavaDataError, match=r"record #3 .*unreadable image"):
        recipe.fit(cfg, processor=processor)
