"""The demo end to end on a tiny random LLaVA saved like the fixture (seconds, not the real result)."""

from __future__ import annotations

import json

import pytest
import torch

from tpkit.checkout import ROOT
from tpkit.cli import main
from tpkit.config import ConfigError, load_config
from tpkit.demo import ABLATIONS, DEMO_MODELS, DemoConfig, SyntheticData, run_demo
from tpkit.evaluation.config import load_eval_config
from tpkit.evaluation.report import parse_markdown_table
from tpkit.training.config import load_train_config


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """A save_pretrained LLaVA + processor directory shaped like assets/tiny-llava, random weights."""
    from tpkit.models.llava.tiny import build_tiny_llava
    from tpkit.synthetic.questions import synthetic_processor

    root = tmp_path_factory.mktemp("demo_base")
    processor = synthetic_processor(image_size=32, patch_size=8)
    tok = processor.tokenizer
    model = build_tiny_llava(
        vocab_size=len(tok), image_token_id=tok.convert_tokens_to_ids("<image>"), image_size=32, patch_size=8
    )
    model.save_pretrained(root / "base")
    processor.save_pretrained(root / "base")
    return root / "base"


def _tiny_demo(base, tmp_path, out="demo") -> DemoConfig:
    return DemoConfig(
        out_dir=str(tmp_path / out),
        base_model=str(base),
        max_steps=2,
        data=SyntheticData(dir=str(tmp_path / "data"), n_train=16, n_val=4, n_test=8),
        train_overrides=[
            "data.batch_size=4",
            "trainer.val_every_n_steps=0",
            "trainer.checkpoint_every_n_steps=0",
            "trainer.logger=none",
            "trainer.progress_bar=false",
            "distill.hidden_weight=1.0",  # the distillation run's; the plain run drops it
        ],
        eval_overrides=[
            "pruning.stage1.min_keep=4",  # the config's floor of 16 is every patch of this 16-patch model
            "eval.budgets=[0.5]",
            "eval.max_new_tokens=2",
            "eval.progress=false",
            "eval.grid_samples=2",
            "speed.batch_size=2",
            "speed.repeats=1",
            "speed.warmup=0",
            "speed.decode_tokens=1",
            "device=cpu",
        ],
    )


def _without_timings(table: str) -> list[dict[str, str]]:
    """The table's rows without the prefill-speedup column (wall-clock, the one thing that may vary)."""
    return [{k: v for k, v in row.items() if k != "prefill speedup"} for row in parse_markdown_table(table)]


