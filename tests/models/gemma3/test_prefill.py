"""The pruned Gemma 3 forward and generate equal the unpruned model with the dropped tokens masked out,
each layer under its own rule (a sliding window of 8 positions or global, its own rotary table, image
tokens seeing each other within their image), against an independent reference (stock embeddings,
stock layers, masks from scratch); ragged batches equal their samples alone; stage 1 scores the pooled
units; stage 2 scores with the layer's own q/k norms and scale (Gemma 3 applies no logit softcap)."""

import pytest
import torch
import torch.nn.functional as F

from tests.models.reference import (
    greedy_reference,
    image_blocks,
    kept_in_prompt,
    masked_logits,
    stock_lm_input,
)
from tpkit.models import attach_pruner, family_of, last_stats, stage1_scores
from tpkit.models.core.prefill import prefill, stage2_roles, stage2_scores
from tpkit.pruning import PruningConfig, Stage1Config, Stage2Config

from .conftest import model_inputs, stock_positions

CUT = PruningConfig(
    stage1=Stage1Config(min_keep=3, max_keep=12), stage2=Stage2Config(layer=2, selector="ratio", ratio=0.5)
)
SAMPLES = [
    [("text", 3), ("image", None), ("text", 4)],
    [("text", 5), ("image", None), ("text", 2), ("image", None), ("text", 3)],
    [("text", 2), ("image", None), ("image", None), ("image", None), ("text", 5)],  # an image and 2 crops
]
N_NEW = 8


@pytest.mark.parametrize("split", [2, 3])  # stage 2 at a global layer / at a sliding one
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_removal_equals_masking(gemma_factory, make_gemma_batch, attn, split):
    cfg = PruningConfig(stage1=CUT.stage1, stage2=Stage2Config(layer=split, selector="ratio", ratio=0.5))
    model = attach_pruner(gemma_factory(attn, seed=1), cfg)
    batch = make_gemma_batch(model, SAMPLES, seed=1)
    ids, am = batch["input_ids"], batch["attention_mask"]
    inputs = model_inputs(batch)
    with torch.no_grad():
        out = model(**inputs)
        pre = prefill(model, ids, inputs, am)
        stats = last_stats(model)
        assert (stats["k1"] < stats["n_visual"]).all() and (stats["k2"] < stats["n_prompt"]).all()  # both cut
        embeds, _ = stock_lm_input(model, inputs)
        pos = stock_positions(am)
        assert torch.equal(pre.pos1[pre.valid1], pos.gather(1, pre.index1.clamp(min=0))[pre.valid1])
        kept1, kept2 = kept_in_prompt(pre, ids.shape[1])
        blocks = image_blocks(batch["token_type_ids"])
        keys_a, keys_b = kept1 & am.bool(), kept2 & am.bool()
        ref = masked_logits(model, embeds, pos, keys_a, keys_b, pre.split, blocks)
        for b in range(3):
            torch.testing.assert_close(out.logits[b][out.kept_index[b] >= 0], ref[b][kept2[b]])
        gen = model.generate(**inputs, max_new_tokens=N_NEW, do_sample=False, eos_token_id=None, pad_token_id=0,
                             return_dict_in_generate=True, output_logits=True)  # fmt: skip
        ref_ids, ref_logits = greedy_reference(model, embeds, pos, keys_a, keys_b, pre.split, N_NEW, blocks)
        # the rules matter here: the same reference without the window and the blocks is another model
        loose = masked_logits(model, embeds, pos, keys_a, keys_b, pre.split)
    assert torch.equal(gen.sequences[:, -N_NEW:], ref_ids)
    torch.testing.assert_close(torch.stack(gen.logits, dim=1), ref_logits)
    assert (loose[kept2] - ref[kept2]).abs().max() > 1e-3


def test_the_window_counts_original_positions_not_kept_slots(gemma_factory, make_gemma_batch):
    """A query's window holds the kept keys within 8 *positions*: after stage 1 drops most of an image,
    a window of 8 kept slots would reach back over the gap (same rotary positions, same blocks), and
    its logits differ from the pruner's."""
    cfg = PruningConfig(
        stage1=Stage1Config(selector="budget", budget=2, min_keep=1), stage2=Stage2Config(enabled=False)
    )
    model = attach_pruner(gemma_factory("eager", seed=5), cfg)
    batch = make_gemma_batch(model, [[("text", 2), ("image", None), ("text", 9)]], seed=5)
    ids, am = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        out = model(**model_inputs(batch))
        pre = prefill(model, ids, model_inputs(batch), am)
        types1 = (ids.gather(1, pre.index1.clamp(min=0)) == model.config.image_token_id).long()
        # the stage-1 sequence run whole: the reference's window counts its slots
        as_slots = masked_logits(
            model, pre.embeds1, pre.pos1, pre.valid1, pre.valid1, 4, image_blocks(types1)
        )
    assert last_stats(model)["k1"].tolist() == [2] and model.config.text_config.sliding_window == 8
    assert (out.logits[0, -9:] - as_slots[0, -9:]).abs().max() > 1e-3


