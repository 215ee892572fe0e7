"""Removal equals masking (prefill + cached greedy decode), batch == per-sample, generate format."""

import pytest
import torch

from tpkit.models import attach_pruner, last_stats
from tpkit.models.core.prefill import prefill
from tpkit.pruning import PruningConfig, Stage1Config, Stage2Config

CFG = PruningConfig(stage1=Stage1Config(min_keep=3), stage2=Stage2Config(layer=2))
CUT = PruningConfig(
    stage1=Stage1Config(min_keep=3), stage2=Stage2Config(layer=2, selector="ratio", ratio=0.5)
)


def _ref_mask(key_valid, impl, dtype):
    """(B, 1, T, T) causal mask from scratch: a query sees valid keys <= itself, and always itself."""
    t = key_valid.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    allowed = (causal[None] & key_valid[:, None, :]) | torch.eye(t, dtype=torch.bool)[None]
    allowed = allowed[:, None]
    if impl == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)


def _slow_reference(model, embeds, pos, valid, keep2, split):
    """Full sequence; at layers >= split the tokens stage 2 dropped are masked out as keys."""
    lm = model.model.language_model
    impl = lm.config._attn_implementation
    h = embeds
    cos, sin = lm.rotary_emb(h, position_ids=pos)
    mask_a = _ref_mask(valid, impl, h.dtype)
    mask_b = _ref_mask(valid & keep2, impl, h.dtype)
    for i, layer in enumerate(lm.layers):
        h = layer(
            h,
            attention_mask=mask_a if i < split else mask_b,
            position_embeddings=(cos, sin),
            position_ids=pos,
        )
        h = h[0] if isinstance(h, tuple) else h
    return model.lm_head(lm.norm(h))


@pytest.mark.parametrize(
    "backbone, attn, positions",
    [
        ("llama", "sdpa", "contiguous"),
        ("qwen2", "eager", "contiguous"),
        ("mistral", "sdpa", "contiguous"),
        ("llama", "eager", "original"),
    ],
)
def test_removal_equals_masking(tiny_llava_factory, make_llava_batch, backbone, attn, positions):
    cfg = PruningConfig(stage1=Stage1Config(min_keep=3, positions=positions), stage2=CUT.stage2)
    model = attach_pruner(tiny_llava_factory(backbone, attn, seed=1), cfg)
    batch = make_llava_batch(model, before=(3, 6, 1), after=(4, 2, 6), seed=1)
    lm = model.model.language_model
    n_new = 8
    with torch.no_grad():
        out = model(**batch)
        pre = prefill(model, batch["input_ids"], batch["pixel_values"], batch["attention_mask"])
        stats = last_stats(model)
        assert (stats["k2"] < stats["n_prompt"]).all() and (stats["k1"] < 16).all()  # really pruned
        ref = _slow_reference(model, pre.embeds1, pre.pos1, pre.valid1, pre.keep2, pre.split)
        for b in range(3):
            fast = out.logits[b][out.kept_index[b] >= 0]
            torch.testing.assert_close(fast, ref[b][pre.keep2[b]])
        gen = model.generate(
            **batch, max_new_tokens=n_new, do_sample=False, eos_token_id=None, pad_token_id=0
        )
        assert gen.shape == (3, batch["input_ids"].shape[1] + n_new)
        assert torch.equal(gen[:, : batch["input_ids"].shape[1]], batch["input_ids"])
        # slow greedy: re-run the whole sequence each step, dropped tokens masked at layers >= split
        embeds, pos, valid, keep2 = pre.embeds1, pre.pos1, pre.valid1, pre.keep2
        ref_tokens = []
        for _ in range(n_new):
            logits = _slow_reference(model, embeds, pos, valid, keep2, pre.split)[:, -1]
            tok = logits.argmax(-1)
            ref_tokens.append(tok)
            embeds = torch.cat([embeds, lm.embed_tokens(tok[:, None])], dim=1)
            pos = torch.cat([pos, pos[:, -1:] + 1], dim=1)
            one = torch.ones(3, 1, dtype=torch.bool)
            valid, keep2 = torch.cat([valid, one], 1), torch.cat([keep2, one], 1)
        assert torch.equal(gen[:, -n_new:], torch.stack(ref_tokens, 1))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_original_positions_equal_the_unpruned_prompt_with_dropped_tokens_masked(
    tiny_llava_factory, make_llava_batch, attn
):
    """stage1.positions = original: the pruned forward is the unpruned model run on the whole prompt
    at its own positions, with the patches stage 1 dropped masked out as keys at every layer and the
    tokens stage 2 dropped masked out from its layer on."""
    model = attach_pruner(
        tiny_llava_factory("llama", attn, seed=1),
        PruningConfig(stage1=Stage1Config(min_keep=3, positions="original"), stage2=CUT.stage2),
    )
    batch = make_llava_batch(model, before=(3, 6, 1), after=(4, 2, 6), seed=1)
    ids, pix, am = batch["input_ids"], batch["pixel_values"], batch["attention_mask"]
    keep_all = PruningConfig(
        stage1=Stage1Config(selector="ratio", ratio=1.0), stage2=Stage2Config(enabled=False)
    )
    with torch.no_grad():
        out = model(**batch)
        pre = prefill(model, ids, pix, am)
        assert (last_stats(model)["k1"] < 16).all() and (pre.keep2 < pre.valid1).any()  # both stages cut
        dense_pos = (am.cumsum(1) - 1).clamp(min=0)
        assert torch.equal(pre.pos1[pre.valid1], dense_pos.gather(1, pre.index1.clamp(min=0))[pre.valid1])
        # the unpruned prompt's embeddings and positions (keep-all), and the kept sets in its frame
        attach_pruner(model, keep_all)
        dense = prefill(model, ids, pix, am)
        assert torch.equal(dense.pos1, dense_pos)
        t = ids.shape[1]
        src = pre.index1.clamp(min=0)
        kept1 = torch.zeros(3, t, dtype=torch.bool).scatter(1, src, pre.valid1)
        kept2 = torch.zeros(3, t, dtype=torch.bool).scatter(1, src, pre.keep2)
        ref = _slow_reference(model, dense.embeds1, dense.pos1, kept1 & dense.valid1, kept2, pre.split)
    for b in range(3):
        torch.testing.assert_close(out.logits[b][out.kept_index[b] >= 0], ref[b][kept2[b]])


