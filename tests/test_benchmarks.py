"""Benchmark scripts run end to end on tiny settings (their numbers are for the README, not asserted)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("config", ["tiny_cpu.yaml", "tiny_qwen2_vl_cpu.yaml"])
def test_fixture_step_benchmark_prints_its_headline(capsys, config):
    bench = _load("fixture_step")
    config = str(ROOT / "configs" / "fixture" / config)
    assert bench.main(["--config", config, "--batch", "2", "--tokens", "210", "--steps", "1"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("eager / sdpa step time: ") and out[-1].endswith("x")
    assert any(line.strip().startswith("sdpa") for line in out) and any(
        line.strip().startswith("eager") for line in out
    )


def test_pruner_overhead_benchmark_prints_its_headline(capsys):
    bench = _load("pruner_overhead")
    worst = bench.main(["--batch-sizes", "1", "--repeats", "1", "--hidden", "64", "--layers", "4"])
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("HEADLINE pruner overhead") and 0 < worst < 1


def test_prefill_speed_benchmark_prints_its_headline(capsys, tmp_path):
    bench = _load("prefill_speed")
    assert bench.main(["--batch-size", "1", "--repeats", "1", "--warmup", "0", "--out", str(tmp_path)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("prefill speedup ours@22.0% token-layer fraction vs dense: ")


def test_prefill_speed_after_the_tower(capsys, tmp_path):
    """--reuse-tower: one tower run serves every timed prefill (dense, ours, the encoder's timing)."""
    bench = _load("prefill_speed")
    args = ["--batch-size", "1", "--repeats", "1", "--warmup", "0", "--reuse-tower", "--out", str(tmp_path)]
    assert bench.main(args) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith(
        "prefill after the vision tower speedup ours@22.0% token-layer fraction vs dense: "
    )


def test_train_step_benchmark_prints_its_ratios(capsys):
    bench = _load("train_step")
    bench.main(["--batch", "2", "--steps", "1", "--warmup", "0"])
    out = capsys.readouterr().out
    assert "KD step time over LoRA+pruning, online teacher: " in out and "5 pass(es): " in out


def test_decode_speed_benchmark_prints_its_headline(capsys, tmp_path):
    bench = _load("decode_speed")
    args = [
        "--batch-size",
        "1",
        "--new-tokens",
        "2",
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--out",
        str(tmp_path),
    ]
    assert bench.main(args) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("decode tokens/s ours vs dense: ") and "x (TTFT " in last


@pytest.mark.slow
def test_qwen_in_tower_benchmark_prints_its_table(capsys):
    bench = _load("qwen_in_tower")
    res = bench.main(
        ["--scale-down", "64", "--prompts", "1", "--repeats", "1", "--blocks", "7", "--threads", "1"]
    )
    out = capsys.readouterr().out
    assert res["keep_all_bitwise_b7"] is True and "| 7 |" in out
    assert 0 <= res["same_units"][0]["rel_l2"] and 0 <= res["jaccard_cosine_mean"][7] <= 1
    assert "visual path in-tower stage 1 @ block 7" in out


def test_qwen_in_tower_benchmark_runs_on_a_saved_model(tmp_path, capsys):
    """--model DIR: a save_pretrained Qwen2-VL (the fixture's kind) instead of random weights; its
    image is the model's own size (32 px: 4 x 4 = 16 merged units)."""
    from tpkit.models.qwen2_vl.tiny import build_tiny_qwen

    model = build_tiny_qwen("qwen2-vl", image_size=32, patch_size=4, vision_hidden=32, vision_heads=2,
                            hidden_size=64, num_heads=4)  # fmt: skip
    model.save_pretrained(tmp_path / "q")
    args = ["--model", str(tmp_path / "q"), *"--prompts 1 --repeats 1 --blocks 1 --keep 4".split()]
    res = _load("qwen_in_tower").main([*args, "--threads", "1"])
    out = capsys.readouterr().out
    assert res["model"] == f"{tmp_path / 'q'} (saved weights)" and res["keep_all_bitwise_b1"] is True
    assert "1 image of 16 units, keep 4" in out and "| 1 |" in out
    assert set(res["visual_ms"]) == {
        "stock tower (stage 1 off)",
        "post-tower stage 1",
        "in-tower stage 1 @ block 1",
    }


def test_tower_probe_labels_each_unit_by_the_box_that_holds_its_centre():
    labels = _load("tower_probe").unit_labels
    rec = {"objects": [{"color": "red", "shape": "circle", "box": [0, 0, 12, 12]},
                       {"color": "blue", "shape": "square", "box": [30, 14, 36, 36]}]}  # fmt: skip
    ycol, yshp, colours, shapes = labels([rec], size=36, side=3)  # 12 px units, centres at 6, 18, 30
    assert colours == ["background", "blue", "red"] and shapes == ["background", "circle", "square"]
    assert ycol.tolist() == [[2, 0, 0, 0, 0, 1, 0, 0, 1]] and yshp.tolist() == [[1, 0, 0, 0, 0, 2, 0, 0, 2]]


def test_tower_probe_benchmark_runs_on_a_saved_model(tmp_path, capsys):
    from tpkit.data.qwen_processor import build_qwen2_vl_processor
    from tpkit.models.qwen2_vl.tiny import build_tiny_qwen

    model = build_tiny_qwen("qwen2-vl", image_size=32, patch_size=4, vision_hidden=32, vision_heads=2,
                            hidden_size=64, num_heads=4)  # fmt: skip
    model.save_pretrained(tmp_path / "q")
    build_qwen2_vl_processor(image_size=32, patch_size=4).save_pretrained(tmp_path / "q")
    res = _load("tower_probe").main(["--model", str(tmp_path / "q"), "--n", "96", "--threads", "1"])
    out = capsys.readouterr().out
    assert res["side"] == 4 and res["n_object_units"] > 0  # 96 px scenes -> 32 px -> 4 x 4 units
    assert list(res["rows"]) == ["pixels", "random init", str(tmp_path / "q")]
    assert all(0.0 <= r[k] <= 1.0 for r in res["rows"].values() for k in ("colour", "shape"))
    # a unit's own pixels hold its object's colour: far above the most common colour's share
    assert res["rows"]["pixels"]["colour"] > res["rows"]["pixels"]["colour_chance"] + 0.2
    assert "| pixels |" in out and "| chance (most common class) |" in out


def test_tower_shapes_benchmark_trains_a_fresh_tower_on_shape_labels(capsys):
    bench = _load("tower_shapes")
    config = str(ROOT / "configs" / "fixture" / "tiny_qwen2_vl_cpu.yaml")
    small = ["tower.hidden_size=32", "tower.intermediate_size=64", "lm.hidden_size=64", "lm.num_heads=2"]
    args = ["--config", config, "--set", *small, "--scenes", "one-large", "--n-train", "8", "--n-val", "4"]
    res = bench.main(
        [*args, "--steps", "40", "--batch", "8", "--every", "20", "--lr", "3e-3", "--threads", "1"]
    )
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith("one-large scenes: 8 train / 4 val images, 12 x 12 units, 6 shapes")
    assert out[-1].startswith("HEADLINE tower shape accuracy after 40 steps: ")
    assert [c["step"] for c in res["curve"]] == [20, 40] and 0 < res["chance"] < 1
    assert all(0.0 <= c["val_shape_acc"] <= 1.0 for c in res["curve"])
    # the same 8 images every step: the mean shape loss of steps 21-40 well below that of steps 1-20
    assert res["curve"][-1]["loss"] < res["curve"][0]["loss"] - 0.3


def test_tower_shapes_benchmark_refuses_a_tower_it_cannot_train():
    with pytest.raises(SystemExit, match="tiny_cpu.yaml: model = 'llava'"):
        _load("tower_shapes").main(["--config", str(ROOT / "configs" / "fixture" / "tiny_cpu.yaml")])


def test_resume_fingerprint_benchmark_prints_its_headline(capsys):
    bench = _load("resume_fingerprint")
    assert bench.main(["--records", "100", "--repeats", "1"]) > 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith("100 records, ") and out[-1].startswith("HEADLINE resume data fingerprint: ")
