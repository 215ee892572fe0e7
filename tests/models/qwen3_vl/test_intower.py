"""Stage 1 inside Qwen3-VL's and Qwen3.5's tower (stage1.in_tower_block): keep-all equal to stock bit for
bit (the merger's and every DeepStack merger's rows), removal equal to the stock tower with the dropped
patches masked out as keys from the next block on (DeepStack levels fed from blocks up to the cut give
the kept units' stock rows, later levels the masked tower's), and the same pruned model as post-tower
pruning when cut at the last block. What the tower hands its first block is read off the stock forward:
tested equal to it, in the layout's order, also under a tower run shared with a stock call made first."""

import importlib

import pytest
import torch
from transformers.vision_utils import get_vision_cu_seqlens

from tests.models.qwen2_vl.conftest import build_qwen_batch
from tests.models.qwen2_vl.reference import model_inputs, stock_lm_input
from tests.models.qwen2_vl.test_intower import _MaskedRecorder
from tests.models.reference import stock_layer_adds
from tpkit.models import attach_pruner, family_of, last_stats, pruning_disabled
from tpkit.models.core.prefill import prefill
from tpkit.models.qwen2_vl.intower import first_block_input, tower_head, tower_tail, unit_layout
from tpkit.models.qwen2_vl.tiny import build_tiny_qwen
from tpkit.models.qwen2_vl.tower import window_units
from tpkit.models.qwen3_vl.tiny import build_tiny_qwen3
from tpkit.pruning import PruningConfig, Stage1Config, Stage2Config
from tpkit.training.module import reuse_tower_output

