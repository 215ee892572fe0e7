import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPVisionConfig
from transformers.models.clip.modeling_clip import CLIPEncoderLayer

from tpkit.pruning import (
    Stage1Config,
    attention_received,
    cls_attention,
    cls_cosine,
    context_merge,
    encoder_attention,
    mean_cosine,
    merge_into,
    patch_scores,
    random_scores,
    select_patches,
    tower_attention_received,
)
from tpkit.pruning.stage2 import diverse_order, redundancy


def test_cosine_scores():
    h = torch.randn(2, 1 + 9, 8)
    s = cls_cosine(h)
    assert s.shape == (2, 9)
    torch.testing.assert_close(s[1, 4], F.cosine_similarity(h[1, 0], h[1, 5], dim=0))
    c = cls_cosine(h, centered=True)
    mean = h[:, 1:].mean(1)
    torch.testing.assert_close(c[0, 2], F.cosine_similarity(h[0, 0] - mean[0], h[0, 3] - mean[0], dim=0))


def test_cls_attention_matches_eager_attention_weights():
    cfg = CLIPVisionConfig(hidden_size=16, num_attention_heads=2, intermediate_size=32)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    layer = CLIPEncoderLayer(cfg).eval()
    x = torch.randn(2, 1 + 6, 16)
    with torch.no_grad():
        _, weights = layer.self_attn(hidden_states=layer.layer_norm1(x), attention_mask=None)
        ours = cls_attention(x, layer)
    ref = weights.mean(1)[:, 0, 1:]
    torch.testing.assert_close(ours, ref)


def test_select_keeps_spatial_order_and_ragged_counts():
    scores = torch.tensor(
        [[0.1, 0.9, 0.2, 0.8, 0.0, 0.05], [0.9, 0.85, 0.8, 0.75, 0.1, 0.0]], dtype=torch.float
    )
    mask, k = select_patches(scores, Stage1Config(selector="budget", budget=2, min_keep=1))
    assert k.tolist() == [2, 2]
    assert mask[0].nonzero().flatten().tolist() == [1, 3]
    assert mask[1].nonzero().flatten().tolist() == [0, 1]
    mask, k = select_patches(scores, Stage1Config(min_keep=1), keep=torch.tensor([3, 1]))
    assert k.tolist() == [3, 1]
    assert mask[0].nonzero().flatten().tolist() == [1, 2, 3]
    assert mask[1].nonzero().flatten().tolist() == [0]
    # a step in each row: kneedle cuts at the step, differently per image
    step = torch.tensor([[1.0, 0, 0, 1, 0, 0, 0, 0], [1, 1, 1, 0, 1, 1, 0, 0]])
    mask, k = select_patches(step, Stage1Config(min_keep=1))
    assert k.tolist() == [2, 5]
    assert mask.sum(1).tolist() == [2, 5]


def test_random_is_seeded_and_ties_are_stable():
    assert torch.equal(random_scores(2, 10, seed=3), random_scores(2, 10, seed=3))
    assert not torch.equal(random_scores(2, 10, seed=3), random_scores(2, 10, seed=4))
    mask, _ = select_patches(torch.zeros(1, 6), Stage1Config(selector="budget", budget=3, min_keep=1))
    assert mask[0].nonzero().flatten().tolist() == [0, 1, 2]
    mask, _ = select_patches(torch.full((1, 6), float("nan")), Stage1Config(min_keep=2, max_keep=3))
    assert 2 <= int(mask.sum()) <= 3


def test_cosine_mean_is_the_cls_less_summary_and_ignores_padding():
    h = torch.randn(2, 5, 8)
    s = mean_cosine(h)
    torch.testing.assert_close(s[1, 2], F.cosine_similarity(h[1].mean(0), h[1, 2], dim=0))
    valid = torch.tensor([[True] * 5, [True, True, True, False, False]])
    padded = mean_cosine(h, valid)
    torch.testing.assert_close(padded[1, :3], mean_cosine(h[1:, :3])[0])
    assert padded[1, 3:].isnan().all() and torch.equal(padded[0], s[0])


