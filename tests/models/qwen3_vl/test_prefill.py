"""The pruned Qwen3-VL / Qwen3.5 forward and generate against independent references (stock embeddings,
stock DeepStack rows, stock M-RoPE ids, stock layers, masks built from scratch):

* Qwen3-VL (and MoE): the unpruned model with the dropped tokens masked out as keys, DeepStack added
  after layers 0..2 as stock adds it; stage 2 cuts at layer 1, where DeepStack still comes after layers 1
  and 2 (the kept tokens' rows only);
* Qwen3.5: each sample's kept tokens run alone through the stock layers at their original positions
  (a recurrent layer cannot drop a token by masking; the two references agree on attention layers);

prefill logits and 8 greedy tokens; ragged batches of 4 equal their samples alone; stage 1 per video
or per frame; stage 2's q/k path (Qwen3.5's gated queries, partial rotary); errors."""

import pytest
import torch

from tests.models.qwen2_vl.reference import model_inputs, stock_lm_input
from tests.models.reference import (
    compact_greedy,
    compact_logits,
    greedy_reference,
    kept_in_prompt,
    masked_logits,
    stock_layer_adds,
)
from tpkit.models import attach_pruner, last_stats, pruning_disabled
from tpkit.models.core.prefill import prefill, stage2_roles, stage2_scores
from tpkit.models.core.state import state_of
from tpkit.pruning import PruningConfig, Stage1Config, Stage2Config

# cosine_mean: on these random towers its knees differ from image to image (ragged counts)
CUT = PruningConfig(
    stage1=Stage1Config(score="cosine_mean", min_keep=2, max_keep=12),
    stage2=Stage2Config(layer=1, selector="ratio", ratio=0.5),
)
SAMPLES = [
    [("text", 3), ("image", (8, 12)), ("text", 4)],
    [("text", 5), ("image", (8, 8)), ("text", 2), ("image", (4, 8)), ("text", 3)],
    [("text", 2), ("video", (2, 8, 8)), ("text", 5)],
]
N_NEW = 8
GEN = dict(max_new_tokens=N_NEW, do_sample=False, eos_token_id=None, pad_token_id=0)


def _pruned(model, batch):
    """The pruned prefill's logits and generation, its kept sets in the prompt's frame, and the stock
    LM input (embeddings, M-RoPE ids, DeepStack rows) of the unpruned prompt."""
    ids, am = batch["input_ids"], batch["attention_mask"]
    inputs = model_inputs(batch)
    out = model(**inputs)
    pre = prefill(model, ids, inputs, am)
    stats = last_stats(model)
    assert (stats["k1"] < stats["n_visual"]).all() and (stats["k2"] < stats["n_prompt"]).all()  # both cut
    gen = model.generate(**inputs, **GEN, return_dict_in_generate=True, output_logits=True)
    kept1, kept2 = kept_in_prompt(pre, ids.shape[1])
    embeds, pos = stock_lm_input(model, batch)
    keys_a, keys_b = kept1 & am.bool(), kept2 & am.bool()
    return out, gen, pre, keys_a, keys_b, embeds, pos, stock_layer_adds(model, inputs)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("variant", ["qwen3-vl", "qwen3-vl-moe"])
def test_removal_equals_masking_with_deepstack(qwen3_factory, make_qwen3_batch, variant, attn):
    model = attach_pruner(qwen3_factory(variant, attn, seed=1), CUT)
    batch = make_qwen3_batch(model, SAMPLES, seed=1)
    with torch.no_grad():
        out, gen, pre, keys_a, keys_b, embeds, pos, adds = _pruned(model, batch)
        assert pre.split == 1 and sorted(adds) == [0, 1, 2]  # DeepStack after the cut too
        # every kept token keeps its stock (t, h, w) ids through both stages
        assert torch.equal(
            pre.pos1[:, pre.valid1],
            pos.gather(2, pre.index1.clamp(min=0)[None].expand(3, -1, -1))[:, pre.valid1],
        )
        ref = masked_logits(model, embeds, pos, keys_a, keys_b, pre.split, adds=adds)
        for b in range(3):
            torch.testing.assert_close(out.logits[b][out.kept_index[b] >= 0], ref[b][keys_b[b]])
        ids, logits = greedy_reference(model, embeds, pos, keys_a, keys_b, pre.split, N_NEW, adds=adds)
        # the DeepStack rows matter: without them the reference is another model
        loose = masked_logits(model, embeds, pos, keys_a, keys_b, pre.split)
    assert torch.equal(gen.sequences[:, -N_NEW:], ids)
    torch.testing.assert_close(torch.stack(gen.logits, dim=1), logits)
    assert (loose[keys_b] - ref[keys_b]).abs().max() > 1e-3