SAMPLES = [
    [("text", 3), ("image", (8, 12)), ("text", 4)],
    [("text", 5), ("image", (12, 10)), ("text", 2), ("image", (4, 8)), ("text", 3)],
    [("text", 2), ("video", (2, 8, 6)), ("text", 5)],
]
MODULES = {"qwen3-vl": "qwen3_vl.modeling_qwen3_vl", "qwen3.5": "qwen3_5.modeling_qwen3_5"}
KINDS = (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw"))


def _stock(model, pix, batch):
    """The stock tower call of one kind: (merged (U, D), [each DeepStack level's (U, D)])."""
    get = model.model.get_image_features if pix == "pixel_values" else model.model.get_video_features
    out = get(batch[pix], batch[dict(KINDS)[pix]], return_dict=True)
    flat = lambda x: torch.cat(list(x)) if isinstance(x, (list, tuple)) else x  # noqa: E731
    return flat(out.pooler_output), [flat(x) for x in getattr(out, "deepstack_features", None) or []]


@pytest.mark.parametrize("variant", ["qwen2.5-vl", "qwen3-vl", "qwen3.5"])
def test_the_first_block_input_is_the_stock_forwards_in_the_layouts_order(variant):
    """What stage 1 inside the tower feeds block 0 (``first_block_input``) is what the stock forward hands
    it, row for row (hidden states and rotary angles), also while a stock call made first serves later
    tower calls from its run (``reuse_tower_output``: a training step's teacher, ``--reuse-tower``); and
    the layout tpkit runs the later blocks by (``unit_layout``: Qwen2.5-VL's window order) puts each
    unit where stock put its patches: changing one unit's pixels changes the rows of exactly that unit."""
    build = build_tiny_qwen if variant == "qwen2.5-vl" else build_tiny_qwen3
    model = build(variant, seed=4, attn_implementation="eager")
    batch = build_qwen_batch(model, [[("text", 2), ("image", (8, 12)), ("image", (4, 8))]], seed=4)
    tower, pix, grid = model.model.visual, batch["pixel_values"], batch["image_grid_thw"]
    seen = []
    record = lambda module, args, kwargs: seen.append((args[0], *kwargs["position_embeddings"]))  # noqa: E731
    handle = tower.blocks[0].register_forward_pre_hook(record, with_kwargs=True)
    family = family_of(model)
    with torch.no_grad():
        try:
            model.model.get_image_features(pix, grid)  # the stock forward, whole
        finally:
            handle.remove()
        with reuse_tower_output(family.vision_tower(model), family.tower_call_key):
            model.model.get_image_features(pix, grid)  # its run now serves every tower(...) call
            hidden, (cos, sin) = first_block_input(tower, pix, grid)
        unit = tower.spatial_merge_size**2
        order = unit_layout(grid, tower.spatial_merge_size, window_units(tower))[0]
        n_units = order.numel()
        assert n_units == 6 * 4 + 2 * 4 and len(seen) == 1
        for got, want in zip((hidden, cos, sin), seen[0]):
            assert torch.equal(got, want)
        if variant == "qwen2.5-vl":  # 2 x 2-unit windows: the order is not the identity
            assert not torch.equal(order, torch.arange(n_units))
        for u in range(n_units):  # the packed pixels hold unit u's patches in rows u*unit .. (u+1)*unit
            moved = pix.clone()
            moved[u * unit : (u + 1) * unit] += 1.0
            changed = (first_block_input(tower, moved, grid)[0] != hidden).view(n_units, -1).any(dim=1)
            assert changed.nonzero().flatten().tolist() == (order == u).nonzero().flatten().tolist(), u


def test_in_tower_stage1_served_by_a_shared_tower_run_equals_its_own(qwen3_factory, make_qwen3_batch):
    """Inside ``reuse_tower_output`` with the stock call first (the teacher's, dense), the pruned forward
    cut inside the tower still runs the stock tower's head itself: the same logits as alone, bit for
    bit, DeepStack included."""
    model = qwen3_factory("qwen3-vl", "sdpa", seed=5)
    batch = make_qwen3_batch(model, SAMPLES, seed=5)
    s1 = Stage1Config(in_tower_block=1, min_keep=2, max_keep=10)
    attach_pruner(model, PruningConfig(stage1=s1, stage2=Stage2Config(layer=1, selector="ratio", ratio=0.5)))
    family = family_of(model)
    with torch.no_grad():
        alone = model(**model_inputs(batch)).logits
        with reuse_tower_output(family.vision_tower(model), family.tower_call_key):
            with pruning_disabled(model):
                model(**model_inputs(batch))
            shared = model(**model_inputs(batch)).logits
    assert (last_stats(model)["k1"] < last_stats(model)["n_visual"]).all()
    torch.testing.assert_close(shared, alone, rtol=0, atol=0)


@pytest.mark.parametrize("variant", ["qwen3-vl", "qwen3.5"])
def test_keep_all_in_tower_is_stock_bit_for_bit(qwen3_factory, make_qwen3_batch, variant):
    model = qwen3_factory(variant, "sdpa", seed=1)
    batch = make_qwen3_batch(model, SAMPLES, seed=1)
    with torch.no_grad():
        stock = model(**model_inputs(batch)).logits
        embeds, _ = stock_lm_input(model, batch)
        adds = stock_layer_adds(model, model_inputs(batch))
        for pix, key in KINDS:  # the tower's own pieces in tpkit's loop, every unit kept
            head = tower_head(model, batch[pix], batch[key], 1, block_inputs=False)
            n = head.run.unit_of_row.numel()
            units, merged, deepstack = tower_tail(model, head, torch.ones(n, dtype=torch.bool))
            ref, ref_deep = _stock(model, pix, batch)
            assert torch.equal(merged, ref[units])
            assert len(deepstack or []) == len(ref_deep) == (3 if variant == "qwen3-vl" else 0)
            for got, want in zip(deepstack or [], ref_deep):  # levels 0, 1 from the head, 2 from the tail
                assert torch.equal(got, want[units])
        keep_all = Stage1Config(selector="ratio", ratio=1.0, in_tower_block=1)
        attach_pruner(model, PruningConfig(stage1=keep_all, stage2=Stage2Config(enabled=False)))
        pre = prefill(model, batch["input_ids"], model_inputs(batch), batch["attention_mask"])
        vis = family_of(model).encode(model, batch["input_ids"], model_inputs(batch), keep_all)
        out = model(**model_inputs(batch))
    real = batch["attention_mask"].bool()
    assert torch.equal(pre.embeds1[real], embeds[real])
    if adds is None:
        assert vis.after_layer is None
    else:  # every level's rows, the kept (all) placeholders' in prompt order
        ids = batch["input_ids"]
        placeholders = (ids == model.config.image_token_id) | (ids == model.config.video_token_id)
        assert sorted(vis.after_layer) == sorted(adds)
        for i, rows in vis.after_layer.items():
            assert torch.equal(rows, adds[i][placeholders])
    torch.testing.assert_close(out.logits[real], stock[real])


@pytest.mark.parametrize("variant", ["qwen3-vl", "qwen3.5"])
def test_in_tower_removal_equals_masking_in_the_stock_tower(
    qwen3_factory, make_qwen3_batch, monkeypatch, variant
):
    model = qwen3_factory(variant, "eager", seed=2)
    batch = make_qwen3_batch(model, SAMPLES, seed=2)
    tower = model.model.visual
    module = importlib.import_module(f"transformers.models.{MODULES[variant]}")
    g = torch.Generator().manual_seed(0)
    for pix, key in KINDS:
        grid = batch[key]
        with torch.no_grad():
            head = tower_head(model, batch[pix], grid, 1, block_inputs=False)
            n_units = head.run.unit_of_row.numel()
            keep = torch.rand(n_units, generator=g) < 0.4
            units, merged, deepstack = tower_tail(model, head, keep)
            assert sorted(units.tolist()) == keep.nonzero().flatten().tolist()
            stock, stock_deep = _stock(model, pix, batch)
            # the reference: the stock tower, its blocks after 1 masking the dropped patches out as keys
            cu = get_vision_cu_seqlens(grid)
            rec = _MaskedRecorder(module, tower, 1, keep.repeat_interleave(4), cu, cu)
            monkeypatch.setattr(module, "eager_attention_forward", rec)
            ref, ref_deep = _stock(model, pix, batch)
            monkeypatch.undo()
        assert rec.calls  # the masked blocks ran
        torch.testing.assert_close(merged, ref[units])
        assert not torch.allclose(merged, stock[units])
        if variant == "qwen3-vl":  # DeepStack from blocks 0, 1 (up to the cut: stock's), 2 (masked)
            assert torch.equal(deepstack[0], stock_deep[0][units]) and torch.equal(
                deepstack[1], stock_deep[1][units]
            )
            torch.testing.assert_close(deepstack[2], ref_deep[2][units])
            assert not torch.allclose(deepstack[2], stock_deep[2][units])


@pytest.mark.parametrize("score", ["cosine_mean", "attn_received"])
def test_cut_at_the_last_block_is_post_tower_pruning(qwen3_factory, make_qwen3_batch, score):
    """At the tower's last block the in-tower scores are the post-tower ones, and the mergers of the kept
    units alone give their stock rows (DeepStack included): the same pruned model, through generate too."""
    model = qwen3_factory("qwen3-vl", "sdpa", seed=3)
    batch = make_qwen3_batch(model, SAMPLES, seed=3)
    s1 = dict(score=score, min_keep=2, max_keep=10)
    s2 = Stage2Config(layer=1, selector="ratio", ratio=0.5)
    gen_kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None, num_beams=2)
    outs = []
    for block in (None, len(model.model.visual.blocks) - 1):
        attach_pruner(model, PruningConfig(stage1=Stage1Config(in_tower_block=block, **s1), stage2=s2))
        with torch.no_grad():
            out = model(**model_inputs(batch))
            stats = last_stats(model)
            outs.append((out, stats, model.generate(**model_inputs(batch), **gen_kw)))
    (post, s_post, g_post), (tower, s_tower, g_tower) = outs
    assert (s_post["k1"] < s_post["n_visual"]).all()
    assert torch.equal(s_post["visual_keep_mask"], s_tower["visual_keep_mask"])
    torch.testing.assert_close(s_post["stage1_scores"], s_tower["stage1_scores"], equal_nan=True)
    assert torch.equal(post.kept_index, tower.kept_index)
    torch.testing.assert_close(post.logits, tower.logits)
    assert torch.equal(g_post, g_tower)
