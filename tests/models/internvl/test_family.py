"""InternVL on the shared core: off and keep-all equal stock; removal equals the stock decoder with the
dropped tokens masked out (prefill logits and 8 greedy tokens); a ragged batch of tile counts equals
each sample alone; several images and video frames per sample; the pixel shuffle's token <-> patch
correspondence; the CLS scores against the tower's own attention weights; the markers stay."""

from __future__ import annotations

import pytest
import torch

from tpkit.models import attach_pruner, detach_pruner, last_stats, stage1_scores
from tpkit.models.core.prefill import prefill
from tpkit.models.internvl.family import patch_groups
from tpkit.models.internvl.tiny import MARKERS_ATTR, tokens_per_tile
from tpkit.models.registry import family_of
from tpkit.pruning import PruningConfig, Stage1Config, Stage2Config

from ..qwen2_vl.reference import greedy_reference, kept_in_prompt, masked_logits, stock_lm_input
from .conftest import build_internvl_batch, model_inputs, sample_alone

KEEP_ALL = PruningConfig(
    stage1=Stage1Config(selector="ratio", ratio=1.0),
    stage2=Stage2Config(selector="ratio", ratio=1.0, layer=2),
)
CUT = PruningConfig(
    stage1=Stage1Config(min_keep=2), stage2=Stage2Config(layer=2, selector="ratio", ratio=0.5)
)
# four samples of different tile counts: a 2 x 2 image + thumbnail, one tile, a 1 x 2 image + thumbnail,
# two images (3 tiles and 1)
SAMPLES = [
    [("text", 3), ("image", 5), ("text", 4)],
    [("text", 6), ("image", 1), ("text", 2)],
    [("text", 1), ("image", 3), ("text", 6)],
    [("text", 4), ("image", 3), ("text", 2), ("image", 1), ("text", 3)],
]
TILES = [5, 1, 3, 4]
GEN = dict(do_sample=False, pad_token_id=0, eos_token_id=None)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_off_and_keep_all_equal_stock(internvl_factory, attn):
    model = internvl_factory(attn)
    batch = model_inputs(build_internvl_batch(model, SAMPLES))
    with torch.no_grad():
        stock = model(**batch).logits
        gen = model.generate(**batch, max_new_tokens=5, **GEN)
        for cfg in (PruningConfig.disabled(), KEEP_ALL):
            attach_pruner(model, cfg)
            out = model(**batch)
            if cfg is KEEP_ALL:  # every prompt token kept, left padding dropped
                for b in range(4):
                    kept = out.kept_index[b] >= 0
                    torch.testing.assert_close(out.logits[b][kept], stock[b][out.kept_index[b][kept]])
            else:
                torch.testing.assert_close(out.logits, stock, rtol=0, atol=0)
            assert torch.equal(model.generate(**batch, max_new_tokens=5, **GEN), gen)
            detach_pruner(model)


def test_keep_all_beams_equal_the_stock_lm_on_its_own_input(internvl_factory):
    """Beam search expands the tiles per sample (they are packed across the batch): keep-all beams equal
    stock beams over stock's own LM input embeddings (transformers 5.17's stock generate repeats the
    tiles row by row, so it is not the reference)."""
    model = internvl_factory("sdpa", seed=5)
    batch = model_inputs(build_internvl_batch(model, SAMPLES[:2], seed=5))
    embeds, _ = stock_lm_input(model, batch)
    kw = dict(max_new_tokens=4, num_beams=2, **GEN)
    with torch.no_grad():
        ref = model.generate(inputs_embeds=embeds, attention_mask=batch["attention_mask"], **kw)
        attach_pruner(model, KEEP_ALL)
        ours = model.generate(**batch, **kw)
    assert torch.equal(ours[:, -4:], ref[:, -4:])


@pytest.mark.parametrize("attn, groups", [("sdpa", "image"), ("eager", "view")])
def test_removal_equals_masking_prefill_and_greedy(internvl_factory, attn, groups):
    model = internvl_factory(attn, seed=1)
    cfg = PruningConfig(stage1=Stage1Config(min_keep=2, groups=groups), stage2=CUT.stage2)
    batch = model_inputs(build_internvl_batch(model, SAMPLES[:3], seed=1))
    ids, am = batch["input_ids"], batch["attention_mask"].bool()
    embeds, pos = stock_lm_input(model, batch)
    attach_pruner(model, cfg)
    with torch.no_grad():
        out = model(**batch)
        pre = prefill(model, ids, {"pixel_values": batch["pixel_values"]}, batch["attention_mask"])
        st = last_stats(model)
        assert (st["k1"] < st["n_visual"]).all() and (st["k2"] < st["n_prompt"]).all()  # both stages cut
        kept1, kept2 = kept_in_prompt(pre, ids.shape[1])
        ref = masked_logits(model, embeds, pos, kept1 & am, kept2 & am, pre.split)
        for b in range(3):
            kept = out.kept_index[b] >= 0
            torch.testing.assert_close(
                out.logits[b][kept], ref[b][out.kept_index[b][kept]], atol=2e-5, rtol=1e-4
            )
        n_new = 8
        gen = model.generate(
            **batch, max_new_tokens=n_new, output_scores=True, return_dict_in_generate=True, **GEN
        )
        ref_ids, ref_logits = greedy_reference(model, embeds, pos, kept1 & am, kept2 & am, pre.split, n_new)
    assert torch.equal(gen.sequences[:, ids.shape[1] :], ref_ids)
    torch.testing.assert_close(torch.stack(gen.scores, dim=1), ref_logits, atol=5e-5, rtol=1e-4)


