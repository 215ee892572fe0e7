"""LLaVA-NeXT and LLaVA-OneVision on the shared core: off and keep-all equal stock; removal equals
masking against an independent reference (stock's own input embeddings, dropped tokens masked out);
ragged batches of any-res images equal each sample alone; several images and videos per sample."""

from __future__ import annotations

import pytest
import torch
import transformers

from tests.models.core.test_generate import _ref_mask
from tpkit.models import attach_pruner, detach_pruner, last_stats, pruning_disabled
from tpkit.models.core.prefill import prefill
from tpkit.models.core.state import state_of
from tpkit.models.llava_next.tiny import tiny_next_config, tiny_onevision_config
from tpkit.models.registry import family_of
from tpkit.pruning import PruningConfig, Stage1Config, Stage2Config

KEEP_ALL = PruningConfig(
    stage1=Stage1Config(selector="ratio", ratio=1.0),
    stage2=Stage2Config(selector="ratio", ratio=1.0, layer=2),
)
CUT = PruningConfig(
    stage1=Stage1Config(min_keep=2), stage2=Stage2Config(layer=2, selector="ratio", ratio=0.5)
)
SIZES = [(32, 64), (64, 64), (40, 30), (64, 32)]  # 1x2, 2x2, 1x1 (+ unpadding), 2x1 crops


def build(kind: str, attn: str = "sdpa", seed: int = 0):
    if kind == "next":
        cfg, cls = tiny_next_config(attn_implementation=attn), transformers.LlavaNextForConditionalGeneration
    else:
        cfg = tiny_onevision_config(attn_implementation=attn)
        cls = transformers.LlavaOnevisionForConditionalGeneration
    torch.manual_seed(seed)
    return cls(cfg).eval()


def any_res_batch(model, sizes, before, after, seed=0, images_per_sample=None):
    """Left-padded prompts ``[bos] text image-run [image-run ...] text`` with any-res pixel values."""
    family = family_of(model)
    g = torch.Generator().manual_seed(seed)
    per = images_per_sample or [1] * len(before)
    rows, it = [], iter(sizes)
    for a, c, k in zip(before, after, per):
        parts = [torch.tensor([1]), torch.randint(6, 128, (a,), generator=g)]
        for _ in range(k):
            n = family.image_token_count(model, next(it), base_only=k > 1)
            parts += [torch.full((n,), model.config.image_token_id), torch.randint(6, 128, (2,), generator=g)]
        parts.append(torch.randint(6, 128, (c,), generator=g))
        rows.append(torch.cat(parts))
    t = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), t, dtype=torch.long)
    am = torch.zeros(len(rows), t, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, t - len(r) :], am[i, t - len(r) :] = r, 1
    crops = family._crops(model, {"image_sizes": torch.tensor(sizes)})
    side = model.config.vision_config.image_size
    pixels = torch.zeros(len(sizes), max(crops), 3, side, side)
    for i, n in enumerate(crops):
        pixels[i, :n] = torch.randn(n, 3, side, side, generator=g)
    return {
        "input_ids": ids,
        "attention_mask": am,
        "pixel_values": pixels,
        "image_sizes": torch.tensor(sizes),
    }


