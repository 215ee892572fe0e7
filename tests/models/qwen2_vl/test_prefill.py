"""The pruned Qwen2-VL / Qwen2.5-VL forward and generate equal the unpruned model with the dropped tokens
masked out (stock embeddings, stock M-RoPE ids, stock layers, masks built from scratch); ragged
batches equal their samples alone; stage-1 groups; errors."""

import types

import pytest
import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

from tpkit.models import attach_pruner, last_stats, pruning_disabled
from tpkit.models.core.prefill import prefill
from tpkit.models.core.state import state_of
from tpkit.models.qwen2_vl.tiny import build_tiny_qwen
from tpkit.pruning import PruningConfig, Stage1Config, Stage2Config

from .reference import greedy_reference, kept_in_prompt, masked_logits, model_inputs, stock_lm_input

CUT = PruningConfig(
    stage1=Stage1Config(min_keep=2, max_keep=12), stage2=Stage2Config(layer=2, selector="ratio", ratio=0.5)
)
SAMPLES = [
    [("text", 3), ("image", (8, 12)), ("text", 4)],
    [("text", 5), ("image", (8, 8)), ("text", 2), ("image", (4, 8)), ("text", 3)],
    [("text", 2), ("video", (2, 8, 8)), ("text", 5)],
]


def _pruned_and_reference(model, batch):
    """The pruned prefill (logits, its kept sets in the prompt's frame) and the masked reference."""
    ids, am = batch["input_ids"], batch["attention_mask"]
    inputs = model_inputs(batch)
    out = model(**inputs)
    pre = prefill(model, ids, inputs, am)
    stats = last_stats(model)
    kept1, kept2 = kept_in_prompt(pre, ids.shape[1])
    embeds, pos = stock_lm_input(model, batch)
    return out, pre, stats, kept1, kept2, embeds, pos


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("variant", ["qwen2-vl", "qwen2.5-vl"])
def test_removal_equals_masking(qwen_factory, make_qwen_batch, variant, attn):
    model = attach_pruner(qwen_factory(variant, attn, seed=1), CUT)
    batch = make_qwen_batch(model, SAMPLES, seed=1)
    am = batch["attention_mask"].bool()
    n_new = 8
    with torch.no_grad():
        out, pre, stats, kept1, kept2, embeds, pos = _pruned_and_reference(model, batch)
        assert (stats["k1"] < stats["n_visual"]).all() and (stats["k2"] < stats["n_prompt"]).all()  # both cut
        # every kept token keeps its stock (t, h, w) ids through both stages
        assert torch.equal(
            pre.pos1[:, pre.valid1],
            pos.gather(2, pre.index1.clamp(min=0)[None].expand(3, -1, -1))[:, pre.valid1],
        )
        ref = masked_logits(model, embeds, pos, kept1 & am, kept2 & am, pre.split)
        for b in range(3):
            torch.testing.assert_close(out.logits[b][out.kept_index[b] >= 0], ref[b][kept2[b]])
        gen = model.generate(**model_inputs(batch), max_new_tokens=n_new, do_sample=False, eos_token_id=None,
                             pad_token_id=0, return_dict_in_generate=True, output_logits=True)  # fmt: skip
        ids, logits = greedy_reference(model, embeds, pos, kept1 & am, kept2 & am, pre.split, n_new)
    assert torch.equal(gen.sequences[:, -n_new:], ids)
    torch.testing.assert_close(torch.stack(gen.logits, dim=1), logits)