def test_ragged_batch_of_four_equals_each_sample_alone(internvl_factory):
    model = attach_pruner(internvl_factory("sdpa", seed=3), CUT)
    batch = model_inputs(build_internvl_batch(model, SAMPLES, seed=3))
    with torch.no_grad():
        out = model(**batch)
        k1 = last_stats(model)["k1"]
        gen = model.generate(**batch, max_new_tokens=4, **GEN)
        for b in range(4):
            one = sample_alone(batch, b, TILES)
            alone = model(**one)
            assert int(last_stats(model)["k1"][0]) == int(k1[b])
            torch.testing.assert_close(
                out.logits[b][out.kept_index[b] >= 0], alone.logits[0], atol=2e-5, rtol=1e-4
            )
            assert torch.equal(model.generate(**one, max_new_tokens=4, **GEN)[0, -4:], gen[b, -4:])


def test_images_and_video_frames_cut_per_image_or_per_tile(internvl_factory):
    """Two images and a three-frame video in one sample: ``groups: image`` cuts one knee per image (its
    tiles and thumbnail together) and per frame; ``view`` one per tile."""
    model = internvl_factory("sdpa", seed=4)
    batch = model_inputs(build_internvl_batch(
        model, [[("text", 3), ("image", 3), ("text", 2), ("image", 1), ("text", 2), ("video", 3), ("text", 3)],
                [("text", 2), ("image", 5), ("text", 4)]], seed=4))  # fmt: skip
    per_tile = tokens_per_tile(model.config)
    assert int((batch["input_ids"][0] == model.config.image_token_id).sum()) == (3 + 1 + 3) * per_tile
    with torch.no_grad():
        stock = model(**batch).logits
        attach_pruner(model, KEEP_ALL)
        out = model(**batch)
        for b in range(2):
            kept = out.kept_index[b] >= 0
            torch.testing.assert_close(out.logits[b][kept], stock[b][out.kept_index[b][kept]])
        budget = PruningConfig(
            stage1=Stage1Config(selector="budget", budget=2, min_keep=1), stage2=Stage2Config(enabled=False)
        )
        attach_pruner(model, budget)
        model(**batch)
        assert last_stats(model)["k1"].tolist() == [2 * (2 + 3), 2]  # two images + three frames; one image
        budget.stage1.groups = "view"
        model(**batch)
        assert last_stats(model)["k1"].tolist() == [2 * 7, 2 * 5]  # every tile
        vis = family_of(model).encode(
            model, batch["input_ids"], {"pixel_values": batch["pixel_values"]}, budget.stage1
        )
    real = vis.slots[0] >= 0
    tiles = vis.coords[0, real, 0]
    assert tiles.tolist() == sorted(tiles.tolist()) and tiles.unique().tolist() == list(range(7))
    for tile in range(7):  # each tile's kept tokens: 2, in the token grid's row-major order
        rc = vis.coords[0, real][(tiles == tile) & vis.keep[0, real], 1:]
        assert len(rc) == 2 and (rc[:, 0] * 4 + rc[:, 1]).diff().gt(0).all()


def test_token_scores_come_from_the_patches_the_shuffle_merges(internvl_factory):
    """The channels run through the stock ``pixel_shuffle`` name, for every LM token, the patches whose
    features the stock projector reads for it: checked on the projector's input itself."""
    model = internvl_factory("sdpa", seed=6, image_size=48, patch_size=4)  # 12 x 12 patches -> 6 x 6 tokens
    pixels = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(6))
    seen = {}
    handle = model.model.multi_modal_projector.register_forward_pre_hook(lambda m, a: seen.update(x=a[0]))
    with torch.no_grad():
        tower = model.model.vision_tower(pixel_values=pixels, return_dict=True).last_hidden_state[:, 1:]
        model.model.get_image_features(pixel_values=pixels)
    handle.remove()
    n, p, d = tower.shape
    idx = torch.arange(p, dtype=torch.float32).expand(n, p)[..., None]
    groups = patch_groups(model, idx)[..., 0].long()  # (tiles, T, 4) patch index of each token's 4 patches
    assert groups.shape == (2, 36, 4)
    feats = seen["x"]  # (tiles, T, 4 * d) the projector's input: 4 patches' features concatenated
    for tile in range(n):
        expected = tower[tile][groups[tile]].flatten(1)  # (T, 4 * d)
        torch.testing.assert_close(feats[tile], expected, rtol=0, atol=0)
    rows, cols = groups // 12, groups % 12  # each token: one 2 x 2 block, tokens row-major over blocks
    t = torch.arange(36)
    assert torch.equal(rows.amin(-1) // 2, (t // 6).expand(2, -1)) and torch.equal(
        cols.amin(-1) // 2, (t % 6).expand(2, -1)
    )
    assert (rows.amax(-1) - rows.amin(-1) == 1).all() and (cols.amax(-1) - cols.amin(-1) == 1).all()
    # and a token's stage-1 score is the mean of its patches' scores
    cfg = Stage1Config(score="cosine")
    family = family_of(model)
    per_patch = family._patch_scores(
        model, model.model.vision_tower(pixel_values=pixels).last_hidden_state, None, cfg
    )
    tokens = stage1_scores(model, pixels, cfg)
    assert tokens.shape == (2, 6, 6)
    torch.testing.assert_close(
        tokens.flatten(1), per_patch.gather(1, groups.flatten(1)).view(2, 36, 4).mean(-1)
    )


