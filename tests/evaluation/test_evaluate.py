"""evaluate(): an end-to-end tiny run writes a readable report; bad configs fail clearly."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import re
from pathlib import Path

import pytest
import torch
import transformers

from tpkit.cli import main
from tpkit.config import ConfigError
from tpkit.evaluation.config import load_eval_config
from tpkit.evaluation.report import TABLE_COLUMNS, parse_markdown_table
from tpkit.evaluation.runner import EvalError, evaluate


def test_evaluate_writes_report(eval_cfg):
    eval_cfg.eval.methods = ["dense", "ours", "ours-s1", "random", "topk-cls", "fastv", "prumerge-iqr"]
    eval_cfg.eval.sweep_methods = ["ours", "random"]
    res = evaluate(eval_cfg)
    out = Path(eval_cfg.out_dir)
    for name in ("results.json", "results.md", "predictions.jsonl", "config.yaml", "kept_patches.png",
                 "accuracy_vs_tokens.png", "speedup_vs_tokens.png"):  # fmt: skip
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    text = (out / "results.md").read_text()
    head = text.split("\n\n| method |")[0].splitlines()
    assert head[:6] == [
        "# Evaluation",
        "",
        "- model: `tiny` (float32, sdpa), 4 language-model layers",
        "- adapter: none",
        f"- data: `{eval_cfg.data.test_json}`: 6 samples of 6 records",
        f"- device: cpu ({platform.machine()}, {os.cpu_count()} cores); timed with 1 torch thread(s)",
    ]
    version = importlib.metadata.version("tpkit")
    assert re.fullmatch(
        rf"- run: \d{{4}}-\d\d-\d\d \d\d:\d\d UTC, tpkit {re.escape(version)}( \(git [0-9a-f]+(, modified)?\))?, "
        rf"torch {re.escape(torch.__version__)}, transformers {re.escape(transformers.__version__)}",
        head[6],
    ), head[6]
    rows = parse_markdown_table(text)
    assert list(rows[0]) == list(TABLE_COLUMNS)
    expected = eval_cfg.eval.methods + ["ours@0.4", "random@0.4"]
    assert sorted(r["method"] for r in rows) == sorted(expected)
    assert rows[0]["method"] == "dense" and rows[0]["token-layer frac."] == "100.0%"
    assert rows[0]["prefill speedup"] == "1.00×"
    data = json.loads((out / "results.json").read_text())
    assert set(data["methods"]) == set(expected)
    ours = data["methods"]["ours"]
    assert ours["n"] == 6 and 0 < ours["tokens"]["fraction"]["mean"] < 1
    assert set(ours["tokens"]["k1"]) == {"mean", "p10", "p50", "p90"}
    assert ours["speed"]["prefill"]["median_ms"] > 0 and ours["speed"]["ttft_ms"] > 0
    assert 0 < ours["flops"]["relative"] < 1
    assert data["methods"]["random"]["budget_gap_tokens"] <= 1.0
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 6 and set(expected) <= set(preds[0])
    assert res["table"] == (out / "results.md").read_text()
    # which question-named objects survive each stage, on every sample that names one
    from tpkit.synthetic.questions import named_objects

    n_named = sum(bool(named_objects(r)) for r in json.loads(Path(eval_cfg.data.test_json).read_text()))
    assert n_named > 0 and "named_objects" not in data["methods"]["dense"]
    for m in ("ours", "ours-s1", "random", "topk-cls"):
        s1, s2 = data["methods"][m]["named_objects"]["stage1"], data["methods"][m]["named_objects"]["stage2"]
        assert s1["n"] == s2["n"] == n_named and 0 <= s2["all_kept"] <= s1["all_kept"] <= 1
    s1, s2 = data["methods"]["ours-s1"]["named_objects"].values()  # no stage 2: nothing more is dropped
    assert s2["kept_patches"] == s1["kept_patches"] and s2["all_kept"] == s1["all_kept"]
    assert s2["random_all_kept"] == pytest.approx(s1["all_kept"])  # "random" takes the whole pool
    assert "named objects kept, stage 1" in (out / "results.md").read_text()


def test_dense_twice_gives_identical_answers(eval_cfg, tmp_path):
    eval_cfg.eval.methods = ["dense"]
    eval_cfg.eval.budgets = []
    eval_cfg.eval.grid_samples = 0
    eval_cfg.speed.enabled = False
    a = evaluate(eval_cfg)
    eval_cfg.out_dir = str(tmp_path / "again")
    b = evaluate(eval_cfg)
    pa = (Path(a["files"]["json"]).parent / "predictions.jsonl").read_text()
    pb = (Path(b["files"]["json"]).parent / "predictions.jsonl").read_text()
    assert pa == pb
    assert a["methods"]["dense"]["accuracy"] == b["methods"]["dense"]["accuracy"]


def _write(tmp_path, text: str) -> str:
    p = tmp_path / "eval.yaml"
    p.write_text(text)
    return str(p)


def test_unknown_method_is_a_clear_error(tmp_path, eval_assets):
    path = _write(
        tmp_path, f"data:\n  test_json: {eval_assets['test_json']}\neval:\n  methods: [dense, fastvv]\n"
    )
    with pytest.raises(
        ConfigError, match=r"eval\.yaml:\d+: invalid 'eval': unknown method\(s\) \['fastvv'\]"
    ):
        load_eval_config(path)


def test_variants_run_beside_ours_and_equal_a_run_with_those_settings(eval_cfg, tmp_path):
    import copy

    eval_cfg.eval.methods = ["dense", "ours"]
    eval_cfg.eval.budgets = []
    eval_cfg.eval.grid_samples = 0
    eval_cfg.speed.repeats = 1
    eval_cfg.speed.generation = False
    eval_cfg.eval.variants = {
        "s1 ratio": {"stage1.selector": "ratio", "stage1.ratio": 0.5},
        "no s2": {"stage2.enabled": False},
    }
    both = evaluate(eval_cfg)
    m = both["methods"]
    assert list(m) == ["dense", "ours", "ours[s1 ratio]", "ours[no s2]"]
    assert m["ours[s1 ratio]"]["tokens"]["k1"]["mean"] == 72.0  # ratio 0.5 of 144 patches
    assert m["ours[no s2]"]["pruning"]["stage2"]["enabled"] is False
    assert "speed" not in m["ours[s1 ratio]"] and "speed" in m["ours"]  # variants are not timed
    rows = parse_markdown_table((Path(eval_cfg.out_dir) / "results.md").read_text())
    assert [r["method"] for r in rows] == list(m)

    alone = copy.deepcopy(eval_cfg)  # the same settings as ours in a run of their own
    alone.eval.variants = {}
    alone.pruning.stage1.selector, alone.pruning.stage1.ratio = "ratio", 0.5
    alone.speed.enabled = False
    alone.out_dir = str(tmp_path / "alone")
    ref = evaluate(alone)["methods"]["ours"]
    assert m["ours[s1 ratio]"]["accuracy"] == ref["accuracy"]
    assert m["ours[s1 ratio]"]["tokens"] == ref["tokens"]
    preds = [
        json.loads(line) for line in (Path(eval_cfg.out_dir) / "predictions.jsonl").read_text().splitlines()
    ]
    alone_preds = [
        json.loads(line) for line in (tmp_path / "alone" / "predictions.jsonl").read_text().splitlines()
    ]
    assert [p["ours[s1 ratio]"] for p in preds] == [p["ours"] for p in alone_preds]


@pytest.mark.parametrize(
    "variants, message",
    [
        (
            "{x: {stage1.selctor: curvature}}",
            r"eval\.variants\['x'\]: unknown key 'stage1\.selctor' \(did you mean 'stage1\.selector'\?\)",
        ),
        ("{x: {stage1.selector: knee}}", r"eval\.variants\['x'\]: 'stage1\.selector' = 'knee' is not one of"),
        ("{x: {stage9.selector: iqr}}", r"eval\.variants\['x'\]: 'stage9\.selector' is not a pruning key"),
        ("{x: curvature}", r"variants\['x'\] = 'curvature' must be a mapping"),
        ("{'a[1]': {}}", r"name 'a\[1\]' must be a non-empty string"),
    ],
)
def test_bad_variants_are_clear_errors(tmp_path, eval_assets, variants, message):
    with pytest.raises(ConfigError, match=message):
        load_eval_config(None, [f"data.test_json={eval_assets['test_json']}", f"eval.variants={variants}"])


def test_unknown_key_is_a_clear_error(tmp_path, eval_assets):
    path = _write(tmp_path, f"data:\n  test_json: {eval_assets['test_json']}\neval:\n  method: [dense]\n")
    with pytest.raises(
        ConfigError, match=r"eval\.yaml:4: unknown key 'eval\.method' \(did you mean 'eval\.methods'\?\)"
    ):
        load_eval_config(path)


def test_missing_adapter_dir_is_a_clear_error(tmp_path, eval_assets, capsys):
    path = _write(tmp_path, f"adapter: {tmp_path}/nope\ndata:\n  test_json: {eval_assets['test_json']}\n")
    with pytest.raises(EvalError, match=r"adapter = '.*nope': no such directory"):
        evaluate(load_eval_config(path))
    assert main(["evaluate", "--config", str(path)]) == 2  # before any model work
    assert "no such directory" in capsys.readouterr().err


def test_missing_dataset_is_a_clear_error(tmp_path):
    cfg = load_eval_config(None, [f"data.test_json={tmp_path}/missing.json"])
    with pytest.raises(EvalError, match=r"data\.test_json = '.*missing\.json': no such file"):
        evaluate(cfg)


def test_empty_dataset_is_a_clear_error(eval_cfg, tmp_path):
    from tpkit.data.errors import LlavaDataError

    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    eval_cfg.data.test_json = str(empty)
    with pytest.raises(LlavaDataError, match=r"empty\.json: no usable records: the file holds no records"):
        evaluate(eval_cfg)


def test_cli_reports_config_errors(tmp_path):
    """evaluate.py, run as users run it, answers a bad config with the key and exit code 2."""
    import subprocess
    import sys

    script = Path(__file__).parents[2] / "evaluate.py"
    args = ["--set", "eval.methods=[dense,bogus]", "--set", f"data.test_json={tmp_path}/x.json"]
    out = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "unknown method(s) ['bogus']" in out.stderr


def test_evaluate_with_exported_adapter_uses_its_pruning(eval_cfg, eval_assets, tmp_path):
    from tpkit.models.config import ModelConfig
    from tpkit.models.loading import load_base_model
    from tpkit.pruning import PruningConfig
    from tpkit.training.config import TrainConfig
    from tpkit.training.export import export_adapter
    from tpkit.training.lora import apply_lora

    processor = eval_assets["processor"]
    mcfg = ModelConfig(path="tiny", dtype="float32")
    peft_model = apply_lora(load_base_model(mcfg, processor=processor), TrainConfig().lora)
    train_cfg = TrainConfig(model=mcfg, pruning=PruningConfig())
    train_cfg.pruning.stage1.selector, train_cfg.pruning.stage1.ratio = "ratio", 0.5
    export_adapter(
        peft_model, train_cfg, tmp_path / "export", processor=processor, metrics={"global_step": 3.0}
    )

    eval_cfg.adapter = str(tmp_path / "export")
    eval_cfg.eval.methods = ["dense", "ours"]
    eval_cfg.eval.budgets = []
    eval_cfg.speed.enabled = False
    res = evaluate(eval_cfg)
    assert res["methods"]["ours"]["tokens"]["k1"]["mean"] == 72.0  # the export's ratio 0.5 of 144 patches
    assert res["methods"]["ours"]["pruning"]["stage1"]["selector"] == "ratio"
    assert res["model"]["adapter_step"] == 3
    assert (
        f"- adapter: `{tmp_path / 'export'}` (step 3); `dense` is the base model without it" in res["table"]
    )


def test_an_adapter_trained_without_stage_1_leaves_the_matched_baselines_out(eval_cfg, eval_assets, tmp_path):
    """Matched to ours' stage-1 counts, random and topk-cls would keep every patch, equal to dense: they
    are left out, with a warning and a note in results.md, instead of rows that look like results."""
    from tpkit.models.config import ModelConfig
    from tpkit.models.loading import load_base_model
    from tpkit.pruning import PruningConfig
    from tpkit.training.config import TrainConfig
    from tpkit.training.export import export_adapter
    from tpkit.training.lora import apply_lora

    processor = eval_assets["processor"]
    mcfg = ModelConfig(path="tiny", dtype="float32")
    peft_model = apply_lora(load_base_model(mcfg, processor=processor), TrainConfig().lora)
    export_adapter(peft_model, TrainConfig(model=mcfg, pruning=PruningConfig.disabled()), tmp_path / "export")
    eval_cfg.adapter = str(tmp_path / "export")
    eval_cfg.eval.methods = ["dense", "ours", "random", "topk-cls"]
    eval_cfg.eval.sweep_methods = ["ours"]
    eval_cfg.eval.grid_samples = 0
    eval_cfg.speed.enabled = False
    res = evaluate(eval_cfg)
    assert list(res["methods"]) == ["dense", "ours"]
    note = (
        f"random, topk-cls, ours@F left out: they are matched to ours' stage-1 counts, and ours' pruning "
        f"({tmp_path / 'export'}) has stage 1 off"
    )
    assert res["notes"][0].startswith(note) and f"- {note}" in res["table"]


def test_with_an_adapter_dense_is_the_base_model_and_the_rest_use_the_adapter(
    eval_cfg, eval_assets, tmp_path
):
    """An export's "% of dense" compares with the unpruned original, not the adapter run unpruned."""
    import copy

    import torch

    from tpkit.models.config import ModelConfig
    from tpkit.models.loading import load_base_model
    from tpkit.training.config import TrainConfig
    from tpkit.training.export import export_adapter
    from tpkit.training.lora import apply_lora

    processor = eval_assets["processor"]
    mcfg = ModelConfig(path="tiny", dtype="float32")
    peft_model = apply_lora(load_base_model(mcfg, processor=processor), TrainConfig().lora)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a trained-looking adapter: lora_B is zero at init, which changes nothing
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    export_adapter(
        peft_model,
        TrainConfig(model=mcfg, pruning=eval_cfg.pruning),
        tmp_path / "export",
        processor=processor,
    )

    eval_cfg.eval.methods = ["dense", "ours"]
    eval_cfg.eval.budgets = []
    eval_cfg.speed.enabled = False
    eval_cfg.eval.grid_samples = 0
    plain = copy.deepcopy(eval_cfg)
    plain.out_dir = str(tmp_path / "base")
    base = evaluate(plain)
    eval_cfg.adapter = str(tmp_path / "export")
    eval_cfg.out_dir = str(tmp_path / "tuned")
    tuned = evaluate(eval_cfg)

    def answers(out_dir):
        rows = [json.loads(line) for line in (Path(out_dir) / "predictions.jsonl").read_text().splitlines()]
        return {m: [r[m] for r in rows] for m in ("dense", "ours")}

    a, b = answers(plain.out_dir), answers(eval_cfg.out_dir)
    assert b["dense"] == a["dense"]  # the reference is the base model, adapter off
    assert b["ours"] != a["ours"]  # the pruned rows run with the adapter merged in
    assert tuned["model"]["dense"] == "base model without the adapter"
    assert base["model"]["dense"] == "base model"
    assert (
        "`dense` is the base model without the adapter" in (Path(eval_cfg.out_dir) / "results.md").read_text()
    )


def test_not_an_export_is_a_clear_error(eval_cfg, tmp_path):
    (tmp_path / "adapter").mkdir()
    eval_cfg.adapter = str(tmp_path / "adapter")
    with pytest.raises(EvalError, match="is not a tpkit export"):
        evaluate(eval_cfg)


def test_missing_model_dir_is_a_clear_error(eval_cfg, tmp_path):
    eval_cfg.model.path = str(tmp_path / "no-model")
    with pytest.raises(EvalError, match=r"model\.path = '.*no-model': no such directory"):
        evaluate(eval_cfg)
