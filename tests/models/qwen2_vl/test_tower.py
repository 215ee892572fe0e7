"""Stage 1's view of Qwen's tower: the window order of Qwen2.5-VL's units, and the unit scores against
references computed from the stock tower's own outputs and attention weights."""

import importlib

import pytest
import torch
from transformers.vision_utils import get_vision_window_index

from tpkit.models import attach_pruner, last_stats, stage1_scores
from tpkit.models.qwen2_vl.tower import run_tower, window_order
from tpkit.pruning import PruningConfig, Stage1Config, Stage2Config

from .reference import model_inputs

SAMPLES = [
    [("text", 3), ("image", (8, 12)), ("text", 4)],
    [("text", 5), ("image", (12, 10)), ("text", 2), ("image", (4, 8)), ("text", 3)],
    [("text", 2), ("video", (2, 8, 6)), ("text", 5)],
]
MODULES = {"qwen2-vl": "qwen2_vl.modeling_qwen2_vl", "qwen2.5-vl": "qwen2_5_vl.modeling_qwen2_5_vl"}


@pytest.mark.parametrize("win", [1, 2, 3, 4])
def test_window_order_is_the_towers(win):
    grid = torch.tensor([[1, 8, 12], [2, 10, 6], [1, 14, 14], [1, 2, 2]])
    order, lengths = window_order(grid, 2, win)
    ref_order, ref_cu = get_vision_window_index(
        grid, spatial_merge_size=2, window_size=win * 2 * 7, patch_size=7
    )
    assert torch.equal(order, ref_order)
    assert torch.equal(torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0) * 4]), ref_cu.long())


@pytest.mark.parametrize("variant", ["qwen2-vl", "qwen2.5-vl"])
def test_units_follow_the_merger(qwen_factory, make_qwen_batch, variant):
    """Group j of merge^2 merger-input rows is unit ``unit_of_row[j]``: the merger maps it onto stock's
    embedding of that unit."""
    model = qwen_factory(variant, "sdpa", seed=1)
    batch = make_qwen_batch(model, SAMPLES, seed=1)
    with torch.no_grad():
        for pix, grid, video in (
            ("pixel_values", "image_grid_thw", False),
            ("pixel_values_videos", "video_grid_thw", True),
        ):
            run = run_tower(model, batch[pix], batch[grid], video, last_block=False)
            assert torch.equal(model.model.visual.merger(run.states), run.embeds[run.unit_of_row])
            if variant == "qwen2.5-vl":  # window order really permutes the units here
                assert not torch.equal(run.unit_of_row, torch.arange(len(run.unit_of_row)))


def _reference_cosine_mean(model, batch):
    """cos(unit mean, image mean) from the stock tower's last hidden state, un-permuted with
    transformers' own window index."""
    tower = model.model.visual
    out = []
    for pix, key in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
        grid = batch[key]
        states = tower(batch[pix], grid_thw=grid).last_hidden_state  # (P, D), the tower's order
        units = states.view(-1, 4, states.shape[-1]).mean(1)
        if hasattr(tower, "window_size"):
            index, _ = get_vision_window_index(grid, 2, tower.window_size, tower.patch_size)
            units = units[torch.argsort(index)]
        for u in units.split((grid.prod(-1) // 4).tolist()):
            out.append(torch.nn.functional.cosine_similarity(u, u.mean(0, keepdim=True), dim=-1))
    return out


class _Recorder:
    """Records the attention weights of every eager attention call of a tower."""

    def __init__(self, module):
        self.module, self.calls = module, []
        self.real = module.eager_attention_forward

    def __call__(self, mod, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        out, weights = self.real(mod, query, key, value, attention_mask, scaling, dropout, **kwargs)
        self.calls.append((mod, weights))
        return out, weights


def _reference_attn_received(model, batch, monkeypatch, variant):
    """Mean attention each unit's patches receive in the tower's last block, from the weights its eager
    attention computes (one call per image / frame), un-permuted with transformers' window index."""
    module = importlib.import_module(f"transformers.models.{MODULES[variant]}")
    rec = _Recorder(module)
    monkeypatch.setattr(module, "eager_attention_forward", rec)
    tower = model.model.visual
    last = tower.blocks[-1].attn
    out = []
    for pix, key in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
        grid = batch[key]
        rec.calls.clear()
        tower(batch[pix], grid_thw=grid)
        rows = torch.cat([w[0].mean(0).mean(0) for mod, w in rec.calls if mod is last])  # (P,)
        units = rows.view(-1, 4).mean(1)
        if hasattr(tower, "window_size"):
            index, _ = get_vision_window_index(grid, 2, tower.window_size, tower.patch_size)
            units = units[torch.argsort(index)]
        out += list(units.split((grid.prod(-1) // 4).tolist()))
    monkeypatch.undo()
    return out


@pytest.mark.parametrize("variant", ["qwen2-vl", "qwen2.5-vl"])
@pytest.mark.parametrize("score", ["cosine_mean", "attn_received"])
def test_unit_scores_equal_references_from_the_stock_tower(
    qwen_factory, make_qwen_batch, monkeypatch, variant, score
):
    model = qwen_factory(variant, "eager", seed=2)
    batch = make_qwen_batch(model, SAMPLES, seed=2)
    cfg = PruningConfig(stage1=Stage1Config(score=score, selector="budget", budget=3, min_keep=1),
                        stage2=Stage2Config(enabled=False))  # fmt: skip
    with torch.no_grad():
        if score == "cosine_mean":
            ref = _reference_cosine_mean(model, batch)
        else:
            ref = _reference_attn_received(model, batch, monkeypatch, variant)
        attach_pruner(model, cfg)
        grids = stage1_scores(
            model,
            batch["pixel_values"],
            cfg,
            **{k: v for k, v in model_inputs(batch).items() if k != "pixel_values"},
        )
        model(**model_inputs(batch))
    stats = last_stats(model)
    merged = [
        (t, h // 2, w // 2)
        for t, h, w in torch.cat([batch["image_grid_thw"], batch["video_grid_thw"]]).tolist()
    ]
    assert [tuple(g.shape) for g in grids] == merged
    for g, r in zip(grids, ref):
        torch.testing.assert_close(g.flatten(), r.float(), rtol=1e-4, atol=1e-5)
    # the scores the pruner cut with: per sample, placeholder order (sample 1 holds two images)
    per_sample = [ref[0], torch.cat([ref[1], ref[2]]), ref[3]]
    for b, r in enumerate(per_sample):
        s = stats["stage1_scores"][b]
        torch.testing.assert_close(s[~s.isnan()], r.float(), rtol=1e-4, atol=1e-5)
        top = [torch.topk(x, 3).indices.sort().values for x in ([ref[1], ref[2]] if b == 1 else [r])]
        if b == 1:
            top[1] = top[1] + len(ref[1])
        assert stats["visual_keep"][b].tolist() == torch.cat(top).tolist()