def test_attention_received_matches_eager_weights_in_chunks_and_with_padding():
    cfg = CLIPVisionConfig(hidden_size=16, num_attention_heads=2, intermediate_size=32)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    layer = CLIPEncoderLayer(cfg).eval()
    x = torch.randn(2, 1 + 6, 16)
    with torch.no_grad():
        _, weights = layer.self_attn(hidden_states=layer.layer_norm1(x), attention_mask=None)
        ours = tower_attention_received(x, layer)  # CLS column left out
        patches_only = tower_attention_received(x[:, 1:], layer, cls=False)
    torch.testing.assert_close(ours, weights.mean(1).mean(1)[:, 1:])
    assert patches_only.shape == (2, 6)
    q, k = torch.randn(2, 3, 7, 4), torch.randn(2, 3, 7, 4)
    whole = attention_received(q, k, 0.5)
    torch.testing.assert_close(attention_received(q, k, 0.5, chunk=2), whole)
    torch.testing.assert_close(whole.sum(1), torch.ones(2))  # each query spreads 1 over the keys
    valid = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    padded = attention_received(q, k, 0.5, valid)
    torch.testing.assert_close(padded[1, :4], attention_received(q[1:, :, :4], k[1:, :, :4], 0.5)[0])
    assert padded[1, 4:].isnan().all()


def test_select_with_ragged_counts_equals_each_row_alone():
    torch.manual_seed(1)
    rows = [torch.rand(9), torch.rand(5), torch.rand(9), torch.rand(2)]
    padded = torch.full((4, 9), 7.0)  # padding scores above every real one: they must not count
    for i, r in enumerate(rows):
        padded[i, : len(r)] = r
    counts = torch.tensor([len(r) for r in rows])
    for cfg in (Stage1Config(min_keep=1), Stage1Config(selector="ratio", ratio=0.5, min_keep=1)):
        mask, k = select_patches(padded, cfg, counts=counts)
        for i, r in enumerate(rows):
            alone, ka = select_patches(r[None], cfg)
            assert int(k[i]) == int(ka[0])
            assert torch.equal(mask[i, : len(r)], alone[0]) and not mask[i, len(r) :].any()
    mask, k = select_patches(padded, Stage1Config(), keep=torch.tensor([3, 9, 1, 5]), counts=counts)
    assert k.tolist() == [3, 5, 1, 2]  # forced counts clamp to each row's candidates


def test_patch_scores_is_the_one_dispatch():
    cfg = CLIPVisionConfig(hidden_size=16, num_attention_heads=2, intermediate_size=32)
    torch.manual_seed(0)
    layer = CLIPEncoderLayer(cfg).eval()
    h, x = torch.randn(2, 1 + 6, 16), torch.randn(2, 1 + 6, 16)
    att = encoder_attention(x, layer, cls=True)
    expect = {
        "cosine": cls_cosine(h),
        "cosine_centered": cls_cosine(h, centered=True),
        "cosine_mean": mean_cosine(h[:, 1:]),
        "mean_distance": 1.0 - mean_cosine(h[:, 1:]),
        "random": random_scores(2, 6, 5),
    }
    with torch.no_grad():
        expect["cls_attn"] = cls_attention(x, layer)
        expect["attn_received"] = tower_attention_received(x, layer)
    for kind, want in expect.items():
        torch.testing.assert_close(patch_scores(kind, h, cls=True, attention=att, seed=5), want)
    with pytest.raises(ValueError, match="'cosine' compares patches with the CLS token"):
        patch_scores("cosine", h[:, 1:], cls=False)
    # ragged rows: padding is NaN, and random draws the valid entries in row-major order, as a packed batch
    valid = torch.tensor([[True] * 6, [True] * 2 + [False] * 4])
    r = patch_scores("random", h[:, 1:], cls=False, valid=valid, seed=5)
    assert torch.equal(r[valid], random_scores(1, 8, 5)[0]) and r[~valid].isnan().all()
    for kind in ("cosine_mean", "mean_distance"):
        assert patch_scores(kind, h[:, 1:], cls=False, valid=valid)[~valid].isnan().all()


def test_mean_distance_knee_keeps_the_unusual_patches_where_cosine_mean_keeps_all():
    # A scene as a CLS-less tower sees it: 40 background patches near one direction, 4 object patches
    # elsewhere. The mean is background, so cosine_mean ranks the objects last and its sorted curve has
    # no tail (every patch kept); mean_distance ranks them first and its knee keeps just them.
    g = torch.Generator().manual_seed(0)
    back = torch.tensor([1.0, 0.0, 0.0, 0.0]) + 0.05 * torch.randn(40, 4, generator=g)
    objects = torch.tensor([0.0, 1.0, 0.0, 0.0]) + 0.05 * torch.randn(4, 4, generator=g)
    h = torch.cat([back[:20], objects, back[20:]])[None]  # objects at 20..23
    cfg = Stage1Config(min_keep=1)
    mask, k = select_patches(patch_scores("cosine_mean", h, cls=False), cfg)
    assert int(k) == 44
    mask, k = select_patches(patch_scores("mean_distance", h, cls=False), cfg)
    assert int(k) == 4 and mask[0].nonzero().flatten().tolist() == [20, 21, 22, 23]


