import json

import numpy as np
import pytest
import torch

from tpkit.cli import main
from tpkit.pruning import Stage1Config
from tpkit.synthetic.premise import auroc, chroma_scores, format_report, premise_stats, run_premise
from tpkit.synthetic.splits import generate_split


def test_auroc_hand_made():
    assert auroc([0.9, 0.8, 0.1, 0.2], [1, 1, 0, 0]) == 1.0
    assert auroc([0.1, 0.2, 0.9, 0.8], [1, 1, 0, 0]) == 0.0
    # positives 0.9, 0.3; negatives 0.5, 0.1: pairs (0.9>0.5, 0.9>0.1, 0.3<0.5, 0.3>0.1) -> 3/4
    assert auroc([0.9, 0.3, 0.5, 0.1], [1, 1, 0, 0]) == 0.75
    # a tie between a positive and a negative counts half: (1 + 0.5) / 2
    assert auroc([0.7, 0.5, 0.5], [1, 1, 0]) == 0.75
    assert auroc(np.ones(6), [1, 0, 1, 0, 1, 0]) == 0.5
    assert np.isnan(auroc([0.1, 0.2], [0, 0]))


def test_chroma_scores_hand_made():
    img = np.full((1, 16, 16, 3), 100, dtype=np.uint8)
    img[0, 3, 12] = (250, 20, 30)  # one saturated pixel in patch (0, 1)
    img[0, 8:16, 0:8] = (100, 130, 160)  # a dull tint in patch (1, 0)
    assert chroma_scores(img, 8).tolist() == [[0.0, 230.0, 60.0, 0.0]]
    with pytest.raises(ValueError, match="must divide"):
        chroma_scores(img, 5)


def test_premise_stats_on_a_step():
    # 2 images x 8 patches: objects are exactly the top scores -> recall 1, AUROC 1
    scores = np.array([[9, 8, 1, 1.1, 0.9, 1.2, 1, 1.05], [1, 1.1, 7, 8, 9, 1, 0.9, 1.2]], dtype=np.float32)
    cov = np.zeros((2, 8))
    cov[0, :2] = 1.0
    cov[1, 2:5] = [0.5, 0.3, 1.0]
    cov[1, 0] = 0.1  # a sliver: not an object patch, but touched
    st = premise_stats(scores, cov, Stage1Config(min_keep=1))
    assert st["k"] == [2, 3]
    assert st["kept_mean"] == pytest.approx(5 / 16)
    assert st["recall_covered"] == 1.0 and st["recall_touched"] == pytest.approx(5 / 6)
    assert st["auroc_per_image"] == 1.0 and st["auroc_pooled"] == 1.0
    assert st["curve_deciles"][0] == 1.0 and st["curve_deciles"][-1] == 0.0
    forced = premise_stats(scores, cov, Stage1Config(min_keep=1), keep_counts=np.array([1, 1]))
    assert forced["k"] == [1, 1] and forced["recall_covered"] == pytest.approx(2 / 5)


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    from tpkit.models.llava.tiny import build_tiny_llava

    root = tmp_path_factory.mktemp("premise")
    generate_split(root / "data", "test", n=10, seed=0)
    model = build_tiny_llava(seed=0, image_size=96, patch_size=8)
    model.save_pretrained(root / "model")
    return root


def test_report_is_deterministic_on_a_tiny_random_model(tiny_setup):
    root = tiny_setup
    a = run_premise(root / "data", root / "model", n=10, out_dir=root / "a", batch_size=4)
    b = run_premise(root / "data" / "test.json", root / "model", n=10, batch_size=10)
    assert json.loads((root / "a" / "premise.json").read_text())["model_score"] == b["model_score"]
    m = a["model_score"]
    assert m["n_images"] == 10 and m["n_patches"] == 144 and len(m["k"]) == 10
    assert all(4 <= k <= 144 for k in m["k"])
    assert 0.0 <= m["auroc_per_image"] <= 1.0 and 0.0 <= m["recall_covered"] <= 1.0
    assert a["pixel_control_matched"]["k"] == m["k"]
    assert set(a["checks"]) >= {"kept_mean<=0.30", "beats_pixel_auroc"}
    for f in ("premise.json", "curves.png", "curves_pixel.png"):
        assert (root / "a" / f).stat().st_size > 0
    assert "model (cosine)" in format_report(a)
    # other scores of the pruner run through the same path
    attn = run_premise(root / "data", root / "model", n=4, cfg=Stage1Config(score="cls_attn"))
    assert attn["model_score"]["n_images"] == 4


def test_tower_scores_match_the_pruner(tiny_setup):
    """The report scores exactly the patches the pruner keeps (same hidden layer, same selection)."""
    from transformers import LlavaForConditionalGeneration

    from tpkit.models import attach_pruner, last_stats
    from tpkit.pruning import PruningConfig, Stage2Config, select_patches
    from tpkit.synthetic.premise import tower_scores

    model = LlavaForConditionalGeneration.from_pretrained(tiny_setup / "model").eval()
    px = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    cfg = Stage1Config()
    keep, _ = select_patches(tower_scores(model, px, cfg), cfg)
    attach_pruner(model, PruningConfig(stage1=cfg, stage2=Stage2Config(enabled=False)))
    n = model.config.vision_config.image_size // model.config.vision_config.patch_size
    ids = torch.tensor([[1] + [model.config.image_token_id] * n * n + [5, 6]] * 2)
    with torch.no_grad():
        model(input_ids=ids, pixel_values=px, attention_mask=torch.ones_like(ids))
    for b, kept in enumerate(last_stats(model)["visual_keep"]):
        assert kept.tolist() == torch.nonzero(keep[b]).flatten().tolist()


def test_pixel_only_cli(tmp_path, capsys):
    generate_split(tmp_path / "data", "test", n=6, seed=1)
    assert (
        main(["premise", "--data", str(tmp_path / "data"), "--n", "6", "--out", str(tmp_path / "out")]) == 0
    )
    out = capsys.readouterr().out
    assert "pixel (max chroma)" in out
    rep = json.loads((tmp_path / "out" / "premise.json").read_text())
    assert rep["n"] == 6 and "model_score" not in rep
    assert main(["premise", "--data", str(tmp_path / "missing"), "--n", "6"]) == 2
    assert "tpkit data synthetic" in capsys.readouterr().err