def test_the_compact_reference_equals_masking_on_attention_layers(qwen3_factory, make_qwen3_batch):
    """Each sample's kept tokens run alone (the Qwen3.5 reference) = the whole prompt with the dropped
    tokens masked, on Qwen3-VL's attention-only decoder, DeepStack included."""
    model = attach_pruner(qwen3_factory("qwen3-vl", "eager", seed=3), CUT)
    batch = make_qwen3_batch(model, SAMPLES, seed=3)
    with torch.no_grad():
        _, _, pre, keys_a, keys_b, embeds, pos, adds = _pruned(model, batch)
        masked = masked_logits(model, embeds, pos, keys_a, keys_b, pre.split, adds=adds)
        compact = compact_logits(model, embeds, pos, keys_a, keys_b, pre.split, adds=adds)
        masked_ids, _ = greedy_reference(model, embeds, pos, keys_a, keys_b, pre.split, 3, adds=adds)
        compact_ids, _ = compact_greedy(model, embeds, pos, keys_a, keys_b, pre.split, 3, adds=adds)
    for b in range(3):
        torch.testing.assert_close(compact[b], masked[b][keys_b[b]])
    assert torch.equal(compact_ids, masked_ids)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_recurrent_layers_run_on_the_kept_tokens_only(qwen3_factory, make_qwen3_batch, attn):
    """Qwen3.5: the pruned prefill and 8 greedy tokens = each sample's kept tokens run alone through the
    stock hybrid decoder (Gated DeltaNet layers 0 and 2 over them in order, attention layers 1 and 3
    causal over them; stage 1's tokens before layer 1, stage 2's from it on). Masking the dropped
    tokens instead (stock's answer to a 2-D mask: the recurrent layers zero their inputs, as padding)
    is another model."""
    model = attach_pruner(qwen3_factory("qwen3.5", attn, seed=1), CUT)
    assert model.config.text_config.layer_types[:2] == ["linear_attention", "full_attention"]
    batch = make_qwen3_batch(model, SAMPLES, seed=1)
    with torch.no_grad():
        out, gen, pre, keys_a, keys_b, embeds, pos, adds = _pruned(model, batch)
        assert adds is None
        ref = compact_logits(model, embeds, pos, keys_a, keys_b, pre.split)
        for b in range(3):
            torch.testing.assert_close(out.logits[b][out.kept_index[b] >= 0], ref[b])
        ids, logits = compact_greedy(model, embeds, pos, keys_a, keys_b, pre.split, N_NEW)
        # stage 1's tokens alone vs stock given a 2-D mask with holes where stage 1 dropped tokens: its
        # attention layers mask them as keys, its recurrent layers zero their inputs (as padding)
        # (with holes only where the padding is, the two agree)
        n = model.config.text_config.num_hidden_layers
        lm = model.model.language_model
        am = batch["attention_mask"]
        for keys, same in ((am.bool(), True), (keys_a, False)):
            alone = compact_logits(model, embeds, pos, keys, keys, n)
            masked = lm(inputs_embeds=embeds, attention_mask=keys.long(), position_ids=pos).last_hidden_state
            masked = model.lm_head(masked)
            diff = max(float((masked[b][keys[b]] - alone[b]).abs().max()) for b in range(3))
            assert diff < 1e-5 if same else diff > 1e-3
    assert torch.equal(gen.sequences[:, -N_NEW:], ids)
    torch.testing.assert_close(torch.stack(gen.logits, dim=1), logits)


