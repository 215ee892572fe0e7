"""Pruned forward: kept_index, protected tokens, overrides, stats, loss, errors."""

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from tpkit.models import attach_pruner, detach_pruner, last_stats, set_pruning, stage1_scores
from tpkit.models.core.masks import gather_rows
from tpkit.models.core.prefill import pruned_lm_loss
from tpkit.pruning import PruningConfig, Stage1Config, Stage2Config


@pytest.fixture
def model(tiny_llava):
    return attach_pruner(tiny_llava, PruningConfig())


def test_kept_index_points_at_the_tokens(model, make_llava_batch):
    batch = make_llava_batch(model, before=(3, 6), after=(4, 2))
    with torch.no_grad():
        out = model(**batch)
    ids = batch["input_ids"]
    ki = out.kept_index
    assert ki.shape == out.logits.shape[:2]
    stats = last_stats(model)
    for b in range(2):
        row = ki[b][ki[b] >= 0]
        assert torch.all(row[1:] > row[:-1])  # original order
        assert row.numel() == stats["k2"][b]
        assert (ki[b] < 0).sum() == ki.shape[1] - row.numel()  # left padding only
        assert torch.all(ki[b, : ki.shape[1] - row.numel()] == -1)
        first = int(batch["attention_mask"][b].argmax())
        assert row[0] == first and row[-1] == ids.shape[1] - 1  # sink and last token kept
        n_img = (ids[b][row] == 3).sum()
        assert n_img == len(stats["stage2_visual_keep"][b])
        assert set(stats["stage2_visual_keep"][b].tolist()) <= set(stats["visual_keep"][b].tolist())
        # instruction tokens (after the image run) are all kept
        after = torch.arange(ids.shape[1])[(torch.arange(ids.shape[1]) > int((ids[b] == 3).nonzero().max()))]
        assert set(after.tolist()) <= set(row.tolist())


def test_stats_and_token_layer_fraction(model, make_llava_batch):
    batch = make_llava_batch(model, before=(3, 6), after=(4, 2))
    with torch.no_grad():
        model(**batch)
    s = last_stats(model)
    n_dense = batch["attention_mask"].sum(1)
    assert torch.equal(s["n_dense"], n_dense)
    assert s["n_visual"].tolist() == [16, 16]
    assert torch.equal(s["n_prompt"], n_dense - 16 + s["k1"])
    assert torch.all(s["k2"] <= s["n_prompt"])
    layers, k = 4, 2
    expect = (k * s["n_prompt"] + (layers - k) * s["k2"]).double() / (layers * n_dense).double()
    torch.testing.assert_close(s["token_layer_fraction"], expect)
    assert [len(v) for v in s["visual_keep"]] == s["k1"].tolist()


def test_overrides_force_counts(model, make_llava_batch):
    batch = make_llava_batch(model, before=(3, 6, 2), after=(4, 2, 3))
    with torch.no_grad():
        out = model(**batch, stage1_keep=torch.tensor([5, 9, 16]), stage2_keep=torch.tensor([12, 14, 999]))
    s = last_stats(model)
    assert s["k1"].tolist() == [5, 9, 16]
    assert s["k2"].tolist() == [12, 14, int(s["n_prompt"][2])]
    assert out.logits.shape[1] == int(s["k2"].max())


def test_answer_tokens_are_kept_and_never_queries(model, make_llava_batch):
    batch = make_llava_batch(model, before=(3, 6), after=(4, 2), answer=(3, 5))
    am = batch["answer_mask"]
    ids = batch["input_ids"]
    labels = ids.masked_fill(~am, -100)
    set_pruning(model, PruningConfig(stage2=Stage2Config(selector="budget", budget=0, min_keep=0)))
    with torch.no_grad():
        out = model(**batch, labels=labels)
    ki = out.kept_index
    for b in range(2):
        kept = set(ki[b][ki[b] >= 0].tolist())
        ans = am[b].nonzero().flatten().tolist()
        assert set(ans) <= kept
        assert ans[0] - 1 in kept  # predicts the first answer token
    # the loss equals CE gathered by kept_index
    tgt = torch.full_like(ki, -100)
    for b in range(2):
        for j in range(ki.shape[1]):
            i = int(ki[b, j])
            if i >= 0 and i + 1 < ids.shape[1]:
                tgt[b, j] = labels[b, i + 1]
    ref = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), tgt.flatten(), ignore_index=-100)
    torch.testing.assert_close(out.loss, ref)
    torch.testing.assert_close(pruned_lm_loss(out.logits, labels, ki), ref)
    # answer queries change nothing: answers are not queries, so the kept set ignores their content
    batch2 = dict(batch)
    batch2["input_ids"] = ids.masked_fill(am, 7)
    with torch.no_grad():
        out2 = model(**batch2)
    assert torch.equal(out2.kept_index, ki)


