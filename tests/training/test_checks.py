"""Checks before work: impossible optimizer values, a logger that is not installed, a LoRA rank or a
stage-1 minimum the model cannot take, and training that diverges are refused with the key named."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import yaml

from tpkit.cli import main
from tpkit.config import ConfigError, from_dict
from tpkit.training.config import TrainConfig
from tpkit.training.recipe import build_student, build_trainer, fit

from .conftest import tiny_cfg_dict


@pytest.mark.parametrize(
    "setting, message",
    [
        ("optim.lr=.inf", "'optim.lr' = inf must be a finite number"),
        ("optim.lr=-.inf", "'optim.lr' = -inf must be a finite number"),
        ("optim.lr=.nan", "'optim.lr' = nan must be a finite number"),
        ("pruning.stage2.diversity=.nan", "'pruning.stage2.diversity' = nan must be a finite number"),
        ("pruning.stage2.diversity=.inf", "'pruning.stage2.diversity' = inf must be a finite number"),
        # AdamW's first step lr / (1 - beta1) overflowed float32 inside the optimizer: a raw RuntimeError
        (
            "optim.lr=1e38",
            "lr = 1e+38 is too large: AdamW's first step, lr / (1 - betas[0]) = 1e+39, overflows",
        ),
        # a raw Lightning MisconfigurationException once the model had loaded
        ("trainer.devices=0", "devices = 0 must be >= 1 (processes per node), -1 (every device) or 'auto'"),
    ],
)
def test_impossible_numbers_are_config_errors_before_anything_runs(
    train_json, tmp_path, setting, message, capsys
):
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_cfg_dict(train_json, tmp_path / "run")))
    assert main(["train", "--config", str(cfg_path), "--set", setting]) == 2
    err = capsys.readouterr().err
    assert err.startswith("config error: ") and message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_a_trainer_setting_lightning_refuses_is_an_error_not_a_traceback(train_json, tmp_path, capsys):
    cfg_path = tmp_path / "cfg.yaml"
    # the tiny model's own processor (its records are 226 tokens): data that passes, so the trainer is next
    cfg = tiny_cfg_dict(train_json, tmp_path / "run", data={"max_length": 512})
    cfg_path.write_text(yaml.safe_dump(cfg))
    assert main(["train", "--config", str(cfg_path), "--set", "trainer.accelerator=gpu"]) == 2
    err = capsys.readouterr().err
    assert err == "error: trainer: No supported gpu backend found!\n"
    assert not (tmp_path / "run").exists()  # the run directory it made for its lock is gone with it


def test_a_logger_that_is_not_installed_fails_with_the_config(train_json, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n.startswith("tensorboard") else real(n, *a)
    )
    d = tiny_cfg_dict(train_json, tmp_path / "run", trainer={"logger": "tensorboard"})
    with pytest.raises(
        ConfigError, match=r"logger = 'tensorboard' needs the tensorboard package.*pip install tensorboard"
    ):
        from_dict(TrainConfig, d)
    if real("wandb") is None:
        with pytest.raises(ConfigError, match="logger = 'wandb' needs the wandb package"):
            from_dict(TrainConfig, tiny_cfg_dict(train_json, tmp_path / "run", trainer={"logger": "wandb"}))


def test_wandb_and_mlflow_loggers_are_built_when_installed(train_json, tmp_path, monkeypatch):
    import lightning.pytorch.loggers as loggers

    made = {}
    for name in ("WandbLogger", "MLFlowLogger"):
        monkeypatch.setattr(loggers, name, lambda _name=name, **kw: made.setdefault(_name, kw) and False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: object())  # "installed"
    for logger in ("wandb", "mlflow"):
        cfg = from_dict(TrainConfig, tiny_cfg_dict(train_json, tmp_path / "run", trainer={"logger": logger}))
        build_trainer(cfg)
    assert made["WandbLogger"]["save_dir"] == str(tmp_path / "run")
    assert made["MLFlowLogger"]["tracking_uri"] == (tmp_path / "run" / "mlruns").as_uri()


def test_stage1_min_keep_above_the_patch_count_is_refused(make_cfg, processor):
    cfg = make_cfg(pruning={"stage1": {"min_keep": 1000}, "stage2": {"layer": 1}})
    with pytest.raises(
        ConfigError, match=r"pruning.stage1.min_keep = 1000 but an image of this model has 16 patches"
    ):
        build_student(cfg, processor)


def test_a_lora_rank_the_model_cannot_take_is_refused_before_allocating(make_cfg, processor, monkeypatch):
    with pytest.raises(
        ConfigError,
        match=r"lora.r = 100000 is larger than the smaller side \(16\) of the target layer .*k_proj",
    ):
        build_student(make_cfg(lora={"r": 100000}), processor)
    from tpkit.training import lora

    monkeypatch.setattr(lora, "_free_bytes", lambda device: 1000)  # a machine with 1 kB free
    with pytest.raises(ConfigError, match=r"lora.r = 16: the adapter .* needs about .* GiB .* Lower lora.r"):
        build_student(make_cfg(lora={"r": 16}), processor)


def test_a_diverging_run_stops_before_saving_or_exporting(make_cfg, processor, monkeypatch):
    from tpkit.training.module import DistillLoRAModule, NonFiniteError

    cfg = make_cfg(trainer={"max_steps": 6, "checkpoint_every_n_steps": 2, "export_at_end": True})
    real = DistillLoRAModule.losses

    def losses(self, batch):
        parts = real(self, batch)
        if self.trainer.global_step == 3:
            parts["loss"] = parts["loss"] * float("nan")
        return parts

    monkeypatch.setattr(DistillLoRAModule, "losses", losses)
    with pytest.raises(
        NonFiniteError, match=r"non-finite loss at step 3 \(.*loss=nan.*\): training diverged"
    ):
        fit(cfg, processor=processor)
    ckpt = torch.load(f"{cfg.trainer.out_dir}/last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2
    monkeypatch.setattr(DistillLoRAModule, "losses", real)

    class Poison(__import__("lightning").Callback):  # weights that went non-finite are never saved
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.global_step == 3:  # the 4th step's update, after its (finite) loss
                with torch.no_grad():
                    next(p for p in pl_module.parameters() if p.requires_grad).fill_(float("inf"))

    cfg = make_cfg(
        trainer={"out_dir": cfg.trainer.out_dir + "2", "max_steps": 6, "checkpoint_every_n_steps": 2}
    )
    with pytest.raises(NonFiniteError, match="non-finite weights at step 4"):
        fit(cfg, processor=processor, callbacks=[Poison()])
    ckpt = torch.load(f"{cfg.trainer.out_dir}/last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2 and all(v.isfinite().all() for v in ckpt["state_dict"].values())


def test_loss_watch_warns_once_when_the_loss_stays_far_above_its_start():
    from tpkit.training.module import LossWatch

    # start: the first batch; warn when the mean of the last 10 > max(2 x start, start + 1), 10 in a row
    w = LossWatch()
    fired = [w.add(x) for x in [1.0] * 10]
    fired += [w.add(x) for x in [1.9] * 40]  # below 2 x start however long: never
    assert not any(fired) and w.above == 0
    fired = [w.add(x) for x in [3.0] * 40]
    # the first 3.0 lifts the window mean to 2.01 > 2 x start: the 10th such batch in a row warns, once
    assert fired.index(True) == 9 and sum(fired) == 1
    assert w.summary() == (1.0, 3.0, 10)
    again = LossWatch()
    again.load_state_dict(w.state_dict())
    assert again.summary() == w.summary() and again.warned and again.seen == 90
    low = LossWatch()  # a loss that starts near zero: 3 x its start is noise, not divergence
    assert not any(low.add(x) for x in [0.01] + [0.03] * 100)
    short = LossWatch()
    for x in (4.0, 3.0, 2.0):
        short.add(x)
    assert short.summary() == (4.0, 3.0, 3)


def test_a_loss_that_climbs_is_warned_about_and_the_done_line_shows_first_and_last(
    make_cfg, tmp_path, processor, train_json, monkeypatch, capsys
):
    """A learning rate far too high sends the loss up and keeps it there without a NaN (lr 1e6 on the
    fixture model: loss 27, exit 0); the run warns and says its first and last loss."""
    from tpkit.training.module import DistillLoRAModule, LossWatch

    monkeypatch.setattr(LossWatch, "WINDOW", 2)
    monkeypatch.setattr(LossWatch, "PATIENCE", 3)
    real = DistillLoRAModule.losses
    seen = []

    def losses(self, batch):  # a loss that climbs 4x per step: divergence without a NaN
        parts = real(self, batch)
        parts["loss"] = parts["loss"] * 4.0**self.trainer.global_step
        seen.append(float(parts["loss"].detach()))
        return parts

    monkeypatch.setattr(DistillLoRAModule, "losses", losses)
    processor.save_pretrained(str(tmp_path / "proc"))
    d = tiny_cfg_dict(train_json, tmp_path / "run", trainer={"max_steps": 6})
    d["model"]["processor_path"] = str(tmp_path / "proc")
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(d))
    with pytest.warns(
        UserWarning, match=r"the training loss has risen from .* \(step 3\): the run is probably diverging"
    ) as w:
        assert main(["train", "--config", str(tmp_path / "cfg.yaml")]) == 0
    assert sum("diverging" in str(x.message) for x in w) == 1
    done = f"done: step 6, train loss {seen[0]:.4g} (first batch) -> {(seen[4] + seen[5]) / 2:.4g} (mean of the last 2)"
    assert done in capsys.readouterr().out
