"""Export: stock PeftModel.from_pretrained reproduces the trained module; load_exported attaches the pruner."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel

from tpkit.cli import main
from tpkit.config import from_dict
from tpkit.data.collator import LlavaCollator
from tpkit.data.llava_json import load_llava_json
from tpkit.models import is_attached, pruning_disabled
from tpkit.models.loading import load_base_model, load_exported
from tpkit.training.config import TrainConfig
from tpkit.training.export import export_checkpoint
from tpkit.training.recipe import fit

from .conftest import tiny_cfg_dict


@pytest.fixture(scope="module")
def trained(train_json, processor, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = from_dict(
        TrainConfig,
        tiny_cfg_dict(
            train_json, out, lora={"train_projector": True}, trainer={"max_steps": 3, "export_at_end": True}
        ),
    )
    res = fit(cfg, processor=processor)
    ds, _ = load_llava_json(train_json)
    batch = LlavaCollator(processor, max_length=128, mode="train")([ds[i] for i in range(3)])
    return cfg, res, batch


def _inputs(batch):
    return {k: batch[k] for k in ("input_ids", "pixel_values", "attention_mask")}


def test_export_dir_contents(trained):
    cfg, res, _ = trained
    d = res.export_dir
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "pruning.json",
        "README.md",
        "tokenizer.json",
    ):
        assert (d / name).is_file(), name
    assert json.loads((d / "pruning.json").read_text())["stage2"]["layer"] == 1
    assert "global_step" in (d / "README.md").read_text()
    assert (res.out_dir / "config.yaml").is_file()


def test_stock_peft_loads_export_with_same_logits(trained, processor):  # noqa: F811
    cfg, res, batch = trained
    module_model = res.module.model.eval()
    with pruning_disabled(module_model.get_base_model()), torch.no_grad():
        ref = module_model(**_inputs(batch)).logits
    base = load_base_model(cfg.model, processor=processor)  # a fresh, stock base
    loaded = PeftModel.from_pretrained(base, str(res.export_dir)).eval()
    with torch.no_grad():
        got = loaded(**_inputs(batch)).logits
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_load_exported_attaches_pruner(trained):
    cfg, res, batch = trained
    module_model = res.module.model.eval()
    with torch.no_grad():
        ref = module_model(**_inputs(batch))
        model, processor = load_exported(res.export_dir)  # base rebuilt from the recorded ModelConfig
        assert processor is not None and processor.tokenizer.pad_token_id == 0
        assert is_attached(model.get_base_model())
        got = model(**_inputs(batch))
        torch.testing.assert_close(got.kept_index, ref.kept_index, rtol=0, atol=0)
        torch.testing.assert_close(got.logits, ref.logits, rtol=0, atol=0)
        merged, _ = load_exported(res.export_dir, merge=True)
        assert is_attached(merged)
        torch.testing.assert_close(merged(**_inputs(batch)).logits, ref.logits, rtol=1e-5, atol=1e-5)


def test_export_cli_from_checkpoint_and_merged(trained, tmp_path):
    cfg, res, batch = trained
    out = tmp_path / "exp"
    assert main(["export", "--ckpt", str(res.checkpoint), "--out", str(out), "--merged"]) == 0
    a, _ = load_exported(out, attach=False)
    b, _ = load_exported(res.export_dir, attach=False)
    with torch.no_grad():
        torch.testing.assert_close(a(**_inputs(batch)).logits, b(**_inputs(batch)).logits, rtol=0, atol=0)
    from transformers import LlavaForConditionalGeneration

    merged = LlavaForConditionalGeneration.from_pretrained(out / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(
            merged(**_inputs(batch)).logits, b(**_inputs(batch)).logits, rtol=1e-5, atol=1e-5
        )
    with pytest.raises(FileNotFoundError):
        export_checkpoint(tmp_path / "missing.ckpt", tmp_path / "x")
