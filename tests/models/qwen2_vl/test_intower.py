"""Stage 1 inside the tower (stage1.in_tower_block): the tower's own layout rebuilt (segments), keep-all
equal to stock bit for bit, removal equal to the stock tower with the dropped
patches masked out as keys, and the same pruned model as post-tower pruning when cut at the last block."""

import importlib

import pytest
import torch
from transformers.vision_utils import get_vision_cu_seqlens, get_vision_window_index

from tpkit.models import attach_pruner, last_stats
from tpkit.models.core.prefill import prefill
from tpkit.models.qwen2_vl.intower import tower_head, tower_tail
from tpkit.pruning import PruningConfig, Stage1Config, Stage2Config

from .reference import model_inputs, stock_lm_input

SAMPLES = [
    [("text", 3), ("image", (8, 12)), ("text", 4)],
    [("text", 5), ("image", (12, 10)), ("text", 2), ("image", (4, 8)), ("text", 3)],
    [("text", 2), ("video", (2, 8, 6)), ("text", 5)],
]
MODULES = {"qwen2-vl": "qwen2_vl.modeling_qwen2_vl", "qwen2.5-vl": "qwen2_5_vl.modeling_qwen2_5_vl"}
KINDS = (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw"))


@pytest.mark.parametrize("variant", ["qwen2-vl", "qwen2.5-vl"])
def test_keep_all_in_tower_is_stock_bit_for_bit(qwen_factory, make_qwen_batch, variant):
    model = qwen_factory(variant, "sdpa", seed=1)
    batch = make_qwen_batch(model, SAMPLES, seed=1)
    with torch.no_grad():
        stock = model(**model_inputs(batch)).logits
        embeds, _ = stock_lm_input(model, batch)
        for pix, key in KINDS:  # the tower's own pieces in tpkit's loop, every unit kept
            head = tower_head(model, batch[pix], batch[key], 1, block_inputs=False)
            units, merged, _ = tower_tail(
                model, head, torch.ones(head.run.unit_of_row.numel(), dtype=torch.bool)
            )
            get = model.model.get_image_features if pix == "pixel_values" else model.model.get_video_features
            ref = torch.cat(get(batch[pix], batch[key], return_dict=True).pooler_output)
            assert torch.equal(merged, ref[units])
        keep_all = Stage1Config(selector="ratio", ratio=1.0, in_tower_block=1)
        attach_pruner(model, PruningConfig(stage1=keep_all, stage2=Stage2Config(enabled=False)))
        pre = prefill(model, batch["input_ids"], model_inputs(batch), batch["attention_mask"])
        out = model(**model_inputs(batch))
    real = batch["attention_mask"].bool()
    assert torch.equal(pre.embeds1[real], embeds[real])
    torch.testing.assert_close(out.logits[real], stock[real])


class _MaskedRecorder:
    """Eager attention of a tower whose blocks after ``after`` see only the kept patches as keys."""

    def __init__(self, module, tower, after, keep_rows, cu_full, cu_win):
        self.real = module.eager_attention_forward
        self.block_of = {id(b.attn): i for i, b in enumerate(tower.blocks)}
        self.full = set(getattr(tower, "fullatt_block_indexes", range(len(tower.blocks))))
        self.after, self.keep_rows, self.cu = (
            after,
            keep_rows,
            {True: cu_full.tolist(), False: cu_win.tolist()},
        )
        self.calls = {}

    def __call__(self, mod, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        i = self.block_of[id(mod)]
        if i > self.after:
            n = self.calls.get(i, 0)
            self.calls[i] = n + 1
            cu = self.cu[i in self.full]
            keys = self.keep_rows[cu[n] : cu[n + 1]]
            assert keys.numel() == key.shape[2]
            if keys.any():  # a segment with no kept patch holds dropped queries only: leave it be
                attention_mask = torch.zeros(1, 1, 1, keys.numel()).masked_fill(
                    ~keys, torch.finfo(query.dtype).min
                )
        return self.real(mod, query, key, value, attention_mask, scaling, dropout, **kwargs)


@pytest.mark.parametrize("variant", ["qwen2-vl", "qwen2.5-vl"])
def test_in_tower_removal_equals_masking_in_the_stock_tower(
    qwen_factory, make_qwen_batch, monkeypatch, variant
):
    model = qwen_factory(variant, "eager", seed=2)
    batch = make_qwen_batch(model, SAMPLES, seed=2)
    tower = model.model.visual
    module = importlib.import_module(f"transformers.models.{MODULES[variant]}")
    g = torch.Generator().manual_seed(0)
    for pix, key in KINDS:
        grid = batch[key]
        with torch.no_grad():
            head = tower_head(model, batch[pix], grid, 1, block_inputs=False)
            n_units = head.run.unit_of_row.numel()
            keep = torch.rand(n_units, generator=g) < 0.4
            keep[:4] = False  # the first window (2 x 2 units) of the first frame loses every unit
            units, merged, _ = tower_tail(model, head, keep)
            assert sorted(units.tolist()) == keep.nonzero().flatten().tolist()
            # the reference: the stock tower, its blocks after 1 masking the dropped patches out as keys
            if hasattr(tower, "window_size"):
                index, cu_win = get_vision_window_index(grid, 2, tower.window_size, tower.patch_size)
            else:
                index, cu_win = torch.arange(n_units), None
            keep_rows = keep[index].repeat_interleave(4)
            rec = _MaskedRecorder(
                module,
                tower,
                1,
                keep_rows,
                get_vision_cu_seqlens(grid),
                cu_win if cu_win is not None else get_vision_cu_seqlens(grid),
            )
            monkeypatch.setattr(module, "eager_attention_forward", rec)
            get = model.model.get_image_features if pix == "pixel_values" else model.model.get_video_features
            ref = torch.cat(get(batch[pix], grid, return_dict=True).pooler_output)
            monkeypatch.undo()
        assert rec.calls  # the masked blocks ran
        torch.testing.assert_close(merged, ref[units])
        assert not torch.allclose(
            merged, torch.cat(get(batch[pix], grid, return_dict=True).pooler_output)[units]
        )


@pytest.mark.parametrize("variant", ["qwen2-vl", "qwen2.5-vl"])
@pytest.mark.parametrize("score", ["cosine_mean", "attn_received"])
def test_cut_at_the_last_block_is_post_tower_pruning(qwen_factory, make_qwen_batch, variant, score):
    """At the tower's last block the in-tower scores are the post-tower ones, and the merger of the kept
    units alone gives their stock embeddings: the same pruned model, through generate too."""
    model = qwen_factory(variant, "sdpa", seed=3)
    batch = make_qwen_batch(model, SAMPLES, seed=3)
    s1 = dict(score=score, min_keep=2, max_keep=10)
    s2 = Stage2Config(layer=2, selector="ratio", ratio=0.5)
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


def test_in_tower_settings_are_checked(qwen_factory, tiny_llava_factory):
    model = qwen_factory("qwen2.5-vl")  # 4 blocks, full attention in 1 and 3
    with pytest.raises(
        ValueError,
        match="in_tower_block = 0 is a window-attention block .* use a full-attention block \\(1, 3\\)",
    ):
        attach_pruner(model, PruningConfig(stage1=Stage1Config(in_tower_block=0)))
    with pytest.raises(ValueError, match="in_tower_block = 4 is out of range: the vision tower has 4 blocks"):
        attach_pruner(model, PruningConfig(stage1=Stage1Config(in_tower_block=4)))
    with pytest.raises(ValueError, match="in_tower_block = -1 must be >= 0"):
        attach_pruner(model, PruningConfig(stage1=Stage1Config(in_tower_block=-1)))
    attach_pruner(qwen_factory("qwen2-vl"), PruningConfig(stage1=Stage1Config(in_tower_block=0)))  # all full
    with pytest.raises(ValueError, match="stage 1 runs after its vision tower only"):
        attach_pruner(tiny_llava_factory(), PruningConfig(stage1=Stage1Config(in_tower_block=1)))
