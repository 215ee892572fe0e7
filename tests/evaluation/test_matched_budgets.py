"""Matched budgets really match: random / topk-cls / fastv keep what ours keeps (within 1 token per
sample), and the budget sweep lands on its target fractions. Dense answers are deterministic."""

from __future__ import annotations

import copy

import pytest
import torch

from tpkit.evaluation.methods import method_spec, sweep_spec
from tpkit.evaluation.runner import _make_loader, _ours_stats, run_method


@pytest.fixture(scope="module")
def runs(loaded):
    model, processor, ours, ds, cfg = (loaded[k] for k in ("model", "processor", "ours", "ds", "cfg"))
    # a 4-layer model: FastV (no stage 1, text kept) cannot go below ~40% of the token-layers, so
    # ours is given a budget that FastV can reach (ratios instead of knees, which cut very deep here)
    ours = copy.deepcopy(ours)
    ours.stage1.selector, ours.stage1.ratio = "ratio", 0.5
    ours.stage2.selector, ours.stage2.ratio = "ratio", 0.6
    loader = _make_loader(ds, processor, cfg, 4)
    tok = processor.tokenizer
    n_layers = model.config.text_config.num_hidden_layers

    def run(spec):
        return run_method(model, spec, loader, torch.device("cpu"), tok, 2, keep_visual=2, progress=False)

    out = {"ours": run(method_spec("ours", ours))}
    stats = _ours_stats(out["ours"])
    for name in ("random", "topk-cls", "fastv"):
        out[name] = run(method_spec(name, ours, stats, n_layers, fastv_layer=1))
    for fam in ("ours", "random", "topk-cls", "fastv"):
        out[f"{fam}@0.5"] = run(sweep_spec(fam, 0.5, ours, stats, n_layers, 1, 1.5))
    # the sweep from ours' default knees (deep cuts, very uneven k1): every sample still lands on it
    knee = loaded["ours"]
    out["knee"] = run(method_spec("ours", knee))
    out["knee@0.33"] = run(sweep_spec("ours", 0.33, knee, _ours_stats(out["knee"]), n_layers, 1, 1.5))
    out["dense"] = run(method_spec("dense", ours))
    out["dense2"] = run(method_spec("dense", ours))
    return out


def test_ours_really_prunes(runs):
    o = runs["ours"]
    assert len(o["answers"]) == 6
    assert bool((o["k1"] < o["n_visual"]).all())
    assert bool((o["fraction"] < 1).all())
    assert [len(v) for v in o["visual_keep"]] == o["k1"][:2].tolist()


def test_random_matches_ours_per_sample(runs):
    o, r = runs["ours"], runs["random"]
    assert r["k1"].tolist() == o["k1"].tolist()
    assert (r["k2"] - o["k2"]).abs().max() <= 1
    assert (r["n_prompt"] - o["n_prompt"]).abs().max() == 0


def test_topk_cls_fixed_k_is_ours_mean(runs):
    o, t = runs["ours"], runs["topk-cls"]
    k = round(float(o["k1"].double().mean()))
    assert t["k1"].tolist() == [k] * len(t["k1"])
    assert abs(float(t["k1"].double().mean() - o["k1"].double().mean())) <= 0.5
    assert bool((t["k2"] <= o["k2"]).all()) and bool(
        (o["k2"] - t["k2"] <= (o["k1"] - k).clamp(min=0) + 1).all()
    )


def test_fastv_matches_ours_token_layer_fraction(runs):
    o, f = runs["ours"], runs["fastv"]
    assert f["k1"].tolist() == f["n_visual"].tolist()  # no stage 1
    # equal tokens per layer (fraction * n_dense) within one token, per sample
    diff = (f["fraction"] - o["fraction"]) * o["n_dense"].double()
    assert float(diff.abs().max()) <= 1.0


@pytest.mark.parametrize(
    "name, target",
    [("ours@0.5", 0.5), ("random@0.5", 0.5), ("topk-cls@0.5", 0.5), ("fastv@0.5", 0.5), ("knee@0.33", 0.33)],
)
def test_sweep_lands_on_target(runs, name, target):
    r = runs[name]
    per_layer_tokens = (r["fraction"] - target) * r["n_dense"].double()
    assert float(per_layer_tokens.abs().max()) <= 1.0


def test_sweep_random_matches_sweep_ours(runs):
    assert runs["random@0.5"]["k1"].tolist() == runs["ours@0.5"]["k1"].tolist()
    assert runs["random@0.5"]["k2"].tolist() == runs["ours@0.5"]["k2"].tolist()


def test_sweep_topk_cls_keeps_one_k_the_mean_of_ours():
    from tpkit.evaluation.methods import OursStats
    from tpkit.pruning import PruningConfig

    n = torch.tensor([179] * 4)  # 35 text + 144 patches; ours' knees kept very different counts
    k1 = torch.tensor([10, 20, 30, 40])
    stats = OursStats(n, torch.tensor([144] * 4), k1, 35 + k1, 35 + k1 // 2, torch.full((4,), 0.3))
    ours = sweep_spec("ours", 0.5, PruningConfig(), stats, 4, 1, 1.5)
    topk = sweep_spec("topk-cls", 0.5, PruningConfig(), stats, 4, 1, 1.5)
    assert len(set(ours.stage1_keep.tolist())) > 1  # ours keeps its per-image ranking
    k = round(float(ours.stage1_keep.double().mean()))
    assert topk.stage1_keep.tolist() == [k] * 4
    assert topk.pruning.stage1.score == "cosine" and topk.family == "topk-cls"


def test_sweep_never_keeps_fewer_patches_than_min_keep():
    """At 15% of 4 layers with stage 2 at layer 2, the sweep's room for the text would leave fewer than
    1 patch per image; it keeps stage1.min_keep (4) instead, as the knee does, and stage 2 the rest."""
    from tpkit.evaluation.methods import OursStats
    from tpkit.pruning import PruningConfig
    from tpkit.pruning.budgets import token_layer_fraction

    n = torch.tensor([180] * 4)  # 36 text + 144 patches
    k1 = torch.tensor([20, 25, 30, 35])
    stats = OursStats(n, torch.tensor([144] * 4), k1, 36 + k1, 30 + k1 // 2, torch.full((4,), 0.22))
    for fam in ("ours", "random", "topk-cls"):
        spec = sweep_spec(fam, 0.15, PruningConfig(), stats, 4, 1, 1.5)
        assert spec.stage1_keep.tolist() == [4, 4, 4, 4], fam
        frac = token_layer_fraction(n, 36 + spec.stage1_keep, spec.stage2_keep, 4, 2)
        assert (frac - 0.15).abs().max() * 180 <= 1.0  # within a token per layer of the budget


def test_dense_is_deterministic_and_unpruned(runs):
    d, d2 = runs["dense"], runs["dense2"]
    assert d["answers"] == d2["answers"]
    assert d["fraction"].tolist() == [1.0] * 6
    assert d["k1"].tolist() == d["n_visual"].tolist()


def test_fastv_is_fastv_whatever_ours_stage2_adds():
    from tpkit.evaluation.methods import fastv_config
    from tpkit.pruning import PruningConfig, Stage2Config

    ours = PruningConfig(stage2=Stage2Config(layer=1, diversity=2.0, diversity_radius=1))
    fv = fastv_config(ours, layer=2)
    assert not fv.stage1.enabled and fv.stage2.layer == 2 and fv.stage2.query == "last"
    assert not fv.stage2.prune_text and fv.stage2.diversity == 0.0
    assert ours.stage2.diversity == 2.0  # a copy
