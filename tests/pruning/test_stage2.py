import pytest
import torch

from tpkit.pruning import Stage2Config, relevance, select_tokens
from tpkit.pruning.stage2 import diverse_order, redundancy


def test_relevance_equals_masked_softmax_reference():
    torch.manual_seed(0)
    b, h, hk, t, d = 2, 4, 2, 7, 8
    q_all = torch.randn(b, h, t, d)
    k = torch.randn(b, hk, t, d)
    key_valid = torch.ones(b, t, dtype=torch.bool)
    key_valid[1, :2] = False  # left padding
    qpos = torch.tensor([[4, 5, 6], [5, 6, 6]])
    qvalid = torch.tensor([[True, True, True], [True, True, False]])
    q = q_all.gather(2, qpos[:, None, :, None].expand(b, h, 3, d))
    ours = relevance(q, k, qpos, qvalid, key_valid, scaling=d**-0.5)
    # reference: full T x T causal attention with padding, rows of the queries, averaged
    kx = k.repeat_interleave(h // hk, dim=1)
    logits = q_all @ kx.transpose(-1, -2) * d**-0.5
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    allowed = causal[None, None] & key_valid[:, None, None, :]
    w = logits.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0).mean(1)  # (B, T, T)
    ref0 = w[0, [4, 5, 6]].mean(0)
    ref1 = w[1, [5, 6]].mean(0)
    torch.testing.assert_close(ours[0], ref0)
    torch.testing.assert_close(ours[1], ref1)
    assert ours[1, :2].abs().max() == 0  # padding gets nothing
    torch.testing.assert_close(ours.sum(1), torch.ones(b))
    # reduce="max": the most any valid query pays (the invalid third query of sample 1 adds nothing)
    mx = relevance(q, k, qpos, qvalid, key_valid, scaling=d**-0.5, reduce="max")
    torch.testing.assert_close(mx[0], w[0, [4, 5, 6]].amax(0))
    torch.testing.assert_close(mx[1], w[1, [5, 6]].amax(0))
    assert (mx >= ours - 1e-7).all()
    with pytest.raises(ValueError, match="reduce"):
        relevance(q, k, qpos, qvalid, key_valid, scaling=d**-0.5, reduce="median")


def test_max_reduce_keeps_what_one_query_wants_and_the_mean_dilutes():
    """Queries A and B each want their own object (keys 0 and 1), and every query pays a little to
    key 2. The mean ranks key 2 first, so a cut at two droppable keys loses one object; max keeps
    both. With one-hot keys, logits = log of the attention rows wanted (scaling 1)."""
    t = 6
    k = torch.eye(t)[None, None]  # (1, 1, T, T): key j = e_j
    rows = {  # query position -> attention over the keys it sees (0..pos)
        3: [0.6, 0.05, 0.3, 0.05],
        4: [0.04, 0.6, 0.3, 0.035, 0.025],
        5: [0.025, 0.025, 0.3, 0.025, 0.025, 0.6],
    }
    q = torch.full((1, 1, 3, t), -30.0)
    for i, p in enumerate(rows.values()):
        q[0, 0, i, : len(p)] = torch.tensor(p).log()
    qpos = torch.tensor([list(rows)])
    qvalid = torch.ones(1, 3, dtype=torch.bool)
    kv = torch.ones(1, t, dtype=torch.bool)
    mean = relevance(q, k, qpos, qvalid, kv, scaling=1.0)[0]
    mx = relevance(q, k, qpos, qvalid, kv, scaling=1.0, reduce="max")[0]
    torch.testing.assert_close(mean[:3], torch.tensor([0.665 / 3, 0.225, 0.3]), atol=1e-5, rtol=0)
    torch.testing.assert_close(mx[:3], torch.tensor([0.6, 0.6, 0.3]), atol=1e-5, rtol=0)
    droppable = torch.tensor([[True, True, True, False, False, False]])
    cfg = Stage2Config(selector="budget", budget=2)
    kept_mean = select_tokens(mean[None], droppable, ~droppable, cfg)[0, :3].tolist()
    kept_max = select_tokens(mx[None], droppable, ~droppable, cfg)[0, :3].tolist()
    assert kept_mean == [False, True, True]  # object A lost
    assert kept_max == [True, True, False]  # both objects