def test_stage2_budget_zero_keeps_only_protected(model, make_llava_batch):
    batch = make_llava_batch(model, before=(3,), after=(4,))
    set_pruning(model, PruningConfig(stage2=Stage2Config(selector="budget", budget=0, min_keep=0)))
    with torch.no_grad():
        out = model(**batch)
    # first token + 4 instruction tokens (the last is one of them)
    assert out.kept_index.tolist() == [[0, 20, 21, 22, 23]]


def test_stage2_can_prune_text_only_or_visual_only(model, make_llava_batch):
    batch = make_llava_batch(model, before=(5, 3), after=(4, 2))
    ids = batch["input_ids"]
    zero = dict(selector="budget", budget=0, min_keep=0)
    set_pruning(model, PruningConfig(stage2=Stage2Config(prune_visual=False, **zero)))
    with torch.no_grad():
        out = model(**batch)
    s = last_stats(model)
    for b in range(2):  # every stage-1 patch stays; of the text before the image only the sink
        assert torch.equal(s["stage2_visual_keep"][b], s["visual_keep"][b])
        row = out.kept_index[b][out.kept_index[b] >= 0]
        img = (ids[b] == 3).nonzero()
        first = int(batch["attention_mask"][b].argmax())
        assert [int(i) for i in row if i < img.min()] == [first]
    set_pruning(model, PruningConfig(stage2=Stage2Config(prune_text=False, **zero)))
    with torch.no_grad():
        out = model(**batch)
    s = last_stats(model)
    for b in range(2):  # every text token stays, no patch does
        assert len(s["stage2_visual_keep"][b]) == 0
        row = set(out.kept_index[b][out.kept_index[b] >= 0].tolist())
        assert row == {i for i in range(ids.shape[1]) if batch["attention_mask"][b, i] and ids[b, i] != 3}
    with pytest.raises(ValueError, match="nothing to prune"):
        PruningConfig(stage2=Stage2Config(prune_visual=False, prune_text=False)).validate()


def test_stage2_diversity_changes_which_patches_not_how_many(model, make_llava_batch):
    batch = make_llava_batch(model, before=(5, 3, 4), after=(4, 2, 6))
    ids = batch["input_ids"]
    runs = []
    for div in ({}, {"diversity": 5.0}, {"diversity": 5.0, "diversity_radius": 1}):
        set_pruning(model, PruningConfig(stage2=Stage2Config(selector="ratio", ratio=0.4, **div)))
        with torch.no_grad():
            out = model(**batch)
        s = last_stats(model)
        text = [{int(i) for i in row if i >= 0 and ids[b, i] != 3} for b, row in enumerate(out.kept_index)]
        runs.append(
            (s["k2"].tolist(), [len(v) for v in s["stage2_visual_keep"]], text, s["stage2_visual_keep_mask"])
        )
    plain, *diverse = runs
    for run in diverse:
        assert run[:3] == plain[:3]  # same k2, same patch count, same text tokens
    assert not torch.equal(diverse[0][3], plain[3])  # other patches (random tiny model, fixed seed)


@pytest.mark.parametrize("strategy", ["default", "full"])
def test_stage2_diversity_cells_are_the_patch_grid(
    tiny_llava_factory, make_llava_batch, monkeypatch, strategy
):
    import tpkit.models.core.prefill as pl

    model = tiny_llava_factory()
    model.config.vision_feature_select_strategy = strategy  # full: a CLS placeholder leads the patches
    attach_pruner(
        model,
        PruningConfig(
            stage1=Stage1Config(enabled=False), stage2=Stage2Config(diversity=1.0, diversity_radius=1)
        ),
    )
    seen = {}
    real = pl.redundancy

    def spy(features, coords=None, radius=None):
        seen["coords"] = coords
        return real(features, coords, radius)

    monkeypatch.setattr(pl, "redundancy", spy)
    batch = make_llava_batch(model, before=(3,), after=(4,))
    with torch.no_grad():
        model(**batch)
    vc = model.config.vision_config
    side = vc.image_size // vc.patch_size
    coords = seen["coords"][0]  # (T1, 3): (view, row, col), view -1 for text and CLS
    patches = coords[coords[:, 0] >= 0]
    assert (patches[:, 0] == 0).all()
    cells = (patches[:, 1] * side + patches[:, 2]).tolist()
    assert sorted(cells) == list(range(side * side))  # every patch once, no CLS