@pytest.fixture(scope="module")
def demo_run(tiny_base, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("demo")
    return run_demo(_tiny_demo(tiny_base, tmp_path)), tmp_path


def test_demo_runs_end_to_end_and_writes_its_tables(demo_run):
    summary, tmp_path = demo_run
    out = tmp_path / "demo"
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["dense_accuracy"] == summary["dense_accuracy"]
    rows = [line for line in summary["table"].splitlines() if line.startswith("| ")]
    labels = [r.split("|")[1].strip() for r in rows[1:]]
    assert labels[0] == "dense" and labels[-1].startswith("**ours + LoRA + distillation**")
    assert "ours + LoRA, alpha=0 (plain)" in labels
    assert len(summary["ablation_table"].splitlines()) == 2 + len(ABLATIONS)
    assert all(row["prefill speedup"] == "–" for row in parse_markdown_table(summary["ablation_table"]))
    # the ablations are variants of the training-free run: one dense run, every variant's own settings
    base = json.loads((out / "eval_base" / "results.json").read_text())["methods"]
    assert base["ours[stage 2 only]"]["pruning"]["stage1"]["enabled"] is False
    assert base["ours[stage 1 iqr + 2]"]["pruning"]["stage1"]["selector"] == "iqr"
    assert sum(name.startswith("ours[") for name in base) == sum(1 for ch in ABLATIONS.values() if ch)
    assert (out / "train_distill" / "export" / "adapter_config.json").is_file()
    assert (out / "train_plain" / "export" / "adapter_config.json").is_file()
    # plain is plain: no teacher term, whatever train_overrides add
    kd_cfg = load_train_config(out / "train_distill" / "config.yaml").distill
    plain_cfg = load_train_config(out / "train_plain" / "config.yaml").distill
    assert (kd_cfg.alpha, kd_cfg.hidden_weight) == (1.0, 1.0)
    assert (plain_cfg.alpha, plain_cfg.hidden_weight) == (0.0, 0.0)
    assert labels[-1] == "**ours + LoRA + distillation** (alpha=1, hidden_weight=1)"
    assert (out / "eval_base" / "results.md").is_file()
    # the distilled export ran with the pruner on: its token-layer fraction is below dense's
    assert summary["ours_distilled"]["token_layer_fraction"] < 1.0
    # which question-named objects each method keeps, training-free, fine-tuned and in the ablations
    kept = [r.split("|")[1].strip() for r in summary["named_objects_table"].splitlines()[2:]]
    assert kept[0] == "ours, stage 1 only (training-free)" and "ours + LoRA + distillation" in kept
    assert sum(k.startswith("ablation: ") for k in kept) == len(ABLATIONS)
    assert "## Do the kept patches hold the objects the question names?" in (out / "summary.md").read_text()


def test_demo_is_reproducible_same_seed_same_table(demo_run, tiny_base, tmp_path):
    """A second run (new directory, data written again) gives the same tables cell for cell, the same
    answers and the same trained adapters (the random tiny model answers nothing right, so the
    answers and weights are what show it)."""
    from safetensors.torch import load_file

    first, first_dir = demo_run
    second = run_demo(_tiny_demo(tiny_base, tmp_path, out="again"))
    assert _without_timings(second["table"]) == _without_timings(first["table"])
    assert _without_timings(second["ablation_table"]) == _without_timings(first["ablation_table"])
    assert second["named_objects_table"] == first["named_objects_table"]
    a, b = first_dir / "demo", tmp_path / "again"
    for run in ("eval_base", "eval_distill", "eval_plain"):
        assert (a / run / "predictions.jsonl").read_text() == (b / run / "predictions.jsonl").read_text(), run
    for run in ("train_distill", "train_plain"):
        wa = load_file(a / run / "export" / "adapter_model.safetensors")
        wb = load_file(b / run / "export" / "adapter_model.safetensors")
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), run
    # and training moved the adapter: the two runs differ from each other (alpha 1 vs 0)
    wd = load_file(a / "train_distill" / "export" / "adapter_model.safetensors")
    wp = load_file(a / "train_plain" / "export" / "adapter_model.safetensors")
    assert any(not torch.equal(wd[k], wp[k]) for k in wd)


def test_demo_config_errors_name_the_key_and_file(tmp_path):
    p = tmp_path / "demo.yaml"
    p.write_text("max_stepz: 3\n")
    with pytest.raises(
        ConfigError, match=r"demo.yaml:1: unknown key 'max_stepz' \(did you mean 'max_steps'\?\)"
    ):
        load_config(DemoConfig, p)
    p.write_text("distill_alpha: 0\n")
    with pytest.raises(ConfigError, match="distill_alpha = 0.0 must be > 0"):
        load_config(DemoConfig, p)