def test_stage1_only_equals_the_stock_text_model_on_the_shorter_input(qwen_factory, make_qwen_batch):
    """Stage 1 alone = the stock text model fed the kept tokens with their 3-D ids and a 2-D mask."""
    model = qwen_factory("qwen2.5-vl", "sdpa", seed=3)
    cfg = PruningConfig(
        stage1=Stage1Config(selector="budget", budget=3, min_keep=1), stage2=Stage2Config(enabled=False)
    )
    attach_pruner(model, cfg)
    batch = make_qwen_batch(model, SAMPLES, seed=4)
    with torch.no_grad():
        out = model(**model_inputs(batch))
        pre = prefill(model, batch["input_ids"], model_inputs(batch), batch["attention_mask"])
        assert last_stats(model)["k1"].tolist() == [3, 6, 3]  # budget per image / video
        stock = model.model.language_model(
            inputs_embeds=pre.embeds1, attention_mask=pre.valid1.long(), position_ids=pre.pos1
        ).last_hidden_state
    torch.testing.assert_close(out.logits[pre.valid1], model.lm_head(stock)[pre.valid1])


def _reference_forward(model, pre, prompt_len):
    """A forward for ``generate(use_cache=False)``: the masked full-sequence reference over the stage-1
    sequence plus the generated tokens (at the prompt's largest id + 1, + 2, ... on every axis)."""
    lm = model.model.language_model

    def forward(self, input_ids=None, attention_mask=None, pixel_values=None, image_grid_thw=None,
                pixel_values_videos=None, video_grid_thw=None, second_per_grid_ts=None, mm_token_type_ids=None,
                position_ids=None, logits_to_keep=0, use_cache=None, **kwargs):  # fmt: skip
        rows = torch.arange(input_ids.shape[0]) // (input_ids.shape[0] // pre.embeds1.shape[0])
        new = input_ids[:, prompt_len:]
        g = new.shape[1]
        embeds = torch.cat([pre.embeds1[rows], lm.embed_tokens(new)], dim=1)
        pos1 = pre.pos1[:, rows]
        nxt = pos1.amax(dim=(0, 2))[None, :, None] + 1
        pos = torch.cat([pos1, (nxt + torch.arange(g)[None, None]).expand(3, -1, -1)], dim=2)
        ones = torch.ones(len(rows), g, dtype=torch.bool)
        valid = torch.cat([pre.valid1[rows], ones], 1)
        keep2 = torch.cat([pre.keep2[rows], ones], 1)
        logits = masked_logits(model, embeds, pos, valid, valid & keep2, pre.split)[:, -1:]
        return CausalLMOutputWithPast(logits=logits)

    return forward


@pytest.mark.parametrize("variant, attn", [("qwen2-vl", "sdpa"), ("qwen2.5-vl", "eager")])
def test_beam_search_equals_the_masked_reference(qwen_factory, make_qwen_batch, variant, attn):
    model = attach_pruner(qwen_factory(variant, attn, seed=4), CUT)
    batch = make_qwen_batch(model, SAMPLES, seed=2)
    t = batch["input_ids"].shape[1]
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None, num_beams=2,
              return_dict_in_generate=True, output_scores=True)  # fmt: skip
    with torch.no_grad():
        pre = prefill(model, batch["input_ids"], model_inputs(batch), batch["attention_mask"])
        assert (pre.keep2 < pre.valid1).any() and (
            last_stats(model)["k1"] < last_stats(model)["n_visual"]
        ).all()
        pruned = model.generate(**model_inputs(batch), **kw)
        reference = build_tiny_qwen(variant, seed=4, attn_implementation=attn)
        reference.load_state_dict(model.state_dict())
        reference.forward = types.MethodType(_reference_forward(model, pre, t), reference)
        expected = reference.generate(**model_inputs(batch), use_cache=False, **kw)
    assert torch.equal(pruned.sequences, expected.sequences)
    torch.testing.assert_close(pruned.sequences_scores, expected.sequences_scores)


def test_ragged_batch_of_4_equals_each_sample_alone(qwen_factory, make_qwen_batch):
    model = attach_pruner(qwen_factory("qwen2.5-vl", "sdpa", seed=2), CUT)
    samples = [
        [("text", 3), ("image", (8, 12)), ("text", 4)],
        [("text", 7), ("image", (12, 8)), ("text", 2)],
        [("text", 1), ("image", (4, 4)), ("text", 6)],
        [("text", 5), ("image", (8, 8)), ("text", 3)],
    ]
    batch = make_qwen_batch(model, samples, seed=3)
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
            torch.testing.assert_close(out.logits[b][kept], o.logits[0])
            g = model.generate(**single, **gen_kw)
            assert torch.equal(g[0, -6:], gen[b, t:])


