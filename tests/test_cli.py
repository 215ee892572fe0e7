"""The ``tpkit`` command: every job is a subcommand with --help, --print-config shows the resolved
config, and an installed (non-editable) tpkit trains, evaluates and exports outside the checkout."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tpkit.cli import build_parser, main
from tpkit.config import load_config, to_dict
from tpkit.training.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = (
    "train",
    "evaluate",
    "export",
    "teacher-cache",
    "data",
    "demo",
    "fixture",
    "premise",
    "config-reference",
)


def test_help_lists_every_job():
    out = subprocess.run(
        [sys.executable, "-m", "tpkit", "--help"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0
    for name in COMMANDS:
        assert f"    {name}" in out.stdout, name


@pytest.mark.parametrize("argv", [[c] for c in COMMANDS if c != "data"] + [["data", "synthetic"]], ids=str)
def test_every_command_has_help(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    assert "usage: tpkit " + " ".join(argv) in capsys.readouterr().out


def test_print_config_is_the_resolved_config_with_comments(capsys):
    cfg_path = ROOT / "configs" / "train" / "tiny.yaml"
    assert main(["train", "--config", str(cfg_path), "--set", "optim.lr=0.01", "--print-config"]) == 0
    text = capsys.readouterr().out
    printed = yaml.safe_load(text)
    assert printed == to_dict(load_config(TrainConfig, cfg_path, ["optim.lr=0.01"]))
    assert "# local save_pretrained dir or hub id" in text


def test_commands_share_one_parser_style():
    """Config-driven commands take --config, --set (repeatable) and --print-config alike."""
    parser = build_parser()
    for name in ("train", "evaluate", "teacher-cache", "demo", "fixture"):
        sub = parser._subparsers._group_actions[0].choices[name]
        flags = {f for a in sub._actions for f in a.option_strings}
        assert {"--config", "--set", "--print-config"} <= flags, name


@pytest.mark.slow
def test_an_installed_tpkit_trains_evaluates_and_exports(tmp_path):
    """``pip install .`` into a fresh target (a wheel build, not the checkout), then the console script,
    from another directory: synthetic data, a tiny run, its evaluation with the adapter, an export."""
    import shutil

    src, target = tmp_path / "src", tmp_path / "site"  # a copy: the build writes build/ beside the source
    shutil.copytree(ROOT / "tpkit", src / "tpkit", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    pip = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(src)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert pip.returncode == 0, pip.stderr[-3000:]
    env = dict(os.environ, PYTHONPATH=str(target), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["PATH"] = f"{target / 'bin'}{os.pathsep}{env['PATH']}"
    work = tmp_path / "work"
    work.mkdir()

    def tpkit(*args: str) -> str:
        out = subprocess.run(["tpkit", *args], cwd=work, env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, f"tpkit {' '.join(args)}:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
        return out.stdout

    where = subprocess.run(
        [sys.executable, "-c", "import tpkit.cli; print(tpkit.cli.__file__)"],
        cwd=work, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert where.stdout.strip().startswith(str(target)), where.stdout  # not the checkout
    tpkit("data", "synthetic", "--out", "data", "--split", "train", "--n", "8")
    tpkit("data", "synthetic", "--out", "data", "--split", "test", "--n", "4", "--seed", "2")
    model = {"path": "tiny:llama", "tiny": {"hidden_size": 32, "num_layers": 2, "intermediate_size": 64}}
    train = {
        "model": model,
        "pruning": {"stage2": {"layer": 1}},
        "lora": {"r": 2, "alpha": 4.0},
        "data": {"train_json": "data/train.json", "batch_size": 4},
        "trainer": {"out_dir": "run", "max_steps": 2, "logger": "none", "progress_bar": False},
    }
    (work / "train.yaml").write_text(yaml.safe_dump(train))
    assert "done: step 2" in tpkit("train", "--config", "train.yaml")
    evaluation = {
        "model": model,
        "adapter": "run/export",
        "data": {"test_json": "data/test.json", "eval_batch_size": 4},
        "eval": {"methods": ["dense", "ours"], "budgets": [], "max_new_tokens": 2, "progress": False},
        "speed": {"enabled": False},
        "out_dir": "eval",
        "device": "cpu",
    }
    (work / "eval.yaml").write_text(yaml.safe_dump(evaluation))
    table = tpkit("evaluate", "--config", "eval.yaml")
    assert "| dense |" in table and "| ours |" in table
    tpkit("export", "--ckpt", "run/last.ckpt", "--out", "exported")
    assert (work / "exported" / "adapter_model.safetensors").is_file()


def test_data_errors_come_before_heavy_imports(tmp_path):
    """A missing data file, or a record whose image is not there, answers `tpkit train` and `tpkit
    evaluate` in a fresh process without importing torch or transformers (about a second)."""
    import json

    (tmp_path / "img").mkdir()
    good = {"id": "a", "image": "img/a.png", "conversations": [{"from": "human", "value": "<image>\nQ?"},
                                                               {"from": "gpt", "value": "yes"}]}  # fmt: skip
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "img" / "a.png")
    (tmp_path / "data.json").write_text(json.dumps([good, {**good, "id": "b", "image": "img/b.png"}]))
    (tmp_path / "train.yaml").write_text("model:\n  path: tiny\ndata:\n  train_json: data.json\n")
    (tmp_path / "eval.yaml").write_text("model:\n  path: tiny\ndata:\n  test_json: data.json\n")
    code = (
        "import sys; from tpkit.cli import main; rc = main(sys.argv[1:]); "
        "print(rc, sorted(m for m in ('torch', 'transformers', 'lightning', 'peft') if m in sys.modules))"
    )

    def run(*argv: str) -> tuple[str, str]:
        out = subprocess.run(
            [sys.executable, "-c", code, *argv], cwd=tmp_path, capture_output=True, text=True, timeout=120
        )
        return out.stdout.strip(), out.stderr.strip()

    missing_image = f"record #1 (id='b'): image file not found: {tmp_path / 'img' / 'b.png'}"
    assert run("train", "--config", "train.yaml") == (
        "2 []",
        f"error: data.train_json: {tmp_path / 'data.json'}: {missing_image}",
    )
    assert run("evaluate", "--config", "eval.yaml") == (
        "2 []",
        f"error: data.test_json: {tmp_path / 'data.json'}: {missing_image}",
    )
    stdout, stderr = run("train", "--config", "train.yaml", "--set", "data.train_json=nope.json")
    assert stdout == "2 []" and stderr.startswith(
        f"error: data.train_json = '{tmp_path / 'nope.json'}': no such file"
    )
    stdout, stderr = run("evaluate", "--config", "eval.yaml", "--set", "data.test_json=nope.json")
    assert stdout == "2 []" and stderr.startswith(
        f"error: data.test_json = '{tmp_path / 'nope.json'}': no such file"
    )


def test_a_model_that_cannot_load_is_an_error_from_every_command(tmp_path, unreachable_hub):
    """With the hub out of reach (its endpoint a closed local port) and HF_HUB_OFFLINE unset, a hub id
    that is not in the hub cache is refused by `tpkit train` before torch is imported, in a second;
    `tpkit evaluate` of a directory that holds no model says so: an error, no traceback."""
    import json

    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    record = {"id": "a", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nQ?"},
                                                             {"from": "gpt", "value": "yes"}]}  # fmt: skip
    (tmp_path / "data.json").write_text(json.dumps([record]))
    (tmp_path / "train.yaml").write_text(
        "model:\n  path: someorg/somemodel\ndata:\n  train_json: data.json\n"
    )
    (tmp_path / "empty").mkdir()
    (tmp_path / "eval.yaml").write_text("model:\n  path: empty\ndata:\n  test_json: data.json\n")
    env, endpoint = unreachable_hub
    code = (
        "import sys; from tpkit.cli import main; rc = main(sys.argv[1:]); print(rc, 'torch' in sys.modules)"
    )

    def run(*argv: str) -> tuple[str, str]:
        out = subprocess.run(
            [sys.executable, "-c", code, *argv], cwd=tmp_path, env=env, capture_output=True, text=True,
            timeout=120,
        )  # fmt: skip
        return out.stdout.strip(), out.stderr.strip()

    stdout, stderr = run("train", "--config", "train.yaml", "--set", "trainer.out_dir=run")
    assert stdout == "2 False", stderr[-2000:]
    assert stderr.startswith(
        f"error: model.path = 'someorg/somemodel': not a directory here ({tmp_path / 'someorg' / 'somemodel'}) "
        f"and not in the hub cache, and the hub cannot be reached ({endpoint}: "
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "a.png",
        "data.json",
        "empty",
        "eval.yaml",
        "train.yaml",
    ]
    stdout, stderr = run("evaluate", "--config", "eval.yaml", "--set", "speed.enabled=false")
    assert stdout == "2 True" and "Traceback" not in stderr, stderr[-2000:]
    assert stderr.startswith(f"error: {tmp_path / 'empty'}: cannot load a processor (")


def test_the_demo_runs_from_any_directory(tmp_path, monkeypatch, capsys):
    """Without --config, `tpkit demo` reads the checkout's configs/demo.yaml, whose paths name the
    checkout's assets and runs/ from wherever it is run."""
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["base_model"] == str(ROOT / "assets" / "tiny-llava")
    assert printed["train_config"] == str(ROOT / "configs" / "train" / "tiny.yaml")
    assert printed["out_dir"] == str(ROOT / "runs" / "demo")