def _grid(rows: int, cols: int, views: int = 1) -> torch.Tensor:
    """(1, views * rows * cols, 3) (view, row, col) of row-major grids."""
    v, r, c = torch.meshgrid(torch.arange(views), torch.arange(rows), torch.arange(cols), indexing="ij")
    return torch.stack([v.flatten(), r.flatten(), c.flatten()], -1)[None]


def test_diversity_fills_the_knees_count_with_spread_patches():
    # one row of 6 patches: an object over 0-2 (scores 0.9-0.95), a weaker one at 5
    s = torch.tensor([[0.9, 0.95, 0.85, 0.1, 0.2, 0.5]])
    coords = _grid(1, 6)
    budget = dict(selector="budget", budget=3, min_keep=1)
    by_score, k = select_patches(s, Stage1Config(**budget), coords=coords)
    assert by_score[0].nonzero().flatten().tolist() == [0, 1, 2] and k.tolist() == [3]
    # grid, radius 1: after 1 (rel 1), its neighbours 0 and 2 lose 1: 5 (0.53), then 3 (0.11 > 4's 0.21 - 1)
    grid = Stage1Config(**budget, diversity=1.0, diversity_by="grid", diversity_radius=1)
    mask, k = select_patches(s, grid, coords=coords)
    assert mask[0].nonzero().flatten().tolist() == [1, 3, 5] and k.tolist() == [3]
    # a small weight keeps the score order: 0 (0.947 - 0.25) still beats 5 (0.526)
    mask, _ = select_patches(s, Stage1Config(**{**vars(grid), "diversity": 0.25}), coords=coords)
    assert mask[0].nonzero().flatten().tolist() == [0, 1, 2]
    # features: 0-2 alike (one object), 3-5 each their own
    f = torch.tensor(
        [[1.0, 0, 0, 0], [1, 0, 0, 0], [0.9, 0.1, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
    )
    mask, k = select_patches(s, Stage1Config(**budget, diversity=1.0), features=f[None])
    assert mask[0].nonzero().flatten().tolist() == [1, 4, 5] and k.tolist() == [3]


def test_diversity_keeps_counts_forced_counts_padding_and_pinned_tokens():
    torch.manual_seed(0)
    s = torch.rand(3, 12)
    f, coords = torch.randn(3, 12, 5), _grid(3, 4).expand(3, 12, 3)
    cfg = Stage1Config(min_keep=1, diversity=2.0, diversity_radius=1)
    _, k_plain = select_patches(s, Stage1Config(min_keep=1))
    mask, k = select_patches(s, cfg, features=f, coords=coords)
    assert torch.equal(k, k_plain) and mask.sum(1).tolist() == k.tolist()  # the knee's count, always
    mask, k = select_patches(s, cfg, keep=torch.tensor([2, 5, 12]), features=f, coords=coords)
    assert mask.sum(1).tolist() == [2, 5, 12] and k.tolist() == [2, 5, 12]
    # ragged rows: padding (-inf beyond counts) is never picked; each row equals the row alone
    counts = torch.tensor([12, 7, 3])
    mask, k = select_patches(s, cfg, keep=torch.tensor([4, 4, 4]), counts=counts, features=f, coords=coords)
    assert k.tolist() == [4, 4, 3] and not mask[1, 7:].any() and not mask[2, 3:].any()
    for i, c in enumerate(counts.tolist()):
        alone, _ = select_patches(s[i : i + 1, :c], cfg, torch.tensor([4]), features=f[i : i + 1, :c],
                                  coords=coords[i : i + 1, :c])  # fmt: skip
        assert torch.equal(mask[i, :c], alone[0])
    # a +inf score (a token that must stay: LLaVA's CLS feature with strategy "full") is taken first
    pinned = torch.cat([torch.full((3, 1), float("inf")), s], 1)
    pc = torch.cat([torch.full((3, 1, 3), -1), coords], 1)
    mask, _ = select_patches(
        pinned, cfg, keep=torch.tensor([1, 3, 5]), features=torch.randn(3, 13, 5), coords=pc
    )
    assert mask[:, 0].all() and mask.sum(1).tolist() == [1, 3, 5]


def test_diversity_needs_its_inputs_and_validates():
    s = torch.rand(1, 4)
    with pytest.raises(ValueError, match="features"):
        select_patches(s, Stage1Config(min_keep=1, diversity=1.0))
    with pytest.raises(ValueError, match="coordinates"):
        select_patches(
            s, Stage1Config(min_keep=1, diversity=1.0, diversity_radius=1), features=torch.rand(1, 4, 2)
        )
    for bad, match in (
        (dict(diversity=-1.0), "diversity = -1.0"),
        (dict(diversity_by="pixels"), "diversity_by"),
        (dict(diversity=1.0, diversity_by="grid"), "needs diversity_radius"),
        (dict(diversity_radius=-2), "diversity_radius"),
    ):
        with pytest.raises(ValueError, match=match):
            Stage1Config(**bad).validate()


def test_context_merge_summarises_the_dropped_patches_in_the_same_count():
    s = torch.tensor([[0.9, 0.8, 0.1, 0.2, 0.3, 0.05, 0.7, 0.6]])
    keep = s > 0.55  # 0, 1, 6, 7
    f = torch.tensor([[1.0, 0], [1, 0], [0, 1], [0, 1], [0.1, 1], [1, 0.1], [1, 0], [0.9, 0.1]])[None]
    mask, into = context_merge(keep, s, f, 2)
    # 7 and 6 (the lowest kept) are released; seeds at raster ranks 1 and 4 of the dropped 2-7: 3 and 6;
    # 2 and 4 look like 3, 5 and 7 like 6
    assert mask[0].nonzero().flatten().tolist() == [0, 1, 3, 6] and int(mask.sum()) == int(keep.sum())
    assert into[0].tolist() == [0, 1, 3, 3, 3, 6, 6, 6]
    merged = merge_into(f, into)
    torch.testing.assert_close(merged[0, 3], f[0, [2, 3, 4]].mean(0))
    torch.testing.assert_close(merged[0, 6], f[0, [5, 6, 7]].mean(0))
    assert torch.equal(merged[0, [0, 1]], f[0, [0, 1]])  # slots that carry only themselves: bit for bit
    # keep-all, or one kept patch, changes nothing; padding (-inf / NaN) is never a seed nor merged
    every = torch.ones_like(keep)
    m, into = context_merge(every, s, f, 2)
    assert (
        torch.equal(m, every) and into[0].tolist() == list(range(8)) and torch.equal(merge_into(f, into), f)
    )
    one = torch.zeros_like(keep)
    one[0, 0] = True
    assert torch.equal(context_merge(one, s, f, 2)[0], one)
    padded = s.clone()
    padded[0, 5:] = float("-inf")
    padded[0, 4] = float("nan")
    m, into = context_merge(keep & (padded > 0), padded, f, 1)  # kept 0, 1: release 1; dropped 1, 2, 3
    assert m[0].nonzero().flatten().tolist() == [0, 2] and into[0].tolist() == [0, 2, 2, 2, -1, -1, -1, -1]


def test_context_tokens_through_select_patches_counts_and_validation():
    torch.manual_seed(2)
    s, f = torch.rand(3, 16), torch.randn(3, 16, 4)
    mask, k = select_patches(s, Stage1Config(min_keep=2))
    merged_mask, into = context_merge(mask, s, f, 3)
    assert merged_mask.sum(1).tolist() == k.tolist()
    assert ((into >= 0) == torch.ones_like(mask)).all()  # every patch is carried by some kept slot
    assert merged_mask.gather(1, into).all()
    with pytest.raises(ValueError, match="context_tokens = -1"):
        Stage1Config(context_tokens=-1).validate()


def test_grid_diversity_counts_every_taken_neighbour():
    # one row of 6: after 0, 2 and 4 every free patch has a taken neighbour; 5 has one, 1 and 3 two each
    s = torch.tensor([[1.0, 0.95, 0.9, 0.85, 0.1, 0.05]])
    cfg = Stage1Config(
        selector="budget", budget=4, min_keep=1, diversity=3.0, diversity_by="grid", diversity_radius=1
    )
    mask, _ = select_patches(s, cfg, coords=_grid(1, 6))
    assert mask[0].nonzero().flatten().tolist() == [0, 2, 4, 5]
    # the largest redundancy alone (stage 2's rule) would take 1 back, the best-scored of the three
    sim = redundancy(None, _grid(1, 6), radius=1)
    assert sorted(diverse_order(s, torch.ones_like(s, dtype=torch.bool), sim, 4, 3.0)[0].tolist()) == [
        0,
        1,
        2,
        4,
    ]
