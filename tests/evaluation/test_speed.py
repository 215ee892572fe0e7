"""Speed tooling: the LLaVA-shaped prompt, timers, and scripts/gpu_speed.sh run end to end on a CPU
with a scaled-down architecture (the same script runs on a GPU)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from tpkit.evaluation.speed import random_prompt_batch, summarize_times, time_calls
from tpkit.models.registry import build_random_init

ROOT = Path(__file__).resolve().parents[2]


def test_random_init_and_prompt_shape():
    m = build_random_init("llava-1.5-7b", "cpu", "float32", scale_down=64)
    assert next(m.parameters()).dtype == torch.float32 and not m.training
    b = random_prompt_batch(m, 2)
    assert b["input_ids"].shape == (2, 640)
    assert int((b["input_ids"][0] == m.config.image_token_id).sum()) == 576
    assert b["pixel_values"].shape == (2, 3, 336, 336)
    assert torch.get_default_dtype() == torch.float32  # restored after the bf16/fp32 build


def test_time_calls_interleaves_and_summarizes():
    order = []
    t = time_calls(
        {"a": lambda: order.append("a"), "b": lambda: order.append("b")}, "cpu", repeats=2, warmup=1
    )
    assert order == ["a", "b"] * 3 and len(t["a"]) == 2
    s = summarize_times([3.0, 1.0, 2.0, 10.0])
    assert s["median_ms"] == 2.5 and s["p90_ms"] == 10.0 and s["min_ms"] == 1.0


def test_gpu_speed_script_runs_on_cpu(tmp_path):
    """The GPU script's rehearsal: both runs' JSON, the summary rows with dense and ours side by side."""
    env = dict(os.environ, OUT=str(tmp_path), DEVICE="cpu", DTYPE="float32", SCALE_DOWN="64", RUNS="1:eager 2:eager",
               REPEATS="1", WARMUP="0", DECODE="2", PYTHON=sys.executable, OMP_NUM_THREADS="1")  # fmt: skip
    p = subprocess.run(
        ["bash", str(ROOT / "scripts/gpu_speed.sh")], env=env, capture_output=True, text=True, timeout=300
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    rows = [
        line for line in p.stdout.strip().splitlines() if line.startswith("| 1 |") or line.startswith("| 2 |")
    ]
    assert len(rows) == 2
    for row in rows:
        assert re.fullmatch(
            r"\| \d \| eager \| [\d.]+ -> [\d.]+ \| [\d.]+x \| ([\d.]+|–)x \| [\d.]+ \| [\d.]+x \| \d+ -> \d+ \| [\d.]+x \|",
            row,
        ), row
    log = (tmp_path / "log.txt").read_text()
    assert log.strip().splitlines()[-1] == p.stdout.strip().splitlines()[-1]
    res = json.loads((tmp_path / "b1_eager" / "speed.json").read_text())
    assert res["counts"] == {"k1": 147, "k2": 136, "stage2_layer": 2} and res["compile"] == "none"
    assert abs(res["achieved"]["token_layer_fraction"]["mean"] - 0.22) < 1 / 640
    assert set(res["speed"]) == {"dense", "ours@0.22"}
    ours = res["speed"]["ours@0.22"]
    assert ours["ttft_ms"] > 0 and ours["decode_speedup"] > 0 and ours["ttft_speedup"] > 0


def test_random_init_any_res_prompt_hits_the_budget_with_its_newlines(tmp_path):
    """llava-next-7b at a CPU scale: the 672 x 672 prompt, ours at 22% counting the newline tokens that
    follow the kept patches, and the visual encoder timed apart (what scripts/gpu_families.sh reads)."""
    from tpkit.evaluation.config import EvalConfig
    from tpkit.evaluation.random_init import evaluate_speed_only

    cfg = EvalConfig()
    cfg.random_init.name, cfg.random_init.scale_down, cfg.random_init.dtype = "llava-next-7b", 64, "float32"
    cfg.speed.batch_size, cfg.speed.repeats, cfg.speed.warmup, cfg.speed.generation = 1, 1, 0, False
    cfg.out_dir, cfg.device, cfg.eval.progress = str(tmp_path), "cpu", False
    res = evaluate_speed_only(cfg)
    assert res["prompt"] == {"n_dense": 2992, "n_visual": 2928, "n_text": 64}
    assert abs(res["achieved"]["token_layer_fraction"]["mean"] - 0.22) < 2 / 2992
    assert res["vision_ms"] > 0 and "lm_prefill_speedup" in res