def stock_embeds(model, batch):
    """The language model's input embeddings in a stock forward (captured, not recomputed)."""
    seen = {}
    lm = model.model.language_model

    def grab(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"]

    handle = lm.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad(), pruning_disabled(model):
            model(**batch)
    finally:
        handle.remove()
    return seen["embeds"]


def masked_reference(model, embeds, attention_mask, keep1, keep2, split):
    """The unpruned language model over the whole prompt (stock positions), stage 1's dropped tokens
    masked out as keys everywhere, stage 2's from its layer on. Logits (B, T, V)."""
    lm = model.model.language_model
    impl = lm.config._attn_implementation
    am = attention_mask.bool()
    pos = (am.long().cumsum(1) - 1).clamp(min=0)
    cos, sin = lm.rotary_emb(embeds, position_ids=pos)
    mask_a, mask_b = _ref_mask(am & keep1, impl, embeds.dtype), _ref_mask(am & keep2, impl, embeds.dtype)
    h = embeds
    for i, layer in enumerate(lm.layers):
        h = layer(
            h,
            attention_mask=mask_a if i < split else mask_b,
            position_embeddings=(cos, sin),
            position_ids=pos,
        )
        h = h[0] if isinstance(h, tuple) else h
    return model.lm_head(lm.norm(h))


def kept_masks(pre, t):
    """(B, T) bool: input positions left after stage 1, and after both stages."""
    b = pre.index1.shape[0]
    idx2 = torch.where(pre.valid2, pre.kept_index, t)
    keep2 = torch.zeros(b, t + 1, dtype=torch.bool).scatter(1, idx2, True)[:, :t]
    idx1 = torch.where(pre.valid1, pre.index1, t)
    keep1 = torch.zeros(b, t + 1, dtype=torch.bool).scatter(1, idx1, True)[:, :t]
    return keep1, keep2


@pytest.mark.parametrize("kind", ["next", "ov"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_off_and_keep_all_equal_stock(kind, attn):
    model = build(kind, attn)
    batch = any_res_batch(model, SIZES, before=(3, 5, 1, 4), after=(4, 2, 6, 3))
    with torch.no_grad():
        stock = model(**batch).logits
        gen = model.generate(**batch, max_new_tokens=5, do_sample=False, pad_token_id=0)
        for cfg in (PruningConfig.disabled(), KEEP_ALL):
            attach_pruner(model, cfg)
            out = model(**batch)
            if cfg is KEEP_ALL:  # every prompt token kept, left padding dropped
                for b in range(4):
                    rows = out.kept_index[b][out.kept_index[b] >= 0]
                    torch.testing.assert_close(out.logits[b][out.kept_index[b] >= 0], stock[b][rows])
            else:
                torch.testing.assert_close(out.logits, stock, rtol=0, atol=0)
            assert torch.equal(
                model.generate(**batch, max_new_tokens=5, do_sample=False, pad_token_id=0), gen
            )
            detach_pruner(model)


@pytest.mark.parametrize("kind, attn, groups", [("next", "sdpa", "image"), ("next", "eager", "view"),
                                                ("ov", "sdpa", "view"), ("ov", "eager", "image")])  # fmt: skip
def test_removal_equals_masking_prefill_and_greedy(kind, attn, groups):
    model = build(kind, attn, seed=1)
    cfg = PruningConfig(stage1=Stage1Config(min_keep=2, groups=groups), stage2=CUT.stage2)
    batch = any_res_batch(model, SIZES[:3], before=(3, 5, 1), after=(4, 2, 6), seed=1)
    embeds = stock_embeds(model, batch)
    attach_pruner(model, cfg)
    t = batch["input_ids"].shape[1]
    with torch.no_grad():
        out = model(**batch)
        visual = {k: batch[k] for k in ("pixel_values", "image_sizes")}
        pre = prefill(model, batch["input_ids"], visual, batch["attention_mask"])
        st = last_stats(model)
        assert (st["k1"] < st["n_visual"]).all() and (st["k2"] < st["n_prompt"]).all()  # both stages cut
        keep1, keep2 = kept_masks(pre, t)
        ref = masked_reference(model, embeds, batch["attention_mask"], keep1, keep2, pre.split)
        for b in range(3):
            kept = out.kept_index[b][out.kept_index[b] >= 0]
            torch.testing.assert_close(
                out.logits[b][out.kept_index[b] >= 0], ref[b][kept], atol=2e-5, rtol=1e-4
            )
        n_new = 8
        gen = model.generate(
            **batch, max_new_tokens=n_new, do_sample=False, pad_token_id=0, eos_token_id=None
        )
        # the reference decodes by recomputing the whole sequence each step
        lm = model.model.language_model
        am, k1, k2, e = batch["attention_mask"], keep1, keep2, embeds
        for step in range(n_new):
            nxt = masked_reference(model, e, am, k1, k2, pre.split)[:, -1].argmax(-1)
            assert torch.equal(nxt, gen[:, t + step]), step
            e = torch.cat([e, lm.embed_tokens(nxt)[:, None]], 1)
            ones = torch.ones(3, 1, dtype=torch.bool)
            am, k1, k2 = torch.cat([am, ones.long()], 1), torch.cat([k1, ones], 1), torch.cat([k2, ones], 1)


def test_newlines_follow_their_rows_and_groups_cut_per_image():
    model = build("next", seed=2)
    batch = any_res_batch(model, [(64, 64), (32, 64)], before=(3, 2), after=(4, 4), seed=2)
    attach_pruner(model, PruningConfig(stage1=Stage1Config(selector="budget", budget=3, min_keep=1),
                                       stage2=Stage2Config(enabled=False)))  # fmt: skip
    fam = family_of(model)
    with torch.no_grad():
        vis = fam.encode(model, batch["input_ids"], {k: batch[k] for k in ("pixel_values", "image_sizes")},
                         state_of(model).config.stage1)  # fmt: skip
    for b in range(2):
        real = vis.slots[b] >= 0
        content = vis.coords[b, :, 0] >= 0
        assert int((vis.keep[b] & content & real).sum()) == 3  # budget 3 patches per image
        # a newline stays exactly when a canvas patch of its row does
        rows, row = [], []
        for j in torch.nonzero(real).flatten().tolist():
            if content[j]:
                row.append(j)
            else:
                rows.append((j, row))
                row = []
        assert rows, "every multi-crop canvas row ends with a newline"
        for nl, members in rows:
            canvas = [j for j in members if vis.coords[b, j, 0] % 2 == 1] or members
            assert bool(vis.keep[b, nl]) == bool(vis.keep[b, canvas].any())


def test_ragged_batch_of_four_equals_each_sample_alone():
    model = attach_pruner(build("ov", seed=3), CUT)
    batch = any_res_batch(model, SIZES, before=(3, 6, 1, 4), after=(4, 2, 6, 3), seed=3)
    with torch.no_grad():
        out = model(**batch)
        gen = model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=0)
        for b in range(4):
            am = batch["attention_mask"][b].bool()
            one = {"input_ids": batch["input_ids"][b : b + 1, am], "attention_mask": batch["attention_mask"][b : b + 1, am],
                   "pixel_values": batch["pixel_values"][b : b + 1], "image_sizes": batch["image_sizes"][b : b + 1]}  # fmt: skip
            alone = model(**one)
            torch.testing.assert_close(
                out.logits[b][out.kept_index[b] >= 0], alone.logits[0], atol=2e-5, rtol=1e-4
            )
            g1 = model.generate(**one, max_new_tokens=4, do_sample=False, pad_token_id=0)
            assert torch.equal(g1[0, -4:], gen[b, -4:])


def test_two_images_in_a_sample_and_a_video():
    model = build("ov", seed=4)
    # sample 0 holds two images (base views only, as stock encodes multi-image samples), sample 1 one
    batch = any_res_batch(model, [(32, 32), (64, 32), (64, 64)], before=(3, 2), after=(2, 3), seed=4,
                          images_per_sample=[2, 1])  # fmt: skip
    batch["batch_num_images"] = torch.tensor([2, 1])
    n_img = [(batch["input_ids"][b] == model.config.image_token_id).sum().item() for b in range(2)]
    fam = family_of(model)
    assert n_img[0] == 2 * (16 + 1)  # two base views (4 x 4 patches) + a newline each
    videos = torch.randn(1, 2, 3, 32, 32)
    n_vid = 2 * 4 + 1  # two frames pooled to 2 x 2, one closing newline
    vbatch = {"input_ids": torch.cat([torch.tensor([[1, 7, 8]]), torch.full((1, n_vid), model.config.video_token_id),
                                      torch.tensor([[9, 10]])], 1), "pixel_values_videos": videos}  # fmt: skip
    vbatch["attention_mask"] = torch.ones_like(vbatch["input_ids"])
    with torch.no_grad():
        stock, vstock = model(**batch).logits, model(**vbatch).logits
        attach_pruner(model, KEEP_ALL)
        out, vout = model(**batch), model(**vbatch)
        torch.testing.assert_close(
            out.logits[1][out.kept_index[1] >= 0], stock[1][out.kept_index[1][out.kept_index[1] >= 0]]
        )
        torch.testing.assert_close(vout.logits[0], vstock[0])
        attach_pruner(model, PruningConfig(stage1=Stage1Config(selector="budget", budget=2, min_keep=1),
                                           stage2=Stage2Config(enabled=False)))  # fmt: skip
        model(**batch)
        st = last_stats(model)
        assert int(st["k1"][0]) == 2 * (2 + 1)  # per image: 2 patches + its base view's newline
        assert 2 <= int(st["k1"][1]) <= 2 + 2  # 2 patches + the newlines of their canvas rows (if any)
        model(**vbatch)
        assert last_stats(model)["k1"].tolist() == [2 + 1]  # one knee per video, its newline stays
        attach_pruner(model, PruningConfig(stage1=Stage1Config(selector="budget", budget=2, min_keep=1,
                                                               groups="view"), stage2=Stage2Config(enabled=False)))  # fmt: skip
        model(**vbatch)
        assert last_stats(model)["k1"].tolist() == [2 * 2 + 1]  # one knee per frame
    assert fam.has_cls(model) is False


def test_cls_scores_on_siglip_raise_and_default_is_mean_distance():
    model = build("ov")
    with pytest.raises(ValueError, match="use 'mean_distance', 'cosine_mean' or 'attn_received'"):
        attach_pruner(model, PruningConfig(stage1=Stage1Config(score="cosine")))
    attach_pruner(model, PruningConfig(stage1=Stage1Config(score="attn_received")))
    assert family_of(model).score_kind(model, Stage1Config()) == "mean_distance"
    assert family_of(build("next")).score_kind(model, Stage1Config()) == "mean_distance"
    nxt = build("next")
    assert family_of(nxt).score_kind(nxt, Stage1Config()) == "cosine"


def test_mismatched_placeholders_name_the_counts():
    model = attach_pruner(build("next"), CUT)
    batch = any_res_batch(model, [(64, 64)], before=(3,), after=(2,))
    batch["image_sizes"] = torch.tensor([(32, 64)])
    with torch.no_grad(), pytest.raises(ValueError, match="placeholders"):
        model(**batch)
    del batch["image_sizes"]
    with torch.no_grad(), pytest.raises(ValueError, match="image_sizes"):
        model(**batch)
