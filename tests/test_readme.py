"""The README's commands and example are the ones that work."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_the_first_block_is_the_two_commands_ci_runs():
    demo, tests = _blocks("bash")[0].strip().splitlines()
    assert demo.endswith("&& tpkit demo") and tests.endswith("&& ruff check . && pytest -q")
    assert "pytest" in (ROOT / ".ci" / "run").read_text()


def test_the_python_example_runs_from_any_directory_and_prints_what_the_readme_shows(tmp_path):
    """Run from an empty directory (no assets/ there), as a user's script would: the answer stops at
    the end-of-sequence token, and the three numbers are printed once, as the README shows them."""
    (code,) = _blocks("python")
    (shown,) = _blocks("text")
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout == shown


def test_the_example_image_is_a_scene_of_the_synthetic_test_split(tmp_path):
    """assets/example.png is record test-000008 of `tpkit data synthetic --split test --seed 2`."""
    import numpy as np
    from PIL import Image

    from tpkit.synthetic.splits import generate_split

    split = generate_split(tmp_path, split="test", n=9, seed=2)
    record = json.loads(split.read_text())[8]
    assert record["conversations"][0]["value"].endswith(
        "What color is the star?\nAnswer the question using a single word or phrase."
    )
    assert record["conversations"][1]["value"] == "green"
    made = np.asarray(Image.open(split.parent / record["image"]).convert("RGB"))
    assert np.array_equal(made, np.asarray(Image.open(ROOT / "assets" / "example.png").convert("RGB")))


def test_the_readme_names_every_random_init_architecture():
    from tpkit.evaluation.random_init import architecture_names

    names = architecture_names()
    assert names and all(f"`{n}`" in README for n in names), names


def test_every_config_and_command_the_readme_names_exists():
    from tpkit.cli import build_parser

    for path in re.findall(r"configs/[\w/]+\.yaml", README):
        assert (ROOT / path).is_file(), path
    commands = build_parser()._subparsers._group_actions[0].choices
    for name in re.findall(r"^tpkit (\S+)", "\n".join(_blocks("bash")), flags=re.M):
        assert name in commands, name
    for link in re.findall(r"\]\(((?:docs|assets)/[^)#]+)\)", README):
        assert (ROOT / link).is_file(), link


def test_the_config_driven_commands_validate(capsys):
    """Each `tpkit train|evaluate|teacher-cache` line of the README loads and validates its config
    (``--print-config`` stops before any work)."""
    import shlex

    from tpkit.cli import main

    lines = [ln.split("#")[0] for b in _blocks("bash")[1:] for ln in b.splitlines()]
    runs = [shlex.split(ln)[1:] for ln in lines if re.match(r"tpkit (train|evaluate|teacher-cache) ", ln)]
    assert len(runs) >= 8
    for argv in runs:
        assert main([*argv, "--print-config"]) == 0, argv
        capsys.readouterr()


def test_the_readme_training_runs_do_not_overwrite_each_other():
    """Run one after another, the README's `tpkit train` lines (less --resume/--overwrite ones) write
    to different trainer.out_dirs: none would be refused for finding another's run there."""
    import shlex

    from tpkit.cli import build_parser
    from tpkit.config import load_config
    from tpkit.training.config import TrainConfig

    lines = [ln.split("#")[0] for b in _blocks("bash")[1:] for ln in b.splitlines()]
    out_dirs = []
    for ln in lines:
        if not re.match(r"tpkit train ", ln) or "--resume" in ln or "--overwrite" in ln:
            continue
        args = build_parser().parse_args(shlex.split(ln)[1:])
        cfg = load_config(TrainConfig, ROOT / args.config, args.overrides)
        if cfg.trainer.strategy == "auto":  # the multi-GPU lines are alternatives, not a sequence
            out_dirs.append(cfg.trainer.out_dir)
    assert len(out_dirs) >= 2 and len(set(out_dirs)) == len(out_dirs), out_dirs
