"""Typed configs: YAML -> dataclasses, --set overrides, errors naming file, line and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from tpkit.config import (
    ConfigError,
    commented_yaml,
    field_docs,
    from_dict,
    load_config,
    reference_markdown,
    save_config,
    to_dict,
    unwritable_dir,
)
from tpkit.data.config import DataConfig
from tpkit.models.config import ModelConfig
from tpkit.training.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]

GOOD = """\
model:
  path: tiny:llama
data:
  train_json: data/train.json
  batch_size: 2
pruning:
  stage1:
    min_keep: 4
    max_keep: 8
trainer:
  max_steps: 3
"""


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_text(text)
    return p


def test_load_typed_sections_and_overrides(tmp_path):
    cfg = load_config(TrainConfig, _write(tmp_path, GOOD), ["optim.lr=0.01", "pruning.stage2.layer=1"])
    assert cfg.model.path == "tiny:llama" and cfg.data.batch_size == 2
    assert cfg.optim.lr == 0.01 and cfg.pruning.stage2.layer == 1 and cfg.pruning.stage1.max_keep == 8
    assert type(cfg.pruning).__name__ == "PruningConfig"
    # round trip through the saved, resolved YAML
    out = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert to_dict(load_config(TrainConfig, out)) == to_dict(cfg)


def test_unknown_key_names_file_line_and_suggestion(tmp_path):
    p = _write(tmp_path, GOOD + "optim:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(TrainConfig, p)
    msg = str(e.value)
    assert f"{p}:13" in msg and "'optim.lrr'" in msg and "did you mean 'optim.lr'" in msg


def test_wrong_type_names_key(tmp_path):
    p = _write(tmp_path, GOOD.replace("batch_size: 2", "batch_size: two"))
    with pytest.raises(ConfigError, match=rf"{p}:5: 'data.batch_size' = 'two' must be an integer"):
        load_config(TrainConfig, p)
    with pytest.raises(ConfigError, match=r"'distill.kind' = 'kl' is not one of"):
        load_config(TrainConfig, _write(tmp_path, GOOD), ["distill.kind=kl"])


def test_exponent_without_a_dot_is_a_number(tmp_path):
    """YAML 1.1 reads `1e-4` as a string; a float field takes it as the number everyone means."""
    cfg = load_config(
        TrainConfig, _write(tmp_path, GOOD + "optim:\n  lr: 3e-5\n"), ["optim.weight_decay=1E-2"]
    )
    assert cfg.optim.lr == 3e-5 and cfg.optim.weight_decay == 0.01
    with pytest.raises(ConfigError, match="must be a number"):
        load_config(TrainConfig, _write(tmp_path, GOOD + "optim:\n  lr: 3e-\n"))


def test_min_keep_above_max_keep(tmp_path):
    p = _write(tmp_path, GOOD.replace("min_keep: 4", "min_keep: 16"))
    with pytest.raises(ConfigError) as e:
        load_config(TrainConfig, p)
    msg = str(e.value)
    assert str(p) in msg and "pruning.stage1" in msg and "min_keep = 16 > max_keep = 8" in msg


def test_impossible_values(tmp_path):
    p = _write(tmp_path, GOOD)
    for override, words in [
        ("distill.temperature=0", "temperature"),
        ("lora.r=0", "r = 0"),
        ("trainer.max_steps=0", "max_steps"),
        ("lora.target_modules=(", "regex"),
        ("data.train_json=null", "data.train_json is required"),
    ]:
        with pytest.raises(ConfigError, match=words):
            load_config(TrainConfig, p, [override])


def test_model_and_data_sections_alone():
    m = from_dict(ModelConfig, {"path": "tiny:qwen2", "tiny": {"hidden_size": 32}})
    assert m.tiny == {"hidden_size": 32} and m.dtype == "auto"
    with pytest.raises(ConfigError, match="tiny backbone"):
        from_dict(ModelConfig, {"path": "tiny:gpt2"})
    d = from_dict(DataConfig, {"test_json": "x.json", "eval_batch_size": 3})
    assert d.train_json is None and d.eval_batch_size == 3


def _config_class(path: Path) -> type:
    from tpkit.cli import config_classes

    by_dir = {"train": "Training", "eval": "Evaluation", "fixture": "Base-model fixture"}
    title = by_dir.get(path.parent.name, "Held-out" if path.name == "heldout.yaml" else "Demo")
    return next(cls for t, cls in config_classes().items() if t.startswith(title))


@pytest.mark.parametrize("path", sorted((ROOT / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(_config_class(path), path)
    if isinstance(cfg, TrainConfig):
        assert "language_model" in cfg.lora.target_modules


def test_field_docs_come_from_the_source_comments():
    docs = {d.key: d for d in field_docs(TrainConfig)}
    assert docs["pruning"].section and docs["pruning.stage1"].section
    assert docs["optim.min_lr_ratio"].doc == "final lr = lr * min_lr_ratio (cosine / linear)"
    assert docs["pruning.stage2.diversity_radius"].doc.startswith("with diversity: only patches within")
    # a comment block above a field and its trailing comment both belong to it
    assert "original: every kept token keeps the position" in docs["pruning.stage1.positions"].doc
    assert docs["data.batch_size"].default == 4 and docs["data.batch_size"].type == "int"


def test_commented_yaml_round_trips_and_carries_the_comments(tmp_path):
    cfg = load_config(TrainConfig, _write(tmp_path, GOOD), ["optim.lr=0.01"])
    text = commented_yaml(cfg)
    assert "lr: 0.01" in text and "# final lr = lr * min_lr_ratio" in text
    assert to_dict(load_config(TrainConfig, _write(tmp_path, text))) == to_dict(cfg)
    table = reference_markdown({"Training": TrainConfig})
    assert "| `optim.lr` | `float` | `0.0002` |" in table and "### `pruning.stage2`" in table


def test_the_config_reference_is_current():
    """docs/config.md is generated from the dataclasses: run `tpkit config-reference` after a change."""
    from tpkit.cli import config_reference

    assert (ROOT / "docs" / "config.md").read_text() == config_reference()


def test_config_errors_come_before_heavy_imports(tmp_path):
    """A bad config answers in a fresh process without importing torch, transformers or lightning."""
    import subprocess
    import sys

    bad = _write(tmp_path, GOOD + "trainer2:\n  x: 1\n")
    code = (
        "import sys; from tpkit.cli import main; rc = main(['train', '--config', sys.argv[1]]); "
        "print(rc, sorted(m for m in ('torch', 'transformers', 'lightning', 'peft') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code, str(bad)], capture_output=True, text=True, timeout=60)
    assert out.stdout.split("\n")[0] == "2 []", out.stdout + out.stderr
    assert f"{bad}:12" in out.stderr and "unknown key 'trainer2'" in out.stderr


def test_train_reports_config_errors_before_loading_a_model(tmp_path, capsys):
    from tpkit.cli import main

    p = _write(tmp_path, GOOD + "trainer2:\n  x: 1\n")
    assert main(["train", "--config", str(p)]) == 2
    err = capsys.readouterr().err
    assert f"{p}:12" in err and "unknown key 'trainer2'" in err and "did you mean 'trainer'" in err
    assert main(["train", "--config", str(_write(tmp_path, GOOD)), "--set", "optim.lr=x"]) == 2
    assert "'optim.lr' = 'x' must be a number" in capsys.readouterr().err
    assert main(["train", "--config", str(_write(tmp_path, GOOD)), "--resume"]) == 2
    # the paths first (relative to the config file): data/train.json is not there
    assert capsys.readouterr().err.startswith(
        f"error: data.train_json = '{tmp_path / 'data' / 'train.json'}': no such"
    )
    from tpkit.synthetic.splits import generate_split

    generate_split(tmp_path / "data", split="train", n=2, seed=0)
    assert main(["train", "--config", str(_write(tmp_path, GOOD)), "--resume"]) == 2
    assert "no checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize(
    "key, value",
    [
        ("pruning.stage2.diversity", ".nan"),
        ("pruning.stage2.diversity", ".inf"),
        ("optim.lr", "-.inf"),
        ("distill.alpha", "1e999"),  # a YAML 1.1 "string" number that overflows to inf
        ("data.max_length", ".inf"),  # an int key: not a number at all
    ],
)
def test_non_finite_numbers_are_refused_for_every_key(tmp_path, key, value):
    """No key means anything by nan or inf: the loader refuses them wherever they come from."""
    import yaml

    from tpkit.config import set_dotted

    data = yaml.safe_load(GOOD)
    set_dotted(data, key, yaml.safe_load(value))
    p = _write(tmp_path, yaml.safe_dump(data))
    kind = "must be an integer" if key == "data.max_length" else "must be a finite number"
    with pytest.raises(ConfigError, match=rf"cfg\.yaml:\d+: '{key}' = .* {kind}"):
        load_config(TrainConfig, p)
    with pytest.raises(ConfigError, match=rf"\(with --set\): '{key}' = .* {kind}"):
        load_config(TrainConfig, _write(tmp_path, GOOD), [f"{key}={value}"])


def test_check_fields_applies_the_loaders_checks_to_a_config_built_in_python():
    from tpkit.config import check_fields
    from tpkit.pruning import PruningConfig, Stage1Config, Stage2Config

    check_fields(PruningConfig())  # the defaults pass
    with pytest.raises(ConfigError, match=r"'pruning.stage2.layer' = '1' must be an integer"):
        check_fields(PruningConfig(stage2=Stage2Config(layer="1")), "pruning.")
    with pytest.raises(ConfigError, match=r"'pruning.stage2.diversity' = nan must be a finite number"):
        check_fields(PruningConfig(stage2=Stage2Config(diversity=float("nan"))), "pruning.")
    with pytest.raises(ConfigError, match=r"'stage1.selector' = 'knee' is not one of"):
        check_fields(PruningConfig(stage1=Stage1Config(selector="knee")))


def test_relative_paths_resolve_against_the_config_file_or_the_current_directory(tmp_path, monkeypatch):
    """In a file: against the file's directory; with --set (or a default): against the current one.
    A model path that is a hub id or `tiny` stays as written; saved and loaded again from another
    directory, the config names the same files."""
    (tmp_path / "cfgs" / "model").mkdir(parents=True)
    cfg_file = tmp_path / "cfgs" / "run.yaml"
    cfg_file.write_text(
        "model:\n  path: model\n  processor_path: llava-hf/llava-1.5-7b-hf\n"
        "data:\n  train_json: ../data/train.json\n  image_folder: /abs/images/\n"
        "distill:\n  teacher_cache: cache\n"
    )
    here = tmp_path / "elsewhere"
    here.mkdir()
    monkeypatch.chdir(here)
    cfg = load_config(TrainConfig, cfg_file, ["data.val_json=val.json", "trainer.log_every_n_steps=3"])
    assert cfg.model.path == str(tmp_path / "cfgs" / "model")
    assert cfg.model.processor_path == "llava-hf/llava-1.5-7b-hf"  # a hub id
    assert cfg.data.train_json == str(tmp_path / "data" / "train.json")
    assert cfg.data.image_folder == "/abs/images"  # normalised: no trailing /
    assert cfg.distill.teacher_cache == str(tmp_path / "cfgs" / "cache")
    assert cfg.data.val_json == str(here / "val.json")  # --set: the current directory
    assert cfg.trainer.out_dir == str(here / "runs" / "tiny")  # a default: the current directory
    saved = save_config(cfg, tmp_path / "run" / "config.yaml")
    monkeypatch.chdir(tmp_path)
    assert to_dict(load_config(TrainConfig, saved)) == to_dict(cfg)
    tiny = load_config(TrainConfig, None, ["model.path=tiny:qwen2", "data.train_json=t.json"])
    assert tiny.model.path == "tiny:qwen2"
    assert from_dict(DataConfig, {"train_json": "rel.json"}).train_json == "rel.json"  # dicts: as given


def test_the_shipped_configs_name_the_checkout_from_any_directory(tmp_path, monkeypatch):
    from tpkit.demo import DemoConfig
    from tpkit.evaluation.config import EvalConfig

    monkeypatch.chdir(tmp_path)
    train = load_config(TrainConfig, ROOT / "configs" / "train" / "tiny.yaml")
    assert train.model.path == str(ROOT / "assets" / "tiny-llava")
    assert train.data.train_json == str(ROOT / "runs" / "data" / "synthetic" / "train.json")
    assert train.trainer.out_dir == str(ROOT / "runs" / "tiny_distill")
    ev = load_config(EvalConfig, ROOT / "configs" / "eval" / "tiny.yaml")
    assert ev.model.path == train.model.path and ev.out_dir == str(ROOT / "runs" / "eval_tiny")
    assert load_config(EvalConfig, ROOT / "configs" / "eval" / "llava15_7b.yaml").model.path == (
        "llava-hf/llava-1.5-7b-hf"
    )
    demo = load_config(DemoConfig, ROOT / "configs" / "demo.yaml")
    assert demo.base_model == train.model.path and demo.out_dir == str(ROOT / "runs" / "demo")
    assert demo.train_config == str(ROOT / "configs" / "train" / "tiny.yaml")
    assert demo.data.dir == str(ROOT / "runs" / "data" / "synthetic")


def _path_fields(cfg, prefix=""):
    """(dotted key, loaded value, resolver) of every path_field in a loaded config."""
    import dataclasses

    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            yield from _path_fields(value, f"{prefix}{f.name}.")
        elif "tpkit_path" in f.metadata:
            yield prefix + f.name, value, f.metadata["tpkit_path"]


SHIPPED = sorted((ROOT / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(ROOT / "configs")) for p in SHIPPED])
def test_every_shipped_config_names_the_checkout_from_another_directory(path, tmp_path, monkeypatch):
    """Loaded from elsewhere, each path a shipped config writes resolves against the file's directory
    (what its header says) into the checkout's assets/, data/, runs/ or an existing config; a hub id
    stays as written. A path written as if relative to the checkout's root fails here."""
    import os

    import yaml

    from tpkit.demo import DemoConfig
    from tpkit.evaluation.config import EvalConfig
    from tpkit.synthetic.fixture.config import FixtureConfig

    cls = {"train": TrainConfig, "eval": EvalConfig, "fixture": FixtureConfig, "configs": DemoConfig}
    text = path.read_text()
    raw = yaml.safe_load(text)
    monkeypatch.chdir(tmp_path)
    cfg = load_config(_config_class(path) if path.name == "heldout.yaml" else cls[path.parent.name], path)
    local = 0
    for key, value, resolve in _path_fields(cfg):
        written = raw
        for part in key.split("."):
            written = written.get(part) if isinstance(written, dict) else None
        if not written:  # not in the file (a default: the current directory), or null
            continue
        assert value == resolve(written, path.parent), key
        if value == written:  # a hub id or a random tiny model
            assert written.startswith("tiny") or (
                written.count("/") == 1 and not written.startswith((".", "/"))
            )
            continue
        local += 1
        inside = Path(value).relative_to(ROOT).parts  # ValueError: outside the checkout
        assert inside[0] in ("assets", "data", "runs", "configs"), (key, value)
        assert inside[0] not in ("assets", "configs") or Path(value).exists(), (key, value)
    if local:
        assert f"relative to its directory ({os.path.relpath(ROOT, path.parent)}/ is the checkout)" in text


def test_the_writability_check_leaves_no_folder_behind(tmp_path):
    out = tmp_path / "a" / "b" / "run"
    assert unwritable_dir(out, "out_dir") is None
    assert list(tmp_path.iterdir()) == []  # the probe's folders went again
    (tmp_path / "keep").mkdir()
    assert unwritable_dir(tmp_path / "keep" / "run", "out_dir") is None
    assert [p.name for p in tmp_path.iterdir()] == ["keep"] and not any((tmp_path / "keep").iterdir())
    blocker = tmp_path / "file"
    blocker.write_text("")
    why = unwritable_dir(blocker / "run", "trainer.out_dir")
    assert why is not None and why.startswith(f"trainer.out_dir = {str(blocker / 'run')!r} cannot be written")
