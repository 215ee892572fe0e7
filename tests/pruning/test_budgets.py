"""Budget arithmetic (token-layer fractions and the counts that match them) and the FLOPs formula."""

from __future__ import annotations

import torch

from tpkit.evaluation.speed import layer_flops, prefill_flops
from tpkit.pruning.budgets import (
    fixed_budget_counts,
    scale_stage1_keep,
    solve_stage2_keep,
    token_layer_fraction,
)


def test_token_layer_fraction_and_inverse():
    n_dense = torch.tensor([640, 100])
    n1 = torch.tensor([211, 40])
    k2 = torch.tensor([136, 20])
    f = token_layer_fraction(n_dense, n1, k2, num_layers=32, layer=2)
    assert torch.allclose(
        f, torch.tensor([(2 * 211 + 30 * 136) / (32 * 640), (2 * 40 + 30 * 20) / 3200]).double()
    )
    # solving back gives the same counts
    assert solve_stage2_keep(f, n_dense, n1, 32, 2).tolist() == [136, 20]
    assert token_layer_fraction(n_dense, n1, None, 32, 2).tolist() == [211 / 640, 0.4]


def test_solve_stage2_keep_clamps():
    n_dense, n1 = torch.tensor([100]), torch.tensor([50])
    assert solve_stage2_keep(0.9, n_dense, n1, 4, 2).tolist() == [50]  # cannot keep more than n1
    assert solve_stage2_keep(0.01, n_dense, n1, 4, 2).tolist() == [1]  # at least min_keep


def test_scale_stage1_keep_hits_mean_target_and_keeps_ranking():
    k1 = torch.tensor([10, 20, 40])
    n_text = torch.tensor([10, 10, 10])
    n_vis = torch.tensor([100, 100, 100])
    k = scale_stage1_keep(k1, n_text, n_vis, target_fraction=0.4)
    frac = ((n_text + k) / (n_text + n_vis)).mean()
    assert abs(float(frac) - 0.4) <= 1 / 110
    assert k[0] < k[1] < k[2]


def test_fixed_budget_counts_llava15():
    k1, k2 = fixed_budget_counts(64, 576, 32, 2, 0.22, 1.5)
    assert (k1, k2) == (147, 136)
    frac = (2 * (64 + k1) + 30 * k2) / (32 * 640)
    assert abs(frac - 0.22) < 1 / 640


def test_flops_formula():
    d, m = 8, 16
    assert float(layer_flops(10, d, m)) == 4 * 10 * 64 + 2 * 100 * 8 + 2 * 10 * 8 * 16
    dense = prefill_flops(torch.tensor([10]), None, 4, 0, d, m)
    pruned = prefill_flops(torch.tensor([10]), torch.tensor([5]), 4, 1, d, m)
    assert float(dense[0]) == 4 * float(layer_flops(10, d, m))
    assert float(pruned[0]) == float(layer_flops(10, d, m)) + 3 * float(layer_flops(5, d, m))
