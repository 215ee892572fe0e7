"""evaluate(): checks before work (the adapter's base, the output directory, the data), overrides of
an adapter's pruning applied and recorded, skipped records reported, results kept as methods finish."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from tpkit.cli import main
from tpkit.data.llava_json import LlavaDataError
from tpkit.evaluation.runner import EvalError, evaluate


def _small(cfg):
    cfg.eval.methods, cfg.eval.budgets, cfg.eval.grid_samples = ["dense", "ours"], [], 0
    cfg.speed.enabled = False
    return cfg


@pytest.fixture(scope="module")
def exported(eval_assets, tmp_path_factory):
    """A local base directory (the evaluation's tiny model, saved) and an adapter export trained on it."""
    from tpkit.config import from_dict
    from tpkit.models.loading import load_base_model
    from tpkit.training.config import TrainConfig
    from tpkit.training.export import export_adapter
    from tpkit.training.lora import apply_lora

    root = tmp_path_factory.mktemp("exported")
    processor = eval_assets["processor"]
    cfg = from_dict(TrainConfig, {"model": {"path": "tiny", "dtype": "float32"}, "data": {"train_json": "x"}})
    load_base_model(cfg.model, processor=processor).save_pretrained(root / "base")
    processor.save_pretrained(root / "base")
    cfg.model.path = str(root / "base")
    cfg.pruning.stage1.selector, cfg.pruning.stage1.ratio = "ratio", 0.5
    peft_model = apply_lora(load_base_model(cfg.model, processor=processor), cfg.lora)
    export_adapter(peft_model, cfg, root / "export", processor=processor)
    return root


def _methods_run(out_dir) -> list[str]:
    d = Path(out_dir) / "methods"
    return sorted(p.stem for p in d.glob("*.json")) if d.is_dir() else []


def test_an_adapter_of_another_base_is_refused_before_any_model_work(
    eval_cfg, exported, eval_assets, tmp_path
):
    from tpkit.models.llava.tiny import build_tiny_llava

    tok = eval_assets["processor"].tokenizer
    other = build_tiny_llava(
        vocab_size=len(tok), image_token_id=tok.convert_tokens_to_ids("<image>"), hidden_size=48
    )
    other.save_pretrained(tmp_path / "other")
    eval_cfg = _small(eval_cfg)
    eval_cfg.adapter = str(exported / "export")
    eval_cfg.model.path = str(tmp_path / "other")
    with pytest.raises(EvalError, match=r"was trained on the model 'base' .*another architecture"):
        evaluate(eval_cfg)
    assert _methods_run(eval_cfg.out_dir) == []  # no dense pass first


def test_an_adapter_of_the_same_base_with_other_weights_warns(eval_cfg, exported, tmp_path, capsys):
    from transformers import LlavaForConditionalGeneration

    m = LlavaForConditionalGeneration.from_pretrained(exported / "base")
    with torch.no_grad():
        m.get_input_embeddings().weight.mul_(2)
    m.save_pretrained(tmp_path / "retrained")
    eval_cfg = _small(eval_cfg)
    eval_cfg.adapter = str(exported / "export")
    eval_cfg.model.path = str(tmp_path / "retrained")
    evaluate(eval_cfg)
    assert "same architecture but other weights" in capsys.readouterr().err


def test_pruning_overrides_apply_on_top_of_the_adapters_and_are_recorded(
    eval_cfg, exported, tmp_path, capsys
):
    cfg_path = tmp_path / "eval.yaml"
    d = yaml.safe_load(yaml.safe_dump({"model": {"path": str(exported / "base"), "dtype": "float32"}}))
    d.update(
        adapter=str(exported / "export"),
        data={"test_json": eval_cfg.data.test_json, "eval_batch_size": 4},
        eval={
            "methods": ["dense", "ours"],
            "budgets": [],
            "grid_samples": 0,
            "max_new_tokens": 2,
            "progress": False,
        },
        speed={"enabled": False},
        out_dir=str(tmp_path / "out"),
        device="cpu",
    )
    cfg_path.write_text(yaml.safe_dump(d))
    assert main(["evaluate", "--config", str(cfg_path), "--set", "pruning.stage1.ratio=0.25"]) == 0
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    ours = res["methods"]["ours"]
    assert ours["pruning"]["stage1"]["selector"] == "ratio"  # the adapter's
    assert ours["pruning"]["stage1"]["ratio"] == 0.25 and ours["tokens"]["k1"]["mean"] == 36.0  # 0.25 of 144
    assert res["model"]["pruning_overrides"] == {"stage1.ratio": 0.25}
    assert res["config"]["pruning"]["stage1"]["ratio"] == 0.25


def test_an_unwritable_out_dir_fails_before_any_model_work(eval_cfg, tmp_path):
    (tmp_path / "file").write_text("")
    eval_cfg.out_dir = str(tmp_path / "file" / "out")
    with pytest.raises(EvalError, match=r"out_dir = '.*file/out' cannot be written"):
        evaluate(_small(eval_cfg))


def test_results_are_kept_as_methods_finish(eval_cfg, monkeypatch):
    from tpkit.evaluation import runner

    real = runner.run_method

    def crash_at_random(model, spec, *a, **kw):
        if spec.name == "random":
            raise RuntimeError("crash late in the run")
        return real(model, spec, *a, **kw)

    monkeypatch.setattr(runner, "run_method", crash_at_random)
    eval_cfg = _small(eval_cfg)
    eval_cfg.eval.methods = ["dense", "ours", "random"]
    with pytest.raises(RuntimeError, match="crash late"):
        evaluate(eval_cfg)
    assert _methods_run(eval_cfg.out_dir) == ["dense", "ours"]
    dense = json.loads((Path(eval_cfg.out_dir) / "methods" / "dense.json").read_text())
    assert (
        len(dense["answers"]) == len(dense["ids"]) == 6 and (Path(eval_cfg.out_dir) / "config.yaml").is_file()
    )


def _truncate_first_image(test_json: str, tmp_path: Path) -> tuple[Path, str]:
    """A copy of the test split whose first image is cut (it opens, it does not decode)."""
    import shutil

    src = Path(test_json)
    shutil.copytree(src.parent, tmp_path / "data")
    copy = tmp_path / "data" / src.name
    record = json.loads(copy.read_text())[0]
    image = copy.parent / record["image"]
    image.write_bytes(image.read_bytes()[:200])
    return copy, str(record["id"])


def test_skipped_records_are_reported_and_listed(eval_cfg, tmp_path, capsys):
    test_json, rid = _truncate_first_image(eval_cfg.data.test_json, tmp_path)
    records = json.loads(test_json.read_text())
    long_q = "<image>\n" + " ".join(["What color is the circle?"] * 60)
    records[1]["conversations"][0]["value"] = long_q  # over max_length: a bad record in eval too
    test_json.write_text(json.dumps(records))
    eval_cfg = _small(eval_cfg)
    eval_cfg.data.test_json, eval_cfg.data.on_error, eval_cfg.data.max_length = str(test_json), "skip", 256
    res = evaluate(eval_cfg)
    skipped = Path(eval_cfg.out_dir) / "skipped_records.jsonl"
    assert res["dataset"] == {
        "path": str(test_json),
        "n": 4,
        "n_records": 6,
        "limit": None,
        "n_skipped": 2,
        "skipped_file": str(skipped),
    }
    lines = [json.loads(x) for x in skipped.read_text().splitlines()]
    assert [(e["id"], e["stage"]) for e in lines] == [(records[1]["id"], "load"), (rid, "batch")]
    assert "exceeds max_length=256" in lines[0]["reason"] and "truncated" in lines[1]["reason"]
    assert "skipped 2 bad records" in capsys.readouterr().err


def test_bad_data_is_an_error_message_not_a_traceback(eval_cfg, tmp_path, capsys):
    test_json, rid = _truncate_first_image(eval_cfg.data.test_json, tmp_path)
    cfg_path = tmp_path / "eval.yaml"
    cfg_path.write_text(
        yaml.safe_dump(
            {
                "model": {
                    "path": "tiny",
                    "processor_path": eval_cfg.model.processor_path,
                    "dtype": "float32",
                },
                "data": {"test_json": str(test_json)},
                "eval": {"methods": ["dense"], "budgets": [], "progress": False, "grid_samples": 0},
                "speed": {"enabled": False},
                "out_dir": str(tmp_path / "out"),
                "device": "cpu",
            }
        )
    )
    assert main(["evaluate", "--config", str(cfg_path)]) == 2
    assert f"error: record id='{rid}': cannot read image" in capsys.readouterr().err
    test_json.write_bytes(b'[{"id": "caf\xe9"}]')  # latin-1
    assert main(["evaluate", "--config", str(cfg_path)]) == 2
    assert f"error: data.test_json: {test_json}: not UTF-8 text" in capsys.readouterr().err
    eval_cfg.data.test_json = str(test_json)
    with pytest.raises(LlavaDataError, match="not UTF-8 text"):  # the library raises the same error
        evaluate(_small(eval_cfg))