@pytest.mark.parametrize("variant", ["qwen2-vl", "qwen2.5-vl"])
def test_stage1_groups_image_or_video_frame(qwen_factory, make_qwen_batch, variant):
    """groups image: one cut per image and per video; groups view: one per video frame. Coordinates are
    (frame, row, col) on each merged grid."""
    model = qwen_factory(variant, "sdpa", seed=5)
    batch = make_qwen_batch(model, SAMPLES, seed=5)
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
    frames = seen["view"] // 16  # the video's 2 frames of 4 x 4 units
    assert sorted(frames.tolist()) == [0, 0, 1, 1]
    vis = state_of(model).family.encode(
        model, batch["input_ids"], model_inputs(batch), Stage1Config(enabled=False)
    )
    coords = vis.coords[2, :32]  # the video: frame-major, then rows, then columns
    assert coords[:, 0].tolist() == [coords[0, 0].item()] * 16 + [coords[0, 0].item() + 1] * 16
    assert coords[:16, 1].tolist() == [r for r in range(4) for _ in range(4)]
    assert coords[:16, 2].tolist() == list(range(4)) * 4
    first = vis.coords[1, :16]  # sample 1, first image (4 x 4 units), then its second (2 x 4)
    second = vis.coords[1, 16:24]
    assert first[0, 0] != second[0, 0] and second[:, 1].tolist() == [0] * 4 + [1] * 4


def test_bad_inputs_raise(qwen_factory, make_qwen_batch):
    model = attach_pruner(qwen_factory("qwen2.5-vl", "sdpa"), CUT)
    batch = make_qwen_batch(model, SAMPLES[:2], seed=0)
    inputs = model_inputs(batch)
    with torch.no_grad():
        with pytest.raises(ValueError, match="pixel_values is given but image_grid_thw is not"):
            model(**{k: v for k, v in inputs.items() if k != "image_grid_thw"})
        with pytest.raises(ValueError, match="image_grid_thw gives 192 patches"):
            model(**{**inputs, "pixel_values": inputs["pixel_values"][:-4]})
        with pytest.raises(ValueError, match="multiples of spatial_merge_size"):
            model(**{**inputs, "image_grid_thw": torch.tensor([[1, 8, 12], [1, 7, 8], [1, 4, 8]])})
        short = inputs["input_ids"].clone()
        short[0, int((short[0] == model.config.image_token_id).nonzero()[0])] = 7  # one placeholder less
        with pytest.raises(ValueError, match="47 image placeholders .* give 48 features"):
            model(**{**inputs, "input_ids": short})
        video = make_qwen_batch(model, SAMPLES[2:], seed=0)
        with pytest.raises(ValueError, match="32 video placeholders but no pixel_values_videos"):
            model(**{**model_inputs(video), "pixel_values": inputs["pixel_values"][:96],
                     "image_grid_thw": inputs["image_grid_thw"][:1], "pixel_values_videos": None})  # fmt: skip
    with pytest.raises(ValueError, match="has none: use 'mean_distance', 'cosine_mean' or 'attn_received'"):
        attach_pruner(model, PruningConfig(stage1=Stage1Config(score="cosine")))
    with pruning_disabled(model), torch.no_grad():  # the stock model still runs
        assert model(**inputs).logits.shape[1] == inputs["input_ids"].shape[1]