@pytest.mark.parametrize("variant", ["qwen3-vl", "qwen3.5"])
def test_ragged_batch_of_4_equals_each_sample_alone(qwen3_factory, make_qwen3_batch, variant):
    model = attach_pruner(qwen3_factory(variant, "sdpa", seed=2), CUT)
    samples = [
        [("text", 3), ("image", (8, 12)), ("text", 4)],
        [("text", 7), ("image", (12, 8)), ("text", 2)],
        [("text", 1), ("image", (4, 4)), ("text", 6)],
        [("text", 5), ("image", (8, 8)), ("text", 3)],
    ]
    batch = make_qwen3_batch(model, samples, seed=3)
    t = batch["input_ids"].shape[1]
    gen_kw = dict(max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    grids = batch["image_grid_thw"]
    rows = grids.prod(-1)
    starts = rows.cumsum(0) - rows
    with torch.no_grad():
        out = model(**model_inputs(batch))
        stats = last_stats(model)
        gen = model.generate(**model_inputs(batch), **gen_kw)
        assert len(set(stats["k1"].tolist())) > 1 and len(set(stats["k2"].tolist())) > 1  # ragged
        for b in range(4):
            pad = int((batch["attention_mask"][b] == 0).sum())
            single = {
                k: batch[k][b : b + 1, pad:] for k in ("input_ids", "attention_mask", "mm_token_type_ids")
            }
            single["pixel_values"] = batch["pixel_values"][starts[b] : starts[b] + rows[b]]
            single["image_grid_thw"] = grids[b : b + 1]
            o = model(**single)
            s = last_stats(model)
            for key in ("n_visual", "k1", "n_prompt", "k2", "n_dense"):
                assert s[key][0] == stats[key][b], key
            assert torch.equal(s["visual_keep"][0], stats["visual_keep"][b])
            kept = out.kept_index[b] >= 0
            assert torch.equal(out.kept_index[b][kept] - pad, o.kept_index[0])
            torch.testing.assert_close(out.logits[b][kept], o.logits[0], rtol=1e-4, atol=1e-5)
            g = model.generate(**single, **gen_kw)
            assert torch.equal(g[0, -6:], gen[b, t:])


def test_stage1_cuts_a_video_over_its_frames_or_per_frame(qwen3_factory, make_qwen3_batch):
    """groups image: one knee per image and per video (its frames' runs together); groups view: one per
    frame. Coordinates are (frame, row, col) on each merged grid, frames in prompt order."""
    model = qwen3_factory("qwen3-vl", "sdpa", seed=5)
    batch = make_qwen3_batch(model, SAMPLES, seed=5)
    budget = dict(selector="budget", budget=2, min_keep=1)
    seen = {}
    for groups, k1 in (("image", [2, 4, 2]), ("view", [2, 4, 4])):
        attach_pruner(
            model,
            PruningConfig(stage1=Stage1Config(groups=groups, **budget), stage2=Stage2Config(enabled=False)),
        )
        with torch.no_grad():
            model(**model_inputs(batch))
        stats = last_stats(model)
        assert stats["k1"].tolist() == k1, groups
        seen[groups] = stats["visual_keep"][2]
    assert sorted((seen["view"] // 16).tolist()) == [0, 0, 1, 1]  # two units of each 4 x 4 frame
    vis = state_of(model).family.encode(
        model, batch["input_ids"], model_inputs(batch), Stage1Config(enabled=False)
    )
    coords = vis.coords[2, :32]  # the video: frame-major, then rows, then columns
    assert coords[:, 0].tolist() == [coords[0, 0].item()] * 16 + [coords[0, 0].item() + 1] * 16
    assert coords[:16, 1].tolist() == [r for r in range(4) for _ in range(4)]
    assert coords[:16, 2].tolist() == list(range(4)) * 4


@pytest.mark.parametrize("variant", ["qwen3-vl", "qwen3.5"])
def test_stage2_scores_equal_the_layers_attention(qwen3_factory, make_qwen3_batch, variant):
    """Stage 2's q/k path (normed input, q/k norms, interleaved M-RoPE, GQA; Qwen3.5: the query without
    its gate, a quarter of the head rotated) equals the stock layer's eager attention."""
    model = attach_pruner(qwen3_factory(variant, "eager", seed=6), CUT)
    batch = make_qwen3_batch(model, SAMPLES, seed=6)
    k = 1
    with torch.no_grad(), pruning_disabled(model):
        out = model(**model_inputs(batch), output_attentions=True, output_hidden_states=True)
        _, pos = stock_lm_input(model, batch)
        lm = model.model.language_model
        adds = stock_layer_adds(model, model_inputs(batch))
        h = out.hidden_states[k]  # layer k - 1's output as recorded: before DeepStack adds its rows
        h = h if adds is None else h + adds[k - 1]  # the input of layer k
        cos, sin = lm.rotary_emb(h, position_ids=pos)
        valid = batch["attention_mask"].bool()
        ids = batch["input_ids"]
        visual = (ids == model.config.image_token_id) | (ids == model.config.video_token_id)
        _, _, qpos, qvalid = stage2_roles(visual, valid, torch.zeros_like(valid), True, "instruction")
        ours = stage2_scores(
            lm.layers[k], h, cos, sin, valid, qpos, qvalid, rotate=state_of(model).family.rotate
        )
        attn = [a for a in out.attentions if a is not None]
        attn = attn[0 if variant == "qwen3.5" else k].mean(1)  # (B, T, T); Qwen3.5: its attention layers'
    for b in range(3):
        rows = qpos[b][qvalid[b]]
        torch.testing.assert_close(ours[b][valid[b]], attn[b, rows].mean(0)[valid[b]])


def test_stage2_at_a_recurrent_layer_raises(qwen3_factory):
    model = qwen3_factory("qwen3.5")
    with pytest.raises(ValueError, match=r"stage2.layer = 2 is a recurrent .* attention layers \(1, 3\)"):
        attach_pruner(model, PruningConfig(stage2=Stage2Config(layer=2)))
    attach_pruner(model, PruningConfig(stage2=Stage2Config(enabled=False)))  # stage 1 alone is fine
    attach_pruner(model, PruningConfig(stage2=Stage2Config(layer=3)))
