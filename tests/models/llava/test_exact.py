"""Pruning disabled and keep-all reproduce the stock model: logits and greedy ids, 3 backbones x 2 attn."""

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from tpkit.models import attach_pruner, detach_pruner, last_stats, pruning_disabled
from tpkit.pruning import PruningConfig, Stage1Config, Stage2Config

KEEP_ALL = PruningConfig(
    stage1=Stage1Config(selector="ratio", ratio=1.0),
    stage2=Stage2Config(selector="ratio", ratio=1.0, layer=2),
)
GEN = dict(max_new_tokens=8, do_sample=False, eos_token_id=2, pad_token_id=0)


def _stock_positions(am):
    return (am.cumsum(-1) - 1).clamp(min=0)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("backbone", ["llama", "mistral", "qwen2"])
def test_disabled_and_keep_all_equal_stock(tiny_llava_factory, make_llava_batch, backbone, attn):
    model = tiny_llava_factory(backbone, attn)
    batch = make_llava_batch(model, before=(3, 6, 1), after=(4, 2, 5))
    am = batch["attention_mask"]
    real = am.bool()
    with torch.no_grad():
        stock = model(**batch, position_ids=_stock_positions(am)).logits
        stock_plain = model(**batch).logits
        stock_ids = model.generate(**batch, **GEN)

        attach_pruner(model, PruningConfig.disabled())
        out = model(**batch)
        torch.testing.assert_close(out.logits, stock_plain, rtol=0, atol=0)
        assert torch.equal(out.kept_index, torch.arange(am.shape[1]).expand_as(am).masked_fill(am == 0, -1))
        assert torch.equal(model.generate(**batch, **GEN), stock_ids)

        attach_pruner(model, KEEP_ALL)
        out = model(**batch)
        assert out.logits.shape == stock.shape
        torch.testing.assert_close(out.logits[real], stock[real])
        assert torch.equal(out.kept_index, torch.arange(am.shape[1]).expand_as(am).masked_fill(am == 0, -1))
        stats = last_stats(model)
        assert stats["k1"].tolist() == [16, 16, 16]
        assert torch.equal(stats["k2"], am.sum(1))
        assert torch.allclose(stats["token_layer_fraction"], torch.ones(3, dtype=torch.float64))
        ids = model.generate(**batch, **GEN)
        assert torch.equal(ids, stock_ids)

        with pruning_disabled(model):
            torch.testing.assert_close(model(**batch).logits, stock_plain, rtol=0, atol=0)

        detach_pruner(model)
        assert type(model) is LlavaForConditionalGeneration
        torch.testing.assert_close(model(**batch).logits, stock_plain, rtol=0, atol=0)
