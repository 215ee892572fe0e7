import torch

from tpkit.pruning import Stage2Config, relevance, select_tokens


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