def test_stage1_only_and_baseline_configs(model, make_llava_batch):
    batch = make_llava_batch(model, before=(3, 6), after=(4, 2))
    configs = [
        PruningConfig(
            stage1=Stage1Config(score="random", selector="budget", budget=6),
            stage2=Stage2Config(enabled=False),
        ),
        PruningConfig(stage1=Stage1Config(score="cls_attn", selector="iqr", min_keep=2)),
        PruningConfig(stage1=Stage1Config(score="cosine_centered", selector="curvature")),
        PruningConfig(
            stage1=Stage1Config(enabled=False),
            stage2=Stage2Config(query="last", selector="ratio", ratio=0.5, prune_text=False),
        ),
        PruningConfig(stage2=Stage2Config(reduce="max")),
    ]
    for cfg in configs:
        set_pruning(model, cfg)
        with torch.no_grad():
            out = model(**batch)
        assert torch.isfinite(out.logits).all()
    s = last_stats(model)
    assert (s["k2"] < s["n_prompt"]).all()  # reduce="max" pruned
    set_pruning(model, configs[3])
    with torch.no_grad():
        model(**batch)
    s = last_stats(model)
    assert s["k1"].tolist() == [16, 16]
    assert (s["n_prompt"] - s["k2"]).tolist() == [8, 8]  # FastV: half of the 16 visual tokens dropped
    set_pruning(model, configs[0])
    with torch.no_grad():
        a = model(**batch).kept_index
        b = model(**batch).kept_index
    assert torch.equal(a, b) and last_stats(model)["k1"].tolist() == [6, 6]


def test_bad_inputs_raise(tiny_llava, make_llava_batch):
    model = tiny_llava
    with pytest.raises(ValueError, match="Linear is not a model family tpkit can prune"):
        attach_pruner(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="layer = 4 is out of range"):
        attach_pruner(model, PruningConfig(stage2=Stage2Config(layer=4)))
    with pytest.raises(ValueError, match="min_keep = 9 > max_keep = 3"):
        attach_pruner(model, PruningConfig(stage1=Stage1Config(min_keep=9, max_keep=3)))
    attach_pruner(model)
    batch = make_llava_batch(model)
    with pytest.raises(ValueError, match="pixel_values are 16x16 but the vision tower expects 32x32"):
        model(**{**batch, "pixel_values": batch["pixel_values"][..., :16, :16]})
    no_img = batch["input_ids"].masked_fill(batch["input_ids"] == 3, 9)
    with pytest.raises(ValueError, match="sample 0 has no image placeholder"):
        model(**{**batch, "input_ids": no_img})
    with pytest.raises(ValueError, match="one image per sample"):
        model(**{**batch, "pixel_values": batch["pixel_values"][:1]})
    detach_pruner(model)
    assert type(model) is LlavaForConditionalGeneration and "_tpkit" not in vars(model)


def test_cls_attn_is_the_towers_last_layer_cls_row(tiny_llava_factory, make_llava_batch):
    model = tiny_llava_factory("llama", "eager")
    batch = make_llava_batch(model)
    cfg = PruningConfig(stage1=Stage1Config(score="cls_attn", selector="budget", budget=5))
    attach_pruner(model, cfg)
    with torch.no_grad():
        model(**batch)
        tower_out = model.model.vision_tower(batch["pixel_values"], output_attentions=True)
    ref = tower_out.attentions[-1].mean(1)[:, 0, 1:]  # (B, P)
    s = last_stats(model)
    torch.testing.assert_close(s["stage1_scores"], ref)
    torch.testing.assert_close(stage1_scores(model, batch["pixel_values"]), ref)
    top = ref.topk(5, dim=1).indices.sort(dim=1).values
    assert [v.tolist() for v in s["visual_keep"]] == top.tolist()


@pytest.mark.parametrize("backbone", ["llama", "qwen2"])
def test_stage2_scores_equal_the_layers_attention(tiny_llava_factory, make_llava_batch, backbone):
    """Our q/k path (normed input, post-RoPE, GQA) equals the layer's own eager attention weights."""
    from tpkit.models.core.prefill import stage2_roles, stage2_scores

    model = tiny_llava_factory(backbone, "eager")
    batch = make_llava_batch(model, before=(3, 6), after=(4, 2))
    am = batch["attention_mask"]
    pos = (am.cumsum(1) - 1).clamp(min=0)
    k = 2
    with torch.no_grad():
        out = model(**batch, position_ids=pos, output_attentions=True, output_hidden_states=True)
        lm = model.model.language_model
        h = out.hidden_states[k]  # input of layer k
        cos, sin = lm.rotary_emb(h, position_ids=pos)
        valid = am.bool()
        ids = batch["input_ids"]
        for query in ("last", "instruction"):
            _, _, qpos, qvalid = stage2_roles(ids == 3, valid, torch.zeros_like(valid), True, query)
            ours = stage2_scores(lm.layers[k], h, cos, sin, valid, qpos, qvalid)
            ours_max = stage2_scores(lm.layers[k], h, cos, sin, valid, qpos, qvalid, "max")
            attn = out.attentions[k].mean(1)  # (B, T, T)
            for b in range(2):
                rows = qpos[b][qvalid[b]]
                torch.testing.assert_close(ours[b], attn[b, rows].mean(0))
                torch.testing.assert_close(ours_max[b], attn[b, rows].amax(0))


