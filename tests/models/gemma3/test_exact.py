"""Pruning off and keep-all reproduce the stock Gemma 3: the embedding path bit for bit (image tokens as
the projector pools them, text scaled by sqrt(hidden)), logits, greedy ids and their logits, beams;
sliding-window and global layers with their own rotary tables and the bidirectional image blocks."""

import pytest
import torch

from tests.models.reference import stock_lm_input
from tpkit.models import attach_pruner, detach_pruner, last_stats, pruning_disabled
from tpkit.models.core.prefill import prefill
from tpkit.pruning import PruningConfig, Stage1Config, Stage2Config

from .conftest import model_inputs, stock_positions

KEEP_ALL = PruningConfig(
    stage1=Stage1Config(selector="ratio", ratio=1.0),
    stage2=Stage2Config(selector="ratio", ratio=1.0, layer=2),
)
GEN = dict(max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
# ragged text, one sample with two images (an image and a pan-and-scan crop), one text-heavy: left padding
SAMPLES = [
    [("text", 3), ("image", None), ("text", 4)],
    [("text", 5), ("image", None), ("text", 2), ("image", None), ("text", 3)],
    [("text", 9), ("image", None), ("text", 6)],
]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_disabled_and_keep_all_equal_stock(gemma_factory, make_gemma_batch, attn):
    model = gemma_factory(attn, seed=1)
    batch = make_gemma_batch(model, SAMPLES, seed=1)
    inputs = model_inputs(batch)
    am = batch["attention_mask"]
    real = am.bool()
    with torch.no_grad():
        stock = model(**inputs, position_ids=stock_positions(am)).logits
        stock_plain = model(**inputs).logits
        stock_gen = model.generate(**inputs, **GEN, return_dict_in_generate=True, output_logits=True)
        stock_embeds, _ = stock_lm_input(model, inputs)

        attach_pruner(model, PruningConfig.disabled())
        torch.testing.assert_close(model(**inputs).logits, stock_plain, rtol=0, atol=0)
        assert torch.equal(model.generate(**inputs, **GEN), stock_gen.sequences)

        attach_pruner(model, KEEP_ALL)
        pre = prefill(model, batch["input_ids"], inputs, am)
        assert torch.equal(pre.embeds1[real], stock_embeds[real])  # tower, pooling, projector, embed scale
        out = model(**inputs)
        torch.testing.assert_close(out.logits[real], stock[real])
        assert torch.equal(out.kept_index, torch.arange(am.shape[1]).expand_as(am).masked_fill(am == 0, -1))
        stats = last_stats(model)
        assert stats["n_visual"].tolist() == [16, 32, 16] and stats["k1"].tolist() == [16, 32, 16]
        gen = model.generate(**inputs, **GEN, return_dict_in_generate=True, output_logits=True)
        assert torch.equal(gen.sequences, stock_gen.sequences)
        torch.testing.assert_close(torch.stack(gen.logits, 1), torch.stack(stock_gen.logits, 1))

        with pruning_disabled(model):
            torch.testing.assert_close(model(**inputs).logits, stock_plain, rtol=0, atol=0)
        stock_class = type(model).__mro__[2]
        detach_pruner(model)
        assert type(model) is stock_class
        torch.testing.assert_close(model(**inputs).logits, stock_plain, rtol=0, atol=0)


def test_keep_all_beams_equal_stock(gemma_factory, make_gemma_batch):
    """Beam search and several returned sequences; one image per sample, since stock repeats the packed
    ``pixel_values`` row by row (a sample with two images would get its copies' images out of order)."""
    model = attach_pruner(gemma_factory("sdpa", seed=2), KEEP_ALL)
    batch = make_gemma_batch(model, [SAMPLES[0], SAMPLES[2]], seed=2)
    with torch.no_grad():
        for kw in ({"num_beams": 2}, {"num_beams": 2, "num_return_sequences": 2}):
            with pruning_disabled(model):
                ref = model.generate(**model_inputs(batch), **GEN, **kw)
            assert torch.equal(model.generate(**model_inputs(batch), **GEN, **kw), ref), kw


def test_without_token_type_ids_images_are_causal_as_in_stock(gemma_factory, make_gemma_batch):
    """Stock masks image tokens bidirectionally only when ``token_type_ids`` is given; so does the
    pruner (keep-all equals stock either way, and the two differ)."""
    model = gemma_factory("eager", seed=3)
    batch = make_gemma_batch(model, SAMPLES[:2], seed=3)
    am = batch["attention_mask"]
    real = am.bool()
    causal = {k: v for k, v in model_inputs(batch).items() if k != "token_type_ids"}
    with torch.no_grad():
        stock = model(**causal, position_ids=stock_positions(am)).logits
        bidir = model(**model_inputs(batch), position_ids=stock_positions(am)).logits
        attach_pruner(model, KEEP_ALL)
        out = model(**causal).logits
    torch.testing.assert_close(out[real], stock[real])
    assert (bidir[real] - stock[real]).abs().max() > 1e-3
