"""Pruning off and keep-all reproduce the stock Qwen2-VL / Qwen2.5-VL: the tower's unit embeddings and
the M-RoPE ids bit for bit, logits, greedy ids, and the decode positions stock derives from rope_deltas."""

import pytest
import torch

from tpkit.models import attach_pruner, detach_pruner, last_stats, pruning_disabled
from tpkit.models.core.attach import CACHE_FIELD
from tpkit.models.core.prefill import prefill
from tpkit.pruning import PruningConfig, Stage1Config, Stage2Config

from .reference import model_inputs, stock_lm_input

KEEP_ALL = PruningConfig(
    stage1=Stage1Config(selector="ratio", ratio=1.0),
    stage2=Stage2Config(selector="ratio", ratio=1.0, layer=2),
)
GEN = dict(max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
# two images of different sizes in one sample, a video in another, ragged text: left padding
SAMPLES = [
    [("text", 3), ("image", (8, 12)), ("text", 4)],
    [("text", 5), ("image", (8, 8)), ("text", 2), ("image", (4, 8)), ("text", 3)],
    [("text", 2), ("video", (2, 8, 8)), ("text", 5)],
]
UNITS = [24, 16 + 8, 32]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("variant", ["qwen2-vl", "qwen2.5-vl"])
def test_disabled_and_keep_all_equal_stock(qwen_factory, make_qwen_batch, variant, attn):
    model = qwen_factory(variant, attn, seed=1)
    batch = make_qwen_batch(model, SAMPLES, seed=1)
    inputs = model_inputs(batch)
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        stock = model(**inputs).logits
        stock_gen = model.generate(**inputs, **GEN, return_dict_in_generate=True, output_logits=True)
        stock_ids = stock_gen.sequences
        stock_embeds, stock_pos = stock_lm_input(model, batch)

        attach_pruner(model, PruningConfig.disabled())
        torch.testing.assert_close(model(**inputs).logits, stock, rtol=0, atol=0)
        assert torch.equal(model.generate(**inputs, **GEN), stock_ids)

        attach_pruner(model, KEEP_ALL)
        am = batch["attention_mask"]
        pre = prefill(model, batch["input_ids"], inputs, am)
        assert torch.equal(pre.embeds1[real], stock_embeds[real])  # the tower ran as stock: same bits
        assert torch.equal(pre.pos1[:, real], stock_pos[:, real])
        out = model(**inputs)
        torch.testing.assert_close(out.logits[real], stock[real])
        assert torch.equal(out.kept_index, torch.arange(am.shape[1]).expand_as(am).masked_fill(am == 0, -1))
        stats = last_stats(model)
        assert stats["n_visual"].tolist() == UNITS and stats["k1"].tolist() == UNITS
        assert torch.allclose(stats["token_layer_fraction"], torch.ones(3, dtype=torch.float64))
        gen = model.generate(**inputs, **GEN, return_dict_in_generate=True, output_logits=True)
        assert torch.equal(gen.sequences, stock_ids)
        torch.testing.assert_close(torch.stack(gen.logits, 1), torch.stack(stock_gen.logits, 1))
        for kw in ({"num_beams": 2}, {"num_beams": 2, "num_return_sequences": 2}):
            with pruning_disabled(model):
                ref = model.generate(**inputs, **GEN, **kw)
            assert torch.equal(model.generate(**inputs, **GEN, **kw), ref), kw

        with pruning_disabled(model):
            torch.testing.assert_close(model(**inputs).logits, stock, rtol=0, atol=0)
        stock_class = type(model).__mro__[2]
        detach_pruner(model)
        assert type(model) is stock_class
        torch.testing.assert_close(model(**inputs).logits, stock, rtol=0, atol=0)


@pytest.mark.parametrize("variant", ["qwen2-vl", "qwen2.5-vl"])
def test_decoding_continues_where_stock_rope_deltas_put_it(qwen_factory, make_qwen_batch, variant):
    """Stock decodes token i of row b at (attention_mask.sum + i) + rope_deltas on all three axes; the
    pruned cache starts at the same id, whatever stage 1 and 2 dropped."""
    model = qwen_factory(variant, "sdpa", seed=2)
    batch = make_qwen_batch(model, SAMPLES, seed=2)
    inputs = model_inputs(batch)
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=1, do_sample=False, pad_token_id=0)
        stock_next = batch["attention_mask"].sum(1) + model.model.rope_deltas[:, 0]
        s1 = Stage1Config(score="cosine_mean", min_keep=2)  # on this random tower both stages cut every row
        attach_pruner(model, PruningConfig(stage1=s1, stage2=Stage2Config(layer=1)))
        out = model(**inputs, use_cache=True)
    stats = last_stats(model)
    assert (stats["k1"] < stats["n_visual"]).all() and (stats["k2"] < stats["n_prompt"]).all()
    assert torch.equal(getattr(out, CACHE_FIELD).next_position, stock_next)
