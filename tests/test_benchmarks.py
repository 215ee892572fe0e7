"""Benchmark scripts run end to end on tiny settings (their numbers are for the README, not asserted)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_base_step_benchmark_prints_its_headline(capsys):
    bench = _load("base_step")
    assert bench.main(["--batch", "2", "--tokens", "210", "--steps", "1"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("eager / sdpa step time: ") and out[-1].endswith("x")
    assert any(line.strip().startswith("sdpa") for line in out) and any(
        line.strip().startswith("eager") for line in out
    )
