"""``tpkit heldout`` wiring on a tiny random LLaVA (seconds; the numbers mean nothing)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.test_demo import tiny_base  # noqa: F401 (the fixture)
from tpkit.cli import main
from tpkit.config import ConfigError, load_config
from tpkit.synthetic.heldout import HeldoutConfig, heldout_rows, heldout_table, paired_gap_se, run_heldout


def test_heldout_writes_each_split_and_one_table(tiny_base, tmp_path):  # noqa: F811
    cfg = HeldoutConfig(
        splits=["fill", "wording"],
        n=4,
        data_dir=str(tmp_path / "data"),
        out_dir=str(tmp_path / "out"),
        variants={"by score": {"stage1.context_tokens": 0}},
        eval_overrides=[
            f"model.path={tiny_base}",
            "pruning.stage1.min_keep=4",  # the config's floor of 16 is every patch of this 16-patch model
            "data.eval_batch_size=4",
            "eval.max_new_tokens=2",
            "eval.progress=false",
            "device=cpu",
        ],
    )
    summary = run_heldout(cfg)
    for split in ("fill", "wording"):
        assert len(json.loads((tmp_path / "data" / f"{split}.json").read_text())) == 4
        res = json.loads((tmp_path / "out" / split / "results.json").read_text())
        assert list(res["methods"]) == ["dense", "ours", "random", "topk-cls", "fastv", "ours[by score]"]
        assert res["config"]["eval"]["budgets"] == [] and res["dataset"]["n"] == 4
    rows = summary["rows"]
    assert [(r["split"], r["method"]) for r in rows] == [
        (s, m)
        for s in ("fill", "wording")
        for m in ("dense", "ours", "random", "topk-cls", "fastv", "ours[by score]")
    ]
    ours = [r for r in rows if r["method"] == "ours"]
    assert all(0.0 <= r["run_on"] <= 1.0 for r in rows)
    assert all("over_random" in r and "over_topk" in r for r in ours)
    for r in ours:  # the answers are paired: each gap has its error (none where dense got nothing right)
        dense = next(d["accuracy"] for d in rows if d["split"] == r["split"] and d["method"] == "dense")
        for key in ("over_random_se", "over_topk_se"):
            assert r[key] >= 0.0 if dense > 0 else math.isnan(r[key])
    assert summary["missed"] == [r["split"] for r in ours if r["target_met"] is False]
    assert (tmp_path / "out" / "summary.md").read_text().strip() == summary["table"]
    # ours' matched baselines: the same k1 distribution as ours, per split
    for split in ("fill", "wording"):
        by = {r["method"]: r for r in rows if r["split"] == split}
        assert by["random"]["k1_mean"] == by["ours"]["k1_mean"]


def test_heldout_rows_and_targets():
    def method(acc, k1=(20.0, 10.0, 30.0)):
        return {"accuracy": acc, "first_word_accuracy": acc + 0.1, "n": 100, "tokens": {"k1": dict(zip(("mean", "p10", "p90"), k1)),
                                                     "fraction": {"mean": 0.2}}}  # fmt: skip

    res = {"methods": {"dense": method(0.8, (144, 144, 144)), "ours": method(0.6), "random": method(0.55),
                       "topk-cls": method(0.58)}}  # fmt: skip
    answers = {"ours": {"answers": ["yes", "no red", "two two"], "references": ["yes", "no", "two"]}}
    rows = heldout_rows("fill", res, margin=5.0, answers=answers)
    ours = rows[1]
    assert ours["run_on"] == pytest.approx(2 / 3) and math.isnan(rows[2]["run_on"])
    assert ours["of_dense"] == pytest.approx(0.75) and ours["stderr"] == pytest.approx(
        (0.6 * 0.4 / 100) ** 0.5
    )
    assert ours["over_random"] == pytest.approx(6.25) and ours["over_topk"] == pytest.approx(2.5)
    assert ours["target_met"]
    assert not heldout_rows("fill", res, margin=7.0)[1]["target_met"]
    res["methods"]["topk-cls"] = method(0.62)
    assert heldout_rows("fill", res, margin=5.0)[1]["target_met"] is False  # below topk-cls
    # without the baselines there is nothing to judge: no verdict, no "met"
    alone = heldout_rows("fill", {"methods": {k: res["methods"][k] for k in ("dense", "ours")}}, margin=5.0)
    assert alone[1]["target_met"] is None and heldout_table(alone).splitlines()[3].endswith(
        "| 20.0 [10, 30] |  |"
    )
    table = heldout_table(rows)
    assert (
        "| fill | ours | 0.600 ± 0.049 | 75.0% | 0.700 | 66.7% | 20.0% | 20.0 [10, 30] | +6.2 / +2.5 (met) |"
        in table
    )
    assert "| fill | random | 0.550 ± 0.050 | 68.8% | 0.650 | – |" in table


def test_the_gap_over_a_baseline_carries_its_paired_standard_error():
    ids = ["q0", "q1", "q2", "q3"]
    refs = ["yes", "two", "red", "left"]
    ours = {"ids": ids, "references": refs, "answers": ["yes", "two", "blue", "left"]}  # 1 1 0 1
    base = {"ids": ids, "references": refs, "answers": ["no", "two", "green", "right"]}  # 0 1 0 0
    # per question, in points of a dense accuracy of 0.5: 200, 0, 0, 200 -> mean 100, sd 115.47
    assert paired_gap_se(ours, base, 0.5) == pytest.approx(115.470054 / 2)
    assert paired_gap_se(ours, ours, 0.5) == 0.0  # the same answers: no spread, whatever the accuracy
    with pytest.raises(ValueError, match="different questions"):
        paired_gap_se(ours, {**base, "ids": ids[::-1]}, 0.5)

    def method(acc):
        return {"accuracy": acc, "first_word_accuracy": acc, "n": 4,
                "tokens": {"k1": {"mean": 5.0, "p10": 4.0, "p90": 6.0}, "fraction": {"mean": 0.2}}}  # fmt: skip

    res = {"methods": {"dense": method(0.5), "ours": method(0.75), "random": method(0.25)}}
    rows = heldout_rows("fill", res, margin=5.0, answers={"ours": ours, "random": base})
    assert rows[1]["over_random"] == pytest.approx(100.0)
    assert "| +100.0 ± 57.7 (met) |" in heldout_table(rows)


def test_heldout_config_errors(tmp_path, capsys):
    path = tmp_path / "h.yaml"
    path.write_text("splits: [fill, nope]\n")
    with pytest.raises(ConfigError, match="nope"):
        load_config(HeldoutConfig, path)
    path.write_text("methods: [ours, random]\n")
    with pytest.raises(ConfigError, match="dense and ours"):
        load_config(HeldoutConfig, path)
    assert main(["heldout", "--config", str(path)]) == 2
    assert "dense and ours" in capsys.readouterr().err
    assert main(["heldout", "--set", "eval_config=none.yaml"]) == 2
    assert "no such file" in capsys.readouterr().err


def test_heldout_without_config_runs_the_checkouts(tmp_path, monkeypatch, capsys):
    """`tpkit heldout` alone reads configs/heldout.yaml of the checkout, from any directory: its variants
    (the paper's set beside the eval config's ours) and paths, not the dataclass defaults."""
    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(tmp_path)
    assert main(["heldout", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert f"eval_config: {root}/configs/eval/tiny.yaml" in out
    assert f"out_dir: {root}/runs/heldout" in out
    shipped = load_config(HeldoutConfig, root / "configs" / "heldout.yaml")
    assert "by score (the paper's set)" in shipped.variants and "by score (the paper's set)" in out