def test_ragged_batch_of_4_equals_each_sample_alone(gemma_factory, make_gemma_batch):
    model = attach_pruner(gemma_factory("sdpa", seed=2), CUT)
    samples = [
        [("text", 3), ("image", None), ("text", 4)],
        [("text", 7), ("image", None), ("text", 1), ("image", None), ("text", 2)],
        [("text", 1), ("image", None), ("text", 6)],
        [("text", 5), ("image", None), ("image", None), ("image", None), ("text", 3)],
    ]
    batch = make_gemma_batch(model, samples, seed=3)
    n_img = [1, 2, 1, 3]
    first = [sum(n_img[:b]) for b in range(4)]
    gen_kw = dict(max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        out = model(**model_inputs(batch))
        stats = {k: v.clone() for k, v in last_stats(model).items() if torch.is_tensor(v)}
        gen = model.generate(**model_inputs(batch), **gen_kw)
        assert len(set(stats["k1"].tolist())) > 1 and len(set(stats["k2"].tolist())) > 1  # ragged
        for b in range(4):
            pad = int((batch["attention_mask"][b] == 0).sum())
            single = {k: batch[k][b : b + 1, pad:] for k in ("input_ids", "attention_mask", "token_type_ids")}
            single["pixel_values"] = batch["pixel_values"][first[b] : first[b] + n_img[b]]
            o = model(**single)
            s = last_stats(model)
            for key in ("n_visual", "k1", "n_prompt", "k2", "n_dense"):
                assert int(s[key][0]) == int(stats[key][b]), key
            kept = out.kept_index[b] >= 0
            assert torch.equal(out.kept_index[b][kept] - pad, o.kept_index[0])
            torch.testing.assert_close(out.logits[b][kept], o.logits[0])
            g = model.generate(**single, **gen_kw)
            assert torch.equal(gen[b, -6:], g[0, -6:])


def test_stage1_scores_the_units_as_the_projector_pools_them(gemma_factory, make_gemma_batch):
    model = gemma_factory("eager", seed=4)
    batch = make_gemma_batch(model, SAMPLES[1:2], seed=4)
    pv = batch["pixel_values"]
    tower = model.model.vision_tower
    with torch.no_grad():
        out = tower(pv, output_attentions=True)
    feats = out.last_hidden_state  # (2, 64, 32): what the projector pools
    mean = F.cosine_similarity(feats, feats.mean(dim=1, keepdim=True), dim=-1)  # (2, 64)
    received = out.attentions[-1].mean(dim=(1, 2))  # (2, 64): heads and queries averaged

    def pool(s):  # 8 x 8 patches -> 4 x 4 units, 2 x 2 each, row-major
        return F.avg_pool2d(s.view(2, 1, 8, 8), 2).flatten(1)

    torch.testing.assert_close(stage1_scores(model, pv, Stage1Config(score="cosine_mean")), pool(mean))
    torch.testing.assert_close(stage1_scores(model, pv, Stage1Config(score="attn_received")), pool(received))
    family = family_of(model)  # the premise report's view: the tower's input, a unit of 2 x 2 patches of 4 px
    assert family.premise_view(model, 96) == (32, 8)
    torch.testing.assert_close(family.view_scores(model, pv, Stage1Config()), 1 - pool(mean))  # mean_distance
    cfg = PruningConfig(
        stage1=Stage1Config(selector="budget", budget=3, min_keep=1), stage2=Stage2Config(enabled=False)
    )
    attach_pruner(model, cfg)
    with torch.no_grad():
        model(**model_inputs(batch))
    st = last_stats(model)
    assert st["k1"].tolist() == [6]  # one knee per image: 3 units of each
    top = (1 - pool(mean)).topk(3, dim=1).indices.sort(dim=1).values
    assert st["visual_keep"][0].tolist() == torch.cat([top[0], top[1] + 16]).tolist()
    with pytest.raises(ValueError, match="has none: use 'mean_distance', 'cosine_mean' or 'attn_received'"):
        attach_pruner(model, PruningConfig(stage1=Stage1Config(score="cls_attn")))


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_stage2_scores_equal_the_layers_attention(gemma_factory, make_gemma_batch, softcap):
    """Our q/k path (Gemma's RMS norms on the input and on q/k, post-RoPE with the global table, scale
    query_pre_attn_scalar ** -0.5, GQA) equals the global layer's own eager attention. Gemma 3's
    attention never applies ``attn_logit_softcapping`` (Gemma 2's did): set or not, the same."""
    model = gemma_factory("eager", seed=6, query_pre_attn_scalar=24, attn_logit_softcapping=softcap)
    batch = make_gemma_batch(model, SAMPLES[:2], seed=6)
    am = batch["attention_mask"]
    pos = stock_positions(am)
    k = 2
    lm = model.model.language_model
    assert lm.config.layer_types[k] == "full_attention"
    with torch.no_grad():
        out = model(
            **model_inputs(batch), position_ids=pos, output_attentions=True, output_hidden_states=True
        )
        h = out.hidden_states[k]
        cos, sin = lm.rotary_emb(h, pos, "full_attention")
        valid = am.bool()
        img = batch["input_ids"] == model.config.image_token_id
        _, _, qpos, qvalid = stage2_roles(img, valid, torch.zeros_like(valid), True, "instruction")
        ours = stage2_scores(lm.layers[k], h, cos, sin, valid, qpos, qvalid)
    attn = out.attentions[k].mean(1)  # (B, T, T)
    for b in range(2):
        rows = qpos[b][qvalid[b]]
        torch.testing.assert_close(ours[b], attn[b, rows].mean(0))