def test_batch_of_4_equals_per_sample(tiny_llava_factory, make_llava_batch):
    model = attach_pruner(tiny_llava_factory("llama", "sdpa", seed=2), CFG)
    before, after = (3, 7, 1, 5), (4, 2, 6, 3)
    batch = make_llava_batch(model, before=before, after=after, seed=3)
    t = batch["input_ids"].shape[1]
    gen_kw = dict(max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        out = model(**batch)
        stats = last_stats(model)
        gen = model.generate(**batch, **gen_kw)
        assert len(set(stats["k1"].tolist())) > 1 and len(set(stats["k2"].tolist())) > 1  # ragged
        for b in range(4):
            pad = int((batch["attention_mask"][b] == 0).sum())
            single = {k: v[b : b + 1, pad:] if v.dim() == 2 else v[b : b + 1] for k, v in batch.items()}
            o = model(**single)
            s = last_stats(model)
            for key in ("k1", "n_prompt", "k2", "n_dense"):
                assert s[key][0] == stats[key][b], key
            torch.testing.assert_close(s["token_layer_fraction"][0], stats["token_layer_fraction"][b])
            assert torch.equal(s["visual_keep"][0], stats["visual_keep"][b])
            kept = out.kept_index[b] >= 0
            assert torch.equal(out.kept_index[b][kept] - pad, o.kept_index[0])
            torch.testing.assert_close(out.logits[b][kept], o.logits[0])
            g = model.generate(**single, **gen_kw)
            assert torch.equal(g[0, -6:], gen[b, t:])


def test_stage1_only_equals_stock_on_the_rebuilt_input(tiny_llava_factory, make_llava_batch):
    """Stage 1 alone = the stock model fed the shorter input (stock generate, stock masks, stock cache)."""
    model = tiny_llava_factory("mistral", "sdpa", seed=3)
    cfg = PruningConfig(stage1=Stage1Config(selector="budget", budget=5), stage2=Stage2Config(enabled=False))
    attach_pruner(model, cfg)
    batch = make_llava_batch(model, before=(3, 6, 1), after=(4, 2, 6), seed=4)
    gen_kw = dict(max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        out = model(**batch)
        gen = model.generate(**batch, **gen_kw)
        pre = prefill(model, batch["input_ids"], batch["pixel_values"], batch["attention_mask"])
        am1 = pre.valid1.long()
        stock = model.model.language_model(
            inputs_embeds=pre.embeds1, attention_mask=am1, position_ids=pre.pos1
        )
        logits = model.lm_head(stock.last_hidden_state)
        torch.testing.assert_close(out.logits[pre.valid1], logits[pre.valid1])
        stock_new = model.generate(inputs_embeds=pre.embeds1, attention_mask=am1, **gen_kw)
    assert torch.equal(gen[:, batch["input_ids"].shape[1] :], stock_new[:, -6:])
