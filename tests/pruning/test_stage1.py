import torch
import torch.nn.functional as F
from transformers import CLIPVisionConfig
from transformers.models.clip.modeling_clip import CLIPEncoderLayer

from tpkit.pruning import Stage1Config, cls_attention, cls_cosine, random_scores, select_patches


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
