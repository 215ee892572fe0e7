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
from tpkit.training.export import export_adapter, export_checkpoint
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


@pytest.fixture(scope="module")
def local_export(processor, tmp_path_factory):
    """An export of a run whose base is a local directory, named relatively (as configs do)."""
    import os

    from tpkit.models.llava.tiny import build_tiny_llava

    root = tmp_path_factory.mktemp("local_base")
    tok = processor.tokenizer
    base = build_tiny_llava(
        vocab_size=len(tok), image_token_id=tok.convert_tokens_to_ids("<image>"), image_size=32, patch_size=8
    )
    base.save_pretrained(root / "base")
    processor.save_pretrained(root / "base")
    cfg = from_dict(
        TrainConfig,
        {"model": {"path": "base"}, "data": {"train_json": "x.json"}, "distill": {"hidden_weight": 4.0}},
    )
    cwd = os.getcwd()
    os.chdir(root)
    try:
        from tpkit.training.lora import apply_lora

        peft_model = apply_lora(load_base_model(cfg.model, processor=processor), cfg.lora)
        out = export_adapter(peft_model, cfg, root / "export", processor=processor, metrics={"loss": 1.0})
    finally:
        os.chdir(cwd)
    return root, out


def test_an_export_travels(local_export, tmp_path, monkeypatch):
    """The base is named so that stock AutoPeftModel loads from any directory of this machine; no
    absolute path outside the field meant for this machine; the model card has a metadata block and
    the run's real loss."""
    from huggingface_hub import ModelCard
    from peft import AutoPeftModel

    root, out = local_export
    monkeypatch.chdir(tmp_path)  # another working directory
    adapter_cfg = json.loads((out / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == str((root / "base").resolve())
    assert (
        type(AutoPeftModel.from_pretrained(str(out)).get_base_model()).__name__
        == "LlavaForConditionalGeneration"
    )
    meta = json.loads((out / "tpkit_export.json").read_text())
    assert meta["model"]["path"] == "base" and meta["base"]["local_path"] == str((root / "base").resolve())
    assert meta["base"]["hub_id"] is None and set(meta["base"]["fingerprint"]) >= {
        "config_sha256",
        "embed_sum",
    }
    del meta["base"]["local_path"]
    assert str(root) not in json.dumps(meta)
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "peft" and "tpkit" in card.data.tags
    assert str(root) not in card.text
    assert "4 * (1 - cos) of the final hidden states" in card.text and "1 * CE(answer tokens)" in card.text


def test_load_exported_checks_and_takes_another_base(local_export, processor, tmp_path):
    import shutil
    import warnings

    from tpkit.models import pruning_config
    from tpkit.models.llava.tiny import build_tiny_llava
    from tpkit.models.loading import ExportBaseError

    root, out = local_export
    moved = tmp_path / "elsewhere"
    shutil.copytree(root / "base", moved)
    shutil.move(root / "base", tmp_path / "gone")  # the base is not where it was trained any more
    try:
        with pytest.raises(
            ExportBaseError,
            match=r"trained on the model 'base' \(.*base on the machine that trained\), which is not on this machine",
        ):
            load_exported(out)
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*trained on")  # the same base: no warning
            model, proc = load_exported(out, base=str(moved))
        assert proc is not None and pruning_config(model.get_base_model()) == read_pruning(out)
        tok = processor.tokenizer
        kw = dict(
            vocab_size=len(tok),
            image_token_id=tok.convert_tokens_to_ids("<image>"),
            image_size=32,
            patch_size=8,
        )
        other = load_base_model(read_base_config(out, moved), processor=processor)
        with torch.no_grad():
            other.get_input_embeddings().weight.mul_(2)  # the same model, other weights
        with pytest.warns(UserWarning, match="same architecture but other weights .*embed_sum"):
            load_exported(out, base=other)
        with pytest.raises(ExportBaseError, match=r"another architecture \(config_sha256"):
            load_exported(out, base=build_tiny_llava(hidden_size=48, **kw))
    finally:
        shutil.move(tmp_path / "gone", root / "base")


def read_base_config(out, path):
    from tpkit.models.loading import export_base_config

    return export_base_config(out, str(path))


def read_pruning(out):
    from tpkit.models.loading import read_export

    return read_export(out)[1]


@pytest.mark.parametrize(
    "damage",
    ["no adapter weights", "no adapter config", "binary pruning.json", "nan in pruning.json", "peft_type"],
)
def test_a_damaged_export_is_named_before_any_model_is_loaded(trained, tmp_path, monkeypatch, damage):
    """HFValidationError ("Repo id must be ..."), UnicodeDecodeError and TypeError tracebacks before."""
    import shutil

    from tpkit.config import ConfigError
    from tpkit.models import loading

    d = tmp_path / "export"
    shutil.copytree(trained[1].export_dir, d)
    if damage == "no adapter weights":
        (d / "adapter_model.safetensors").unlink()
        error, message = (
            FileNotFoundError,
            (f"{d}: the export lacks its adapter (adapter_model.safetensors or adapter_model.bin)"),
        )
    elif damage == "no adapter config":
        (d / "adapter_config.json").unlink()
        error, message = FileNotFoundError, f"{d}: the export lacks its adapter (adapter_config.json)"
    elif damage == "binary pruning.json":
        (d / "pruning.json").write_bytes(b"\x00\xff\xfe{}")
        error, message = ConfigError, f"{d / 'pruning.json'}: not UTF-8 text (byte 1)"
    elif damage == "nan in pruning.json":  # json writes and reads NaN; it was accepted
        pruning = json.loads((d / "pruning.json").read_text())
        pruning["stage2"]["diversity"] = float("nan")
        (d / "pruning.json").write_text(json.dumps(pruning))
        error, message = (
            ConfigError,
            f"{d / 'pruning.json'}: 'stage2.diversity' = nan must be a finite number",
        )
    else:
        adapter = json.loads((d / "adapter_config.json").read_text())
        (d / "adapter_config.json").write_text(json.dumps({**adapter, "peft_type": "PREFIX_TUNING"}))
        error, message = (
            ConfigError,
            (f"{d / 'adapter_config.json'}: peft_type = 'PREFIX_TUNING'; a tpkit export is a LoRA adapter"),
        )
    monkeypatch.setattr(loading, "load_base_model", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(error) as e:
        load_exported(d)
    assert str(e.value).startswith(message), str(e.value)
