import torch

from tpkit.data.labels import next_token_targets


def test_next_token_targets_follow_kept_index():
    # original row: 6 tokens, answer tokens at 4, 5 (labels unshifted)
    labels = torch.tensor([[-100, -100, -100, -100, 40, 50]])
    # no pruning: position t predicts labels[t + 1]
    assert next_token_targets(labels).tolist() == [[-100, -100, -100, 40, 50, -100]]
    # pruned: kept original positions 0, 3, 4, 5 (+ one pad at the left, -1)
    kept = torch.tensor([[-1, 0, 3, 4, 5]])
    assert next_token_targets(labels, kept).tolist() == [[-100, -100, 40, 50, -100]]