def test_select_tokens_protected_and_overrides():
    scores = torch.tensor([[0.5, 0.1, 0.9, 0.2, 0.8, 0.3], [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]])
    always = torch.tensor([[1, 0, 0, 0, 0, 1], [1, 0, 0, 0, 0, 1]], dtype=torch.bool)
    droppable = ~always
    keep = select_tokens(scores, droppable, always, Stage2Config(selector="budget", budget=2))
    assert keep[0].nonzero().flatten().tolist() == [0, 2, 4, 5]
    assert keep[1].nonzero().flatten().tolist() == [0, 3, 4, 5]
    keep = select_tokens(scores, droppable, always, Stage2Config(selector="ratio", ratio=0.5))
    assert keep.sum(1).tolist() == [4, 4]
    keep = select_tokens(scores, droppable, always, Stage2Config(), keep_total=torch.tensor([3, 99]))
    assert keep[0].nonzero().flatten().tolist() == [0, 2, 5]
    assert keep[1].all()
    keep = select_tokens(scores, droppable, always, Stage2Config(), keep_total=torch.tensor([0, 1]))
    assert torch.equal(keep, always)
    # max_keep caps every selector's droppable count (the highest-scoring ones stay), not forced totals
    for sel in ("kneedle", "curvature", "ratio"):
        cfg = Stage2Config(selector=sel, ratio=1.0, min_keep=1, max_keep=1)
        keep = select_tokens(scores, droppable, always, cfg)
        assert keep[0].nonzero().flatten().tolist() == [0, 2, 5], sel
        assert keep[1].nonzero().flatten().tolist() == [0, 4, 5], sel
    keep = select_tokens(scores, droppable, always, Stage2Config(max_keep=1), keep_total=torch.tensor([4, 4]))
    assert keep.sum(1).tolist() == [4, 4]


def _select_tokens_loop(scores, droppable, always, cfg, keep_total=None):
    """The previous per-sample implementation (host syncs per row), kept as the reference."""
    from tpkit.pruning.knee import head_count

    keep = always.clone()
    for i in range(scores.shape[0]):
        cand = droppable[i].nonzero().squeeze(1)
        n = cand.numel()
        if n == 0:
            continue
        s, order = torch.sort(scores[i, cand].float(), descending=True, stable=True)
        if keep_total is not None:
            k = max(0, min(int(keep_total[i]) - int(always[i].sum()), n))
        else:
            k = int(
                head_count(s[None], cfg.selector, ratio=cfg.ratio, budget=cfg.budget, min_keep=cfg.min_keep)[
                    0
                ]
            )
        keep[i, cand[order[:k]]] = True
    return keep


