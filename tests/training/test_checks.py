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


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_a_non_finite_learning_rate_is_a_config_error(train_json, tmp_path, value, capsys):
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_cfg_dict(train_json, tmp_path / "run")))
    assert main(["train", "--config", str(cfg_path), "--set", f"optim.lr={value}"]) == 2
    assert "invalid 'optim': lr = " in capsys.readouterr().err and not (tmp_path / "run").exists()


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