@pytest.mark.parametrize("variant", ["qwen2-vl", "qwen2.5-vl"])
def test_stage2_scores_equal_the_layers_attention(qwen_factory, make_qwen_batch, variant):
    """Stage 2's q/k path (normed input, M-RoPE rotary, GQA) equals the stock layer's eager attention."""
    from tpkit.models.core.prefill import stage2_roles, stage2_scores

    model = qwen_factory(variant, "eager", seed=6)
    attach_pruner(model, CUT)
    batch = make_qwen_batch(model, SAMPLES, seed=6)
    k = 2
    with torch.no_grad(), pruning_disabled(model):
        out = model(**model_inputs(batch), output_attentions=True, output_hidden_states=True)
        embeds, pos = stock_lm_input(model, batch)
        lm = model.model.language_model
        h = out.hidden_states[k]  # input of layer k
        cos, sin = lm.rotary_emb(h, position_ids=pos)
        valid = batch["attention_mask"].bool()
        ids = batch["input_ids"]
        visual = (ids == model.config.image_token_id) | (ids == model.config.video_token_id)
        _, _, qpos, qvalid = stage2_roles(visual, valid, torch.zeros_like(valid), True, "instruction")
        ours = stage2_scores(
            lm.layers[k], h, cos, sin, valid, qpos, qvalid, rotate=state_of(model).family.rotate
        )
        attn = out.attentions[k].mean(1)  # (B, T, T)
    for b in range(3):
        rows = qpos[b][qvalid[b]]
        torch.testing.assert_close(ours[b][valid[b]], attn[b, rows].mean(0)[valid[b]])


def test_forced_counts_and_every_score(qwen_factory, make_qwen_batch):
    """stage1_keep / stage2_keep force per-sample counts (a sample's images pooled); attn_received and
    random score too, random the same way twice."""
    model = attach_pruner(qwen_factory("qwen2-vl", "sdpa", seed=7), CUT)
    batch = make_qwen_batch(model, SAMPLES, seed=7)
    inputs = model_inputs(batch)
    with torch.no_grad():
        out = model(**inputs, stage1_keep=torch.tensor([5, 9, 3]), stage2_keep=torch.tensor([12, 14, 999]))
        s = last_stats(model)
        assert s["k1"].tolist() == [5, 9, 3]
        assert s["k2"].tolist() == [12, 14, int(s["n_prompt"][2])]
        assert out.logits.shape[1] == int(s["k2"].max())
        kept = []
        for score in ("attn_received", "random", "random"):
            attach_pruner(model, PruningConfig(stage1=Stage1Config(score=score, selector="ratio", ratio=0.3)))
            assert torch.isfinite(model(**inputs).logits).all()
            kept.append(last_stats(model)["visual_keep_mask"])
            # 30% of each image / video, rounded, at least min_keep (4): 7; 5 + 4; 10
            assert last_stats(model)["k1"].tolist() == [7, 9, 10]
    assert torch.equal(kept[1], kept[2]) and not torch.equal(kept[0], kept[1])


def test_a_text_only_sample_beside_images(qwen_factory, make_qwen_batch):
    """A sample without visual tokens rides along: its positions are stock's (text only), stage 2 has
    nothing to drop there, the masked reference holds for both rows, and beams expand the patches of
    the sample that has them."""
    model = attach_pruner(qwen_factory("qwen2.5-vl", "sdpa", seed=8), CUT)
    batch = make_qwen_batch(model, [[("text", 3), ("image", (8, 8)), ("text", 4)], [("text", 9)]], seed=8)
    am = batch["attention_mask"].bool()
    with torch.no_grad():
        out, pre, stats, kept1, kept2, embeds, pos = _pruned_and_reference(model, batch)
        assert stats["n_visual"].tolist() == [16, 0] and stats["k1"][0] < 16
        ref = masked_logits(model, embeds, pos, kept1 & am, kept2 & am, pre.split)
        for b in range(2):
            torch.testing.assert_close(out.logits[b][out.kept_index[b] >= 0], ref[b][kept2[b]])
        beams = model.generate(
            **model_inputs(batch), max_new_tokens=3, do_sample=False, pad_token_id=0, num_beams=2
        )
    assert beams.shape == (2, batch["input_ids"].shape[1] + 3)