def test_select_tokens_vectorised_equals_per_sample_loop():
    g = torch.Generator().manual_seed(0)
    cfgs = [
        Stage2Config(selector="kneedle"),
        Stage2Config(selector="kneedle", min_keep=5),
        Stage2Config(selector="curvature"),
        Stage2Config(selector="ratio", ratio=0.3),
        Stage2Config(selector="ratio", ratio=0.5, min_keep=4),
        Stage2Config(selector="budget", budget=7),
        Stage2Config(selector="budget", budget=0, min_keep=0),
    ]
    n_checked = 0
    for trial in range(40):
        b, t = 6, int(torch.randint(1, 300, (1,), generator=g))
        u = torch.rand(b, t, generator=g)
        p_drop = float(torch.rand(1, generator=g))
        droppable = u < p_drop
        always = (u >= p_drop) & (torch.rand(b, t, generator=g) < 0.5)
        droppable[0] = False  # a row without candidates
        if t > 2:
            droppable[1, : t // 2] = True  # a large ragged row
        always &= ~droppable
        kind = trial % 3
        if kind == 0:
            scores = torch.rand(b, t, generator=g)
        elif kind == 1:  # ties, a step curve and a long tail
            scores = torch.randint(0, 4, (b, t), generator=g).float()
        else:
            scores = torch.rand(b, t, generator=g) ** 8
        if trial % 5 == 0:
            scores = scores.double()
        for cfg in cfgs:
            ours = select_tokens(scores, droppable, always, cfg)
            ref = _select_tokens_loop(scores, droppable, always, cfg)
            assert torch.equal(ours, ref), (trial, cfg)
            n_checked += 1
        keep_total = torch.randint(-2, t + 5, (b,), generator=g)
        ours = select_tokens(scores, droppable, always, Stage2Config(), keep_total=keep_total)
        assert torch.equal(ours, _select_tokens_loop(scores, droppable, always, Stage2Config(), keep_total))
    assert n_checked == 40 * len(cfgs)


def test_redundancy_is_clamped_cosine_and_radius_keeps_only_near_patches():
    f = torch.tensor([[[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [1.0, 0.0]]])
    sim = redundancy(f)
    assert sim.shape == (1, 5, 5)
    assert sim[0, 0, 1] == pytest.approx(1.0) and sim[0, 0, 2] == pytest.approx(0.0)
    assert sim[0, 0, 3] == 0.0  # opposite: clamped, not negative
    # a 3 x 3 grid: cells (0, 0) and (0, 1) touch, (0, 0) and (2, 2) do not; token 4 is text (view -1)
    coords = torch.tensor([[[0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 2, 2], [-1, 0, 0]]])
    near = redundancy(f, coords, radius=1)
    assert near[0, 0, 1] == pytest.approx(1.0)  # alike and adjacent
    assert near[0, 0, 3] == 0.0 and near[0, 0, 4] == 0.0  # far / text: never redundant
    far = redundancy(torch.ones(1, 5, 2), coords, radius=2)  # all alike
    assert far[0, 0, 3] == pytest.approx(1.0) and far[0, 1, 3] == pytest.approx(1.0) and far[0, 4, 0] == 0.0
    other_view = coords.clone()
    other_view[0, 1, 0] = 1  # the same cell of another view (a crop, a frame): not a neighbour
    assert redundancy(torch.ones(1, 5, 2), other_view, radius=1)[0, 0, 1] == 0.0
    with pytest.raises(ValueError, match="radius"):
        redundancy(f, None, radius=1)


def _diverse_loop(scores, cand, sim, steps, weight):
    out = []
    for i in range(scores.shape[0]):
        c = cand[i].nonzero().flatten().tolist()
        rel = {j: float(scores[i, j]) / max(float(scores[i, c].max()), 1e-12) for j in c} if c else {}
        worst = dict.fromkeys(c, 0.0)
        picks = []
        for _ in range(min(steps, len(c))):
            j = max((j for j in c if j not in picks), key=lambda j: (rel[j] - weight * worst[j], -j))
            picks.append(j)
            for u in c:
                worst[u] = max(worst[u], float(sim[i, j, u]))
        out.append(picks)
    return out


def test_diverse_order_equals_per_sample_greedy():
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        b, t = 4, int(torch.randint(1, 40, (1,), generator=g))
        scores = torch.rand(b, t, generator=g)
        cand = torch.rand(b, t, generator=g) < 0.7
        cand[0] = False  # no candidates
        sim = redundancy(torch.randn(b, t, 3, generator=g))
        steps = int(cand.sum(1).max())
        w = [0.0, 0.5, 2.0][trial % 3]
        picks = diverse_order(scores, cand, sim, steps, w)
        for i, ref in enumerate(_diverse_loop(scores, cand, sim, steps, w)):
            assert picks[i, : len(ref)].tolist() == ref, (trial, i)
        if w == 0.0:  # no penalty: plain descending score order among the candidates
            for i in range(b):
                c = cand[i].nonzero().flatten()
                ref = c[torch.sort(scores[i, c], descending=True, stable=True).indices]
                assert picks[i, : len(c)].tolist() == ref.tolist()


def test_diversity_swaps_a_duplicate_patch_for_another_object():
    # tokens: 0 text (protected), 1-2 text (droppable), 3-8 patches; 3 and 4 are two views of one
    # object (same features), 5 is another object; the budget keeps 1 text + 2 patches either way
    scores = torch.tensor([[1.0, 0.60, 0.05, 0.9, 0.85, 0.5, 0.1, 0.1, 0.1]])
    always = torch.zeros(1, 9, dtype=torch.bool)
    always[0, 0] = True
    droppable = ~always
    patches = torch.zeros(1, 9, dtype=torch.bool)
    patches[0, 3:] = True
    feats = torch.tensor(
        [
            [[0, 0, 1.0], [0, 1.0, 0], [0, 1.0, 0], [1.0, 0, 0], [1.0, 0, 0], [0.3, 0.954, 0]]
            + [[0.0, 0.0, 1.0]] * 3
        ]
    )
    sim = redundancy(feats)
    plain = select_tokens(scores, droppable, always, Stage2Config(selector="budget", budget=3))
    assert plain[0].nonzero().flatten().tolist() == [0, 1, 3, 4]
    cfg = Stage2Config(selector="budget", budget=3, diversity=1.0)
    keep = select_tokens(scores, droppable, always, cfg, sim=sim, diverse=patches)
    assert keep[0].nonzero().flatten().tolist() == [0, 1, 3, 5]  # same text, same patch count
    # without sim (or diversity 0) nothing changes; forced totals keep their counts
    assert torch.equal(select_tokens(scores, droppable, always, cfg), plain)
    forced = select_tokens(
        scores, droppable, always, cfg, keep_total=torch.tensor([3]), sim=sim, diverse=patches
    )
    assert forced[0].nonzero().flatten().tolist() == [0, 3, 5]
    with pytest.raises(ValueError, match="diversity"):
        Stage2Config(diversity=-1.0).validate()
    with pytest.raises(ValueError, match="diversity_radius"):
        Stage2Config(diversity_radius=-1).validate()
