"""Training data that goes bad: an image that fails to decode only at batch time, all-bad or empty
files, every skipped record listed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from tpkit.cli import main
from tpkit.config import from_dict
from tpkit.training.config import TrainConfig
from tpkit.training.data import ResumableSampler
from tpkit.training.recipe import fit

from .conftest import tiny_cfg_dict


@pytest.fixture
def data(tmp_path) -> Path:
    """A 16-record split of this test's own (its images may be damaged)."""
    from tpkit.synthetic.splits import generate_split

    return Path(generate_split(tmp_path / "data", split="train", n=16, seed=0))


def _truncate(train_json: Path, batch: int) -> tuple[str, Path, bytes]:
    """Cut the image data of a record the run meets in its ``batch``-th batch (0-based, batch 4):
    PIL still opens the file (the load-time check passes), decoding it fails."""
    index = ResumableSampler(16, seed=0).epoch_indices(0)[4 * batch + 1]
    record = json.loads(train_json.read_text())[index]
    image = train_json.parent / record["image"]
    good = image.read_bytes()
    image.write_bytes(good[: len(good) // 2])
    return str(record["id"]), image, good


def _cli_config(data: Path, tmp_path: Path, processor, **data_keys) -> Path:
    processor.save_pretrained(str(tmp_path / "proc"))
    d = tiny_cfg_dict(data, tmp_path / "run", trainer={"max_steps": 6, "checkpoint_every_n_steps": 0})
    d["model"]["processor_path"] = str(tmp_path / "proc")
    d["data"].update(data_keys)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


def test_an_undecodable_image_in_raise_mode_stops_with_a_checkpoint_and_resumes_exactly(
    data, tmp_path, processor, capsys
):
    rid, image, good = _truncate(data, batch=2)
    cfg_path = _cli_config(data, tmp_path, processor)
    assert main(["train", "--config", str(cfg_path)]) == 2
    err = capsys.readouterr().err
    assert f"record id='{rid}': cannot read image {image.resolve()}: OSError: image file is truncated" in err
    assert (
        f"the checkpoint {tmp_path / 'run' / 'last.ckpt'} is intact; continue with: tpkit train --config"
        in err
    )
    assert (
        torch.load(tmp_path / "run" / "last.ckpt", weights_only=True)["global_step"] == 2
    )  # before its batch
    image.write_bytes(good)  # the record is fixed
    assert main(["train", "--config", str(cfg_path), "--resume"]) == 0
    assert "done: step 6" in capsys.readouterr().out
    resumed = torch.load(tmp_path / "run" / "last.ckpt", weights_only=True)["state_dict"]
    cfg = from_dict(TrainConfig, yaml.safe_load(cfg_path.read_text()))
    cfg.trainer.out_dir = str(tmp_path / "ref")
    ref = fit(cfg, processor=processor)  # uninterrupted, on the good data
    ref_sd = {f"model.{n}": p for n, p in ref.module.model.named_parameters() if p.requires_grad}
    assert resumed.keys() == ref_sd.keys()
    for k, v in ref_sd.items():
        torch.testing.assert_close(resumed[k], v, rtol=0, atol=0, msg=k)


def test_an_undecodable_image_in_skip_mode_is_skipped_and_listed(data, tmp_path, processor, capsys):
    rid, _, _ = _truncate(data, batch=1)
    cfg_path = _cli_config(data, tmp_path, processor, on_error="skip")
    with pytest.warns(UserWarning, match=rf"skipped 1 bad records at batch time \(record \(id='{rid}'\)"):
        assert main(["train", "--config", str(cfg_path)]) == 0
    out = capsys.readouterr().out
    skipped = tmp_path / "run" / "skipped_records.jsonl"
    assert (
        "done: step 6" in out
        and f"skipped 1 bad records (data.on_error: skip), each listed in {skipped}" in out
    )
    (line,) = skipped.read_text().splitlines()
    entry = json.loads(line)
    assert (entry["id"], entry["stage"], entry["step"]) == (rid, "batch", 1) and "truncated" in entry[
        "reason"
    ]
    ckpt = torch.load(tmp_path / "run" / "last.ckpt", weights_only=True)
    assert ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["consumed"] == 8  # skipped: consumed


def test_every_record_skipped_at_load_time_is_listed(data, tmp_path, processor, capsys):
    records = json.loads(data.read_text())
    for r in records[:3]:
        r["image"] = "images/missing.png"
    data.write_text(json.dumps(records))
    cfg_path = _cli_config(data, tmp_path, processor, on_error="skip")
    with pytest.warns(UserWarning, match="skipped 3 bad records at load time"):
        assert main(["train", "--config", str(cfg_path), "--set", "trainer.max_steps=1"]) == 0
    lines = [json.loads(x) for x in (tmp_path / "run" / "skipped_records.jsonl").read_text().splitlines()]
    assert [(e["index"], e["stage"]) for e in lines] == [(0, "load"), (1, "load"), (2, "load")]
    assert "skipped 3 bad records" in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["empty", "all bad"])
def test_empty_or_all_bad_training_data_is_refused(data, tmp_path, processor, capsys, kind):
    records = json.loads(data.read_text())
    data.write_text("[]" if kind == "empty" else json.dumps([{**r, "image": "nope.png"} for r in records]))
    cfg_path = _cli_config(data, tmp_path, processor, on_error="skip")
    assert main(["train", "--config", str(cfg_path)]) == 2
    captured = capsys.readouterr()
    assert (
        f"error: data.train_json: {data}: no usable records" in captured.err and "done:" not in captured.out
    )
    assert not (tmp_path / "run" / "export").exists()


def test_every_record_skipped_at_batch_time_fails_and_exports_nothing(data, tmp_path, processor, capsys):
    """Exit 0, "done" and an untrained adapter before (0 of its lora_B tensors nonzero); now it fails
    as empty data does, says how many were skipped and where, and which command starts over."""
    for r in json.loads(data.read_text()):  # PIL opens each file (load time); decoding fails (batch time)
        image = data.parent / r["image"]
        image.write_bytes(image.read_bytes()[:200])
    cfg_path = _cli_config(data, tmp_path, processor, on_error="skip")
    with pytest.warns(UserWarning, match="at batch time"):
        assert main(["train", "--config", str(cfg_path), "--set", "trainer.export_at_end=true"]) == 2
    captured = capsys.readouterr()
    skipped = tmp_path / "run" / "skipped_records.jsonl"
    assert len(skipped.read_text().splitlines()) == 24  # 6 steps x batch 4: the epoch and a half it read
    assert (
        f"error: every record the run read was skipped (data.on_error: skip): 24 skipped, each listed in "
        f"{skipped}; nothing was trained and nothing exported. Fix the records, then start the run again "
        f"with --overwrite: tpkit train --config {cfg_path} --set trainer.export_at_end=true --overwrite"
    ) in captured.err
    assert "done:" not in captured.out and not (tmp_path / "run" / "export").exists()


def test_a_run_that_failed_before_its_first_checkpoint_does_not_block_a_plain_rerun(
    data, tmp_path, processor, capsys
):
    """A bad first batch left config.yaml, processor/ and logs/: a re-run was refused ("already holds a
    run ... --resume") and --resume too ("no checkpoint"); only --overwrite got out, and nothing said so."""
    rid, image, good = _truncate(data, batch=0)
    cfg_path = _cli_config(data, tmp_path, processor)
    argv = ["train", "--config", str(cfg_path), "--set", "trainer.logger=csv", "trainer.log_every_n_steps=1"]
    assert main(argv) == 2
    assert f"record id='{rid}': cannot read image" in capsys.readouterr().err
    out = tmp_path / "run"
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "logs", "processor"]  # no checkpoint
    image.write_bytes(good)  # the record fixed
    assert main(argv) == 0  # a plain re-run
    captured = capsys.readouterr()
    assert (
        f"note: removed config.yaml, processor from {out}: left by a run that saved no checkpoint"
        in captured.err
    )
    assert "done: step 6" in captured.out
    assert sorted(p.name for p in (out / "logs").iterdir()) == ["version_0", "version_1"]  # the old log kept
