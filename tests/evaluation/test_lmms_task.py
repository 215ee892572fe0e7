"""What works without lmms-eval installed: ``tpkit lmms-task`` writes a local task (lmms-eval runs it
in tests/evaluation/test_lmms.py), and collecting test_lmms.py skips it cleanly where the ``lmms``
extra is not installed (``pip install -e ".[test]"``) but is an error where lmms-eval is installed
and does not import (CI installs the extra: there a broken lmms-eval must fail the run)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tpkit.cli import main

ROOT = Path(__file__).resolve().parents[2]

# run before pytest in a fresh interpreter: lmms_eval cannot be imported; with DIST, its distribution
# is not installed either
_HIDE = """
import importlib.abc, importlib.metadata as md, sys

class _Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "lmms_eval":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, _Hide())
if DIST:
    _real = md.distribution
    def _distribution(name):
        if name.replace("-", "_").lower() == "lmms_eval":
            raise md.PackageNotFoundError(name)
        return _real(name)
    md.distribution = _distribution
import pytest
sys.exit(pytest.main(["--collect-only", "-q", "--noconftest", "-p", "no:cacheprovider", "tests/evaluation/test_lmms.py"]))
"""


def _collect(hide_distribution: bool) -> subprocess.CompletedProcess:
    code = _HIDE.replace("DIST", str(hide_distribution))
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_skipped_cleanly_without_the_lmms_extra():
    proc = _collect(hide_distribution=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode == pytest.ExitCode.NO_TESTS_COLLECTED, out
    assert "SKIPPED [1] tests/evaluation/test_lmms.py" in out and "lmms-eval is not installed" in out, out
    assert "error" not in out.lower(), out


def test_a_broken_lmms_eval_install_fails_collection():
    proc = _collect(hide_distribution=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == pytest.ExitCode.INTERRUPTED, out
    assert "No module named 'lmms_eval'" in out, out


def test_lmms_task_writes_a_self_contained_task_over_a_llava_json_file(tmp_path, capsys):
    import datasets
    import numpy as np
    from PIL import Image

    from tpkit.synthetic.splits import generate_split

    split = generate_split(tmp_path / "synthetic", split="test", n=8, seed=2)
    assert main(["lmms-task", "--data", str(split), "--out", str(tmp_path / "task")]) == 0
    out = capsys.readouterr().out
    task = tmp_path / "task"
    assert sorted(p.name for p in task.iterdir()) == [
        "data", "tpkit_synthetic_test.yaml", "tpkit_synthetic_test_yesno_ll.yaml", "utils.py"
    ]  # fmt: skip
    assert "wrote the lmms-eval task tpkit_synthetic_test (8 questions" in out
    assert "and tpkit_synthetic_test_yesno_ll (2 yes/no questions" in out
    assert (
        "lmms-eval --model tpkit --model_args pretrained=MODEL --tasks tpkit_synthetic_test,"
        f"tpkit_synthetic_test_yesno_ll --include_path {task} --batch_size 8"
    ) in out
    yaml_text = (task / "tpkit_synthetic_test.yaml").read_text()
    assert f'dataset_path: "{task / "data"}"' in yaml_text and "max_new_tokens: 16" in yaml_text
    records = json.loads(split.read_text())
    ds = datasets.load_from_disk(str(task / "data"))["test"]
    assert ds["id"] == [r["id"] for r in records]
    assert ds["question"] == [r["conversations"][0]["value"].removeprefix("<image>\n") for r in records]
    assert ds["answer"] == [r["conversations"][1]["value"] for r in records]
    (split.parent / "images").rename(tmp_path / "moved")  # the task holds the images themselves
    first = np.asarray(ds[0]["image"].convert("RGB"))
    assert np.array_equal(
        first, np.asarray(Image.open(tmp_path / "moved" / "test" / "000000.png").convert("RGB"))
    )
    # generated answers are scored by tpkit evaluate's rule, so that the two report the same accuracy
    assert "process_results: !function utils.exact_match" in yaml_text
    spec = importlib.util.spec_from_file_location("task_utils", task / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    score = [utils.exact_match({"answer": a}, [p])["exact_match"] for a, p in
             [("four", ",,, four"), ("two", "The 2."), ("yes", "yes."), ("red", "red circle"), ("no", "yes")]]  # fmt: skip
    assert score == [1.0, 1.0, 1.0, 0.0, 0.0]