def test_attached_model_saves_as_stock_and_contexts_nest(tiny_llava, make_llava_batch, tmp_path):
    import json

    from tpkit.models import is_attached, pruning_disabled

    model = attach_pruner(tiny_llava, PruningConfig())
    assert (
        isinstance(model, type(model).__mro__[2]) and type(model).__name__ == "LlavaForConditionalGeneration"
    )
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == [
        "LlavaForConditionalGeneration"
    ]
    batch = make_llava_batch(model)
    t = batch["input_ids"].shape[1]
    with torch.no_grad():
        with pruning_disabled(model):
            with pruning_disabled(model):
                assert model(**batch).logits.shape[1] == t
            assert model(**batch).logits.shape[1] == t
        assert model(**batch).logits.shape[1] < t
    with pytest.raises(ValueError, match="no pruner attached"):
        set_pruning(detach_pruner(model), PruningConfig())
    assert not is_attached(model)


def test_gather_rows():
    logits = torch.arange(2 * 4 * 3, dtype=torch.float).view(2, 4, 3)
    idx = torch.tensor([[0, 3], [2, -1]])
    out = gather_rows(logits, idx)
    assert torch.equal(out[0, 1], logits[0, 3]) and torch.equal(out[1, 0], logits[1, 2])
    assert torch.equal(out[1, 1], logits[1, 0])  # padding (-1) reads row 0; its target is ignored


def test_nonsense_from_the_python_api_is_a_clear_error(tiny_llava, make_llava_batch):
    """An empty prompt (IndexError from argmax before), a layer given as a string (TypeError) and a
    NaN diversity (accepted) are refused with the key or the shape named."""
    from tpkit.config import ConfigError

    with pytest.raises(ConfigError, match=r"'pruning.stage2.layer' = '1' must be an integer"):
        attach_pruner(tiny_llava, PruningConfig(stage2=Stage2Config(layer="1")))
    with pytest.raises(ConfigError, match=r"'pruning.stage2.diversity' = nan must be a finite number"):
        attach_pruner(tiny_llava, PruningConfig(stage2=Stage2Config(diversity=float("nan"))))
    model = attach_pruner(tiny_llava, PruningConfig())
    with pytest.raises(ConfigError, match=r"'pruning.stage1.min_keep' = 4.0 must be an integer"):
        set_pruning(model, PruningConfig(stage1=Stage1Config(min_keep=4.0)))
    batch = make_llava_batch(model)
    empty = {
        **batch,
        "input_ids": batch["input_ids"][:, :0],
        "attention_mask": batch["attention_mask"][:, :0],
    }
    with pytest.raises(ValueError, match=r"input_ids of shape \(2, 0\) hold no tokens"):
        model(**empty)


def test_nan_pixel_values_pass_through_as_in_the_stock_model(tiny_llava, make_llava_batch):
    """The decision: no check, no warning (a NaN test costs a host sync per forward, and stock says
    nothing either). A NaN image scores NaN everywhere, so stage 1 keeps all its patches (the knee
    has nothing to cut); its logits are NaN as the stock model's are, and the other samples of the
    batch are untouched."""
    import warnings

    from tpkit.models import pruning_disabled

    model = attach_pruner(tiny_llava, PruningConfig())
    batch = make_llava_batch(model)
    with torch.no_grad():
        clean = model(**batch)
        bad = {**batch, "pixel_values": batch["pixel_values"].clone()}
        bad["pixel_values"][0] = float("nan")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = model(**bad)
        stats = last_stats(model)
        with pruning_disabled(model):
            stock = model(**bad).logits
    assert stats["k1"][0] == stats["n_visual"][0] == 16
    assert out.logits[0].isnan().all(-1).any() and stock[0].isnan().all(-1).any()
    # sample 1: the same tokens kept, the same logits (the batch is only padded differently)
    kept = out.kept_index[1][out.kept_index[1] >= 0]
    assert torch.equal(kept, clean.kept_index[1][clean.kept_index[1] >= 0])
    n = kept.numel()
    torch.testing.assert_close(out.logits[1, -n:], clean.logits[1, -n:])
