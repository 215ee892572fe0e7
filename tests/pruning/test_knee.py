import numpy as np
import pytest
import torch

from tpkit.pruning import curvature, head_count, iqr_count, kneedle


def _step(n_high=5, n=20):
    return torch.cat([torch.ones(n_high), torch.zeros(n - n_high)])[None]


@pytest.mark.parametrize("detector", [kneedle, curvature])
def test_step_curve_cuts_at_the_step(detector):
    for n_high in (1, 3, 5, 12):
        assert detector(_step(n_high)).tolist() == [n_high]


def test_long_tail_knee_is_near_the_head():
    x = torch.arange(100, dtype=torch.float)
    curve = torch.exp(-x / 5.0)[None]  # long tail
    k = int(kneedle(curve)[0])
    assert 3 <= k <= 20
    assert int(curvature(curve)[0]) <= k


@pytest.mark.parametrize("detector", [kneedle, curvature])
def test_no_tail_returns_all_and_hits_the_clamps(detector):
    linear = torch.linspace(1.0, 0.0, 50)[None]
    concave = (1 - torch.linspace(0, 1, 50) ** 2)[None]
    for curve in (linear, concave):
        assert detector(curve).tolist() == [50]
    sel = detector.__name__
    assert head_count(linear, sel, min_keep=4, max_keep=10).tolist() == [10]
    assert head_count(linear, sel, min_keep=4).tolist() == [50]
    assert head_count(_step(1), sel, min_keep=4, max_keep=10).tolist() == [4]


@pytest.mark.parametrize("selector", ["kneedle", "curvature", "iqr", "ratio", "budget"])
def test_constant_scores_are_finite_and_clamped(selector):
    flat = torch.full((3, 40), 0.7)
    k = head_count(flat, selector, ratio=0.25, budget=8, min_keep=4, max_keep=30)
    assert k.dtype == torch.long
    assert ((k >= 4) & (k <= 30)).all()
    zeros = torch.zeros(1, 40)
    assert head_count(zeros, selector, ratio=0.25, budget=8, min_keep=2).item() >= 2


def test_iqr_matches_its_definition():
    g = torch.Generator().manual_seed(0)
    scores = torch.cat([torch.rand(2, 90, generator=g), 3 + torch.rand(2, 10, generator=g)], dim=1)
    scores[1, :4] = 10.0
    for i in range(2):
        s = scores[i].numpy()
        q1, q3 = np.percentile(s, 25), np.percentile(s, 75)
        expect = int((s > q3 + 1.5 * (q3 - q1)).sum())
        assert iqr_count(scores)[i].item() == expect
    assert iqr_count(torch.full((1, 10), 2.0)).tolist() == [0]


def test_ratio_budget_and_batch():
    s = torch.linspace(1, 0, 16).expand(3, 16)
    assert head_count(s, "ratio", ratio=0.25, min_keep=1).tolist() == [4, 4, 4]
    assert head_count(s, "budget", budget=6, min_keep=1).tolist() == [6, 6, 6]
    assert head_count(s, "budget", budget=99, min_keep=1).tolist() == [16, 16, 16]
    batched = torch.cat([_step(3), _step(7), _step(11)])
    assert kneedle(batched).tolist() == [3, 7, 11]