def test_demo_without_base_model_says_how_to_build_it(tmp_path, capsys):
    p = tmp_path / "demo.yaml"
    p.write_text(f"base_model: {tmp_path}/nowhere\nout_dir: {tmp_path}/o\n")
    assert main(["demo", "--config", str(p)]) == 2
    err = capsys.readouterr().err
    assert f"base model '{tmp_path}/nowhere': no such model directory" in err
    assert "scripts/gpu_base.sh" in err and "--config configs/fixture/tiny_cpu.yaml" in err
    assert not (tmp_path / "o" / "eval_base").exists()  # failed before any work
    # the second model: the same message, with its own rebuild command
    args = ["demo", "--model", "tiny-qwen2-vl", "--set", f"base_model={tmp_path}/q", f"out_dir={tmp_path}/o"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"base model '{tmp_path}/q': no such model directory" in err
    assert "--config configs/fixture/tiny_qwen2_vl_cpu.yaml --out assets/tiny-qwen2-vl" in err
    assert not (tmp_path / "o").exists()


# ---- the second embedded model: tpkit demo --model tiny-qwen2-vl


def test_demo_model_picks_the_models_own_configs(capsys):
    from tpkit.cli import build_parser

    choices = next(a.choices for a in build_parser()._subparsers._group_actions[0].choices["demo"]._actions
                   if a.dest == "model")  # fmt: skip
    assert list(choices) == list(DEMO_MODELS)
    assert main(["demo", "--model", "tiny-qwen2-vl", "--print-config"]) == 0
    out = capsys.readouterr().out
    for line in (  # the checkout's files, whatever the current directory
        f"base_model: {ROOT}/assets/tiny-qwen2-vl",
        f"train_config: {ROOT}/configs/train/tiny_qwen2_vl.yaml",
        f"eval_config: {ROOT}/configs/eval/tiny_qwen2_vl.yaml",
        f"out_dir: {ROOT}/runs/demo_tiny_qwen2_vl",
    ):
        assert line in out, line
    assert main(["demo", "--print-config"]) == 0  # no --model: the tiny LLaVA's
    assert f"base_model: {ROOT}/assets/tiny-llava" in capsys.readouterr().out
    assert main(["demo", "--model", "tiny-qwen2-vl", "--config", "configs/demo.yaml"]) == 2
    assert "give one" in capsys.readouterr().err
    for path in DEMO_MODELS.values():  # every model's configs load and name the same model
        cfg = load_config(DemoConfig, ROOT / path)
        assert load_train_config(cfg.train_config).model.path == cfg.base_model
        assert load_eval_config(cfg.eval_config).model.path == cfg.base_model


@pytest.fixture(scope="module")
def tiny_qwen_base(tmp_path_factory):
    """A save_pretrained Qwen2-VL + offline processor directory shaped like assets/tiny-qwen2-vl
    (random weights; images resized to 32 px: 16 merged units)."""
    from transformers import Qwen2VLForConditionalGeneration

    from tpkit.synthetic.fixture.config import FixtureConfig
    from tpkit.synthetic.fixture.qwen import qwen_config, qwen_processor

    cfg = load_config(
        FixtureConfig,
        "configs/fixture/tiny_qwen2_vl_cpu.yaml",
        ["tower.image_size=32", "tower.hidden_size=32", "tower.num_layers=2", "lm.hidden_size=64",
         "lm.num_heads=2", "lm.num_layers=2", "lm.intermediate_size=128"],
    )  # fmt: skip
    processor = qwen_processor(cfg)
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(qwen_config(cfg, processor))
    root = tmp_path_factory.mktemp("demo_qwen") / "base"
    model.save_pretrained(root)
    processor.save_pretrained(root)
    return root


@pytest.mark.slow
def test_demo_runs_on_the_qwen2_vl_configs(tiny_qwen_base, tmp_path):
    """The Qwen2-VL demo config end to end at a few steps: train (LoRA on the LM, KD), evaluate with the
    CLS-less score, and the table has the methods that apply to a tower without CLS."""
    tiny = _tiny_demo(tiny_qwen_base, tmp_path, out="demo_qwen")
    cfg = load_config(DemoConfig, ROOT / DEMO_MODELS["tiny-qwen2-vl"])
    cfg.out_dir, cfg.base_model, cfg.max_steps, cfg.data = tiny.out_dir, tiny.base_model, 2, tiny.data
    cfg.train_overrides, cfg.eval_overrides = tiny.train_overrides, tiny.eval_overrides
    summary = run_demo(cfg)
    labels = [row["method"] for row in parse_markdown_table(summary["table"])]
    assert labels == [
        "dense",
        "ours, stage 1 only (training-free)",
        "ours (training-free)",
        "random (matched)",
        "fastv (matched)",
        "ours + LoRA, alpha=0 (plain)",
        "**ours + LoRA + distillation** (alpha=1, hidden_weight=1)",
    ]
    assert summary["ablation_table"] == ""
    out = tmp_path / "demo_qwen"
    base = json.loads((out / "eval_base" / "results.json").read_text())["methods"]
    assert base["ours"]["pruning"]["stage1"]["score"] == "mean_distance"
    assert base["dense"]["tokens"]["k1"]["mean"] == 16  # every merged unit of a 32 px image
    assert summary["ours_distilled"]["token_layer_fraction"] < 1.0
    adapter = json.loads((out / "train_distill" / "export" / "adapter_config.json").read_text())
    assert "language_model" in adapter["target_modules"] and "visual" not in adapter["target_modules"]
