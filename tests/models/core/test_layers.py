"""The per-layer seam (tpkit/models/core/layers.py): each decoder layer's rule read from the config as
transformers reads it, masks built once per distinct kind per group (sdpa keeps its is_causal path where
nothing binds), the window counted in positions, bidirectional blocks, and per-token additions after a
layer (DeepStack-shaped) that travel with the kept tokens."""

from types import SimpleNamespace

import pytest
import torch

from tests.models.reference import greedy_reference, kept_in_prompt, masked_logits, reference_mask
from tpkit.models import attach_pruner, family_of, last_stats
from tpkit.models.core.attach import attach
from tpkit.models.core.layers import RECURRENT, LayerAdds, LayerRule, mask_plan, rules_from_config
from tpkit.models.core.masks import attn_mask
from tpkit.models.core.prefill import prefill
from tpkit.models.gemma3.tiny import build_tiny_gemma3
from tpkit.models.llava.family import LlavaFamily
from tpkit.pruning import PruningConfig, Stage1Config, Stage2Config

W, S, F = "sliding_attention", LayerRule(window=8, blocks=True, rope="sliding_attention"), "full_attention"


def test_rules_from_the_config(tiny_llava_factory):
    assert rules_from_config(tiny_llava_factory().model.language_model) == (LayerRule(),) * 4
    mistral = tiny_llava_factory("mistral")
    mistral.config.text_config.sliding_window = (
        16  # no layer_types: every layer slides, as DynamicCache reads it
    )
    assert rules_from_config(mistral.model.language_model) == (LayerRule(window=16),) * 4
    gemma = build_tiny_gemma3()
    lm = gemma.model.language_model
    assert lm.config.layer_types == [W, W, F, W]
    full = LayerRule(blocks=True, rope=F)
    assert family_of(gemma).layer_rules(gemma) == (S, S, full, S)
    hybrid = SimpleNamespace(config=SimpleNamespace(num_hidden_layers=3, sliding_window=None,
                                                    layer_types=["linear_attention", "linear_attention", F]))  # fmt: skip
    assert rules_from_config(hybrid) == (LayerRule(kind=RECURRENT),) * 2 + (LayerRule(),)
    hybrid.config.layer_types[0] = "chunked_attention"
    with pytest.raises(ValueError, match=r"layer_types\[0\] = 'chunked_attention'"):
        rules_from_config(hybrid)


def test_one_mask_per_distinct_kind_and_is_causal_where_nothing_binds():
    rules = (S, S, LayerRule(blocks=True, rope=F), S, LayerRule(kind=RECURRENT))
    valid = torch.ones(2, 12, dtype=torch.bool)
    pos = torch.arange(12).expand(2, 12)
    blocks = torch.tensor([[-1, 0, 0, 0, -1, -1, -1, 1, 1, -1, -1, -1]] * 2)
    m = mask_plan(
        rules, valid, 12, "sdpa", torch.float32, no_padding=True, positions=pos, blocks=blocks, span=11
    )
    assert m[0] is m[1] is m[3] and m[2] is not m[0] and m[4] is None  # built once per kind
    assert not torch.equal(m[0], m[2])  # the window binds (span 11 >= 8)
    # short prompt, no blocks in the input: no window binds, every attention layer runs with is_causal
    m = mask_plan(rules, valid, 12, "sdpa", torch.float32, no_padding=True, positions=pos, span=7)
    assert m == [None] * 5
    padded = valid.clone()
    padded[0, :3] = False
    m = mask_plan(rules, padded, 12, "eager", torch.float32, no_padding=False, positions=pos, span=7)
    assert m[0] is m[2] and m[0].shape == (2, 1, 12, 12)
    assert torch.equal(m[4], padded.long())  # a recurrent layer: the 2D padding mask of its tokens