@pytest.mark.parametrize("score", ["cls_attn", "attn_received"])
def test_attention_scores_equal_the_towers_own_attention_weights(internvl_factory, score):
    """``cls_attn`` (the CLS row) and ``attn_received`` (column means) of the last InternViT layer, from
    its q/k (its qkv bias, and with q/k norms), equal the eager tower's attention weights."""
    for qk_norm in (False, True):
        model = internvl_factory("eager", seed=7)
        if qk_norm:  # InternViT-6B's q/k RMSNorm over the full width: scores must apply it as the tower does
            from transformers import InternVLForConditionalGeneration

            model.config.vision_config.use_qk_norm = True
            torch.manual_seed(7)
            model = InternVLForConditionalGeneration(model.config).eval()
            for layer in model.model.vision_tower.encoder.layer:
                layer.attention.q_norm.weight.data.uniform_(0.5, 1.5)
        pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))
        with torch.no_grad():
            out = model.model.vision_tower(pixel_values=pixels, output_attentions=True, return_dict=True)
            w = out.attentions[-1].mean(dim=1)  # (tiles, 1 + P, 1 + P), heads averaged
            patch = w[:, 0, 1:] if score == "cls_attn" else w.mean(dim=1)[:, 1:]
            ref = patch_groups(model, patch[..., None])[..., 0].mean(-1)  # (tiles, T) the tokens' means
            got = stage1_scores(model, pixels, Stage1Config(score=score)).flatten(1)
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)


def test_markers_stay_through_both_stages(internvl_factory):
    """Stage 1 drops placeholders only; stage 2, pruning text before the image, keeps every ``<img>`` and
    ``</img>`` (the tokens at the edges of each run)."""
    model = internvl_factory("sdpa", seed=8)
    batch = model_inputs(build_internvl_batch(model, SAMPLES, seed=8))
    start, end = getattr(model.config, MARKERS_ATTR)
    attach_pruner(model, PruningConfig(stage1=Stage1Config(selector="budget", budget=2, min_keep=1),
                                       stage2=Stage2Config(layer=1, selector="ratio", ratio=0.1, prune_text=True)))  # fmt: skip
    with torch.no_grad():
        out = model(**batch)
    st = last_stats(model)
    assert (st["k2"] < st["n_prompt"]).all()
    ids, am = batch["input_ids"], batch["attention_mask"].bool()
    dropped_before = 0  # text before the first <img> that stage 2 dropped: the marker itself was a candidate
    for b in range(4):
        kept = out.kept_index[b][out.kept_index[b] >= 0]
        marks = torch.isin(ids[b], torch.tensor([start, end])).nonzero().flatten()
        assert len(marks) == 2 * (1 + (b == 3)) and torch.isin(marks, kept).all()
        before = (am[b] & (torch.arange(ids.shape[1]) < marks[0])).nonzero().flatten()
        dropped_before += int((~torch.isin(before, kept)).sum())
    assert dropped_before > 0


def test_cls_scores_are_allowed_and_the_default_is_cosine(internvl_factory):
    model = internvl_factory()
    family = family_of(model)
    assert family.has_cls(model) and family.score_kind(model, Stage1Config()) == "cosine"
    attach_pruner(model, PruningConfig(stage1=Stage1Config(score="cls_attn")))
    model.config.vision_feature_select_strategy = "full"  # CLS among the features: no square token grid
    with pytest.raises(ValueError, match="vision_feature_select_strategy = 'full'"):
        attach_pruner(model, PruningConfig())


def test_mismatched_placeholders_and_pixels_name_the_counts(internvl_factory):
    model = attach_pruner(internvl_factory(), CUT)
    batch = model_inputs(build_internvl_batch(model, SAMPLES[:2]))
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"hold 96 image placeholders .* gives 5 tiles of 16 tokens"):
            model(**{**batch, "pixel_values": batch["pixel_values"][:5]})
        ids = batch["input_ids"].clone()
        ids[0, (ids[0] == model.config.image_token_id).nonzero()[0]] = 9  # one placeholder short
        with pytest.raises(
            ValueError, match=r"run of 79 image placeholders .* not a whole number of tiles of 16"
        ):
            model(**{**batch, "input_ids": ids})
        with pytest.raises(ValueError, match=r"\(tiles, 3, 32, 32\)"):
            model(**{**batch, "pixel_values": batch["pixel_values"][..., :16, :16]})