def test_masks_count_the_window_in_positions_and_open_blocks_both_ways():
    # kept keys at positions 0 1 2 9 10 11 (3..8 dropped); window 3; tokens 1, 2 one block
    pos = torch.tensor([[0, 1, 2, 9, 10, 11]])
    valid = torch.ones(1, 6, dtype=torch.bool)
    blocks = torch.tensor([[-1, 0, 0, -1, -1, -1]])
    got = attn_mask(valid, 6, "sdpa", torch.float32, window=3, positions=pos, blocks=blocks)[0, 0]
    expect = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],  # the block: token 1 sees token 2 after it
            [1, 1, 1, 0, 0, 0],
            [0, 0, 0, 1, 0, 0],  # position 9 sees nothing of 0..2: 9 - 3 = 6 (3 kept slots back would)
            [0, 0, 0, 1, 1, 0],
            [0, 0, 0, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(got, expect)
    # in the unpruned frame (every position a slot) the same rule is the reference's slot rule
    full = torch.ones(1, 12, dtype=torch.bool)
    blocks12 = torch.full((1, 12), -1).index_fill(1, torch.tensor([1, 2]), 0)
    ours = attn_mask(
        full, 12, "sdpa", torch.float32, window=3, positions=torch.arange(12)[None], blocks=blocks12
    )
    assert torch.equal(ours, reference_mask(full, "sdpa", torch.float32, 3, blocks12))
    with pytest.raises(ValueError, match="cannot apply this layer's sliding window"):
        attn_mask(valid, 6, "flash_attention_2", torch.float32, window=3, positions=pos)


def test_layer_adds_follow_their_tokens():
    placeholders = torch.tensor([[False, True, True, False], [True, False, True, True]])
    rows = torch.arange(5.0)[:, None].expand(5, 2)  # kept placeholder k carries k, row-major
    adds = LayerAdds.from_visual({1: rows}, placeholders)
    assert adds.rows.tolist() == [[5, 0, 1, 5], [2, 5, 3, 4]]
    h = torch.randn(2, 4, 2)
    out = adds.after(1, h)
    assert torch.equal(out[~placeholders], h[~placeholders])  # text rows bit for bit
    assert torch.equal(out[placeholders], h[placeholders] + rows)
    assert adds.after(0, h) is h
    kept = adds.take(torch.tensor([[-1, 2, 3], [0, 2, 3]]))  # a stage-2 cut: token (0, 1) dropped
    assert kept.rows.tolist() == [[5, 1, 5], [2, 3, 4]]


class _DeepStackLike(LlavaFamily):
    """LLaVA whose visual inputs add a feature to every image token after LM layers 0 and 1 (as
    Qwen3-VL's DeepStack does after its first layers): here a fixed random vector per placeholder."""

    def encode(self, model, input_ids, visual, stage1, stage1_keep=None):
        vis = super().encode(model, input_ids, visual, stage1, stage1_keep)
        g = torch.Generator().manual_seed(7)
        d = vis.projected.shape[-1]
        self.features = {i: torch.randn(*vis.keep.shape, d, generator=g) for i in (0, 1)}  # (B, N, D)
        vis.after_layer = {i: f[vis.keep] for i, f in self.features.items()}  # the kept rows, row-major
        return vis


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_additions_after_layers_equal_a_masked_reference(tiny_llava_factory, make_llava_batch, attn):
    """Stage 1 drops a token's rows with it; stage 2 at layer 1 (still adding) keeps the rows of the
    tokens it keeps: the pruned forward and greedy decoding equal the stage-1 sequence run whole with
    every visual token's additions and the tokens stage 2 dropped masked out as keys from layer 1."""
    model = tiny_llava_factory("llama", attn, seed=3)
    family = _DeepStackLike()
    cfg = PruningConfig(
        stage1=Stage1Config(min_keep=4), stage2=Stage2Config(layer=1, selector="ratio", ratio=0.5)
    )
    attach(model, cfg, family)
    batch = make_llava_batch(model, before=(3, 6), after=(4, 2), seed=3)
    lm = model.model.language_model
    with torch.no_grad():
        out = model(**batch)
        pre = prefill(model, batch["input_ids"], batch["pixel_values"], batch["attention_mask"])
        stats = last_stats(model)
        assert (stats["k1"] < 16).all() and (pre.keep2 < pre.valid1).any()  # both stages cut
        img1 = pre.valid1 & (batch["input_ids"].gather(1, pre.index1.clamp(min=0)) == 3)
        slot = (pre.index1 - batch["input_ids"].eq(3).long().argmax(1, keepdim=True)).clamp(0, 15)
        add = {i: f.gather(1, slot[..., None].expand(-1, -1, f.shape[-1])) * img1[..., None]
               for i, f in family.features.items()}  # fmt: skip

        def reference(embeds, pos, valid, keep2):
            h = embeds
            cos, sin = lm.rotary_emb(h, position_ids=pos)
            for i, layer in enumerate(lm.layers):
                keys = valid if i < pre.split else valid & keep2
                h = layer(
                    h, attention_mask=reference_mask(keys, attn, h.dtype), position_embeddings=(cos, sin)
                )
                h = h[0] if isinstance(h, tuple) else h
                if i in add:
                    h = h + torch.cat(
                        [add[i], torch.zeros(h.shape[0], h.shape[1] - add[i].shape[1], h.shape[2])], 1
                    )
            return model.lm_head(lm.norm(h))

        ref = reference(pre.embeds1, pre.pos1, pre.valid1, pre.keep2)
        for b in range(2):
            torch.testing.assert_close(out.logits[b][out.kept_index[b] >= 0], ref[b][pre.keep2[b]])
        gen = model.generate(**batch, max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0)
        embeds, pos, valid, keep2 = pre.embeds1, pre.pos1, pre.valid1, pre.keep2
        for step in range(4):
            tok = reference(embeds, pos, valid, keep2)[:, -1].argmax(-1)
            assert torch.equal(gen[:, batch["input_ids"].shape[1] + step], tok)
            embeds = torch.cat([embeds, lm.embed_tokens(tok[:, None])], 1)
            pos = torch.cat([pos, pos[:, -1:] + 1], 1)
            one = torch.ones(2, 1, dtype=torch.bool)
            valid, keep2 = torch.cat([valid, one], 1), torch.cat([keep2, one], 1)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_mistral_sliding_window_is_kept_through_pruning(tiny_llava_factory, make_llava_batch, attn):
    """A LLaVA on a Mistral with a sliding window of 8 (shorter than its prompts): keep-all equals stock,
    which applies the window; removal equals the unpruned model masked with each layer's window."""
    model = tiny_llava_factory("mistral", attn, seed=2)
    model.config.text_config.sliding_window = 8
    batch = make_llava_batch(model, before=(3, 6), after=(4, 2), seed=2)
    ids, pix, am = batch["input_ids"], batch["pixel_values"], batch["attention_mask"]
    pos = (am.cumsum(1) - 1).clamp(min=0)
    real = am.bool()
    gen = dict(max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    keep_all = PruningConfig(
        stage1=Stage1Config(selector="ratio", ratio=1.0), stage2=Stage2Config(enabled=False)
    )
    cut = PruningConfig(
        stage1=Stage1Config(min_keep=3), stage2=Stage2Config(layer=2, selector="ratio", ratio=0.5)
    )
    with torch.no_grad():
        stock = model(**batch, position_ids=pos).logits
        stock_ids = model.generate(**batch, **gen)
        attach_pruner(model, keep_all)
        torch.testing.assert_close(model(**batch).logits[real], stock[real])
        assert torch.equal(model.generate(**batch, **gen), stock_ids)
        dense = prefill(model, ids, pix, am)
        attach_pruner(model, cut)
        out = model(**batch)
        pre = prefill(model, ids, pix, am)
        assert (last_stats(model)["k1"] < 16).all() and (pre.keep2 < pre.valid1).any()
        kept1, kept2 = kept_in_prompt(pre, ids.shape[1])
        keys_a, keys_b = kept1 & real, kept2 & real
        ref = masked_logits(model, dense.embeds1, dense.pos1, keys_a, keys_b, pre.split)
        for b in range(2):
            torch.testing.assert_close(out.logits[b][out.kept_index[b] >= 0], ref[b][kept2[b]])
        ids_ref, _ = greedy_reference(model, dense.embeds1, dense.pos1, keys_a, keys_b, pre.split, 6)
        assert torch.equal(model.generate(**batch, **gen)[:, -6:], ids_ref)
        model.config.text_config.sliding_window = None  # the same reference without the window: another model
        loose = masked_logits(model, dense.embeds1, dense.pos1, keys_a, keys_b, pre.split)
    assert (loose[kept2] - ref[kept2]).abs().max() > 1e-3
