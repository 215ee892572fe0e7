"""The premise report on Qwen's tower: square views packed as Qwen's own image processor packs them,
scored per merged unit by the pruner's code, and the report over a saved tiny checkpoint."""

import numpy as np
import pytest
import torch
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from tpkit.models import stage1_scores
from tpkit.models.qwen2_vl.tower import pack_views
from tpkit.models.registry import family_of
from tpkit.pruning import Stage1Config


def test_views_are_packed_as_qwens_image_processor_packs_them(qwen_factory):
    model = qwen_factory("qwen2.5-vl", seed=0)
    vc = model.config.vision_config
    stock = Qwen2VLImageProcessorPil(
        patch_size=vc.patch_size,
        merge_size=vc.spatial_merge_size,
        temporal_patch_size=vc.temporal_patch_size,
        do_resize=False,
        do_rescale=False,
        do_normalize=False,
    )
    views = torch.randn(2, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    ref = stock(images=list(views.numpy()), return_tensors="pt")
    pixels, grid = pack_views(views, vc)
    assert torch.equal(grid, ref["image_grid_thw"])
    assert torch.equal(pixels, ref["pixel_values"])
    with pytest.raises(ValueError, match="multiple of patch_size x spatial_merge_size = 4"):
        pack_views(views[..., :22, :22], vc)

    family = family_of(model)
    for score in ("cosine_mean", "mean_distance", "attn_received"):
        cfg = Stage1Config(score=score)
        units = family.view_scores(model, views, cfg)  # (2, 36): a 6 x 6 unit grid per view
        per_image = stage1_scores(model, ref["pixel_values"], cfg, image_grid_thw=ref["image_grid_thw"])
        assert units.shape == (2, 36)
        torch.testing.assert_close(units, torch.stack([s.flatten() for s in per_image]), rtol=0, atol=0)
    assert family.premise_view(model, 96) == (96, 4) and family.premise_view(model, 97) == (96, 4)
    assert family.premise_view(model, 1) == (4, 4)


@pytest.mark.parametrize("variant", ["qwen2-vl", "qwen2.5-vl"])
def test_premise_report_runs_on_qwens_tower(qwen_factory, variant, tmp_path):
    from tpkit.synthetic.premise import format_report, run_premise
    from tpkit.synthetic.splits import generate_split

    data = generate_split(str(tmp_path / "data"), split="test", n=4, seed=2)  # 96 x 96 images
    qwen_factory(variant, seed=0).save_pretrained(tmp_path / "m")
    report = run_premise(data, tmp_path / "m", n=4, batch_size=2, cfg=Stage1Config(score="attn_received"))
    m = report["model_score"]
    assert m["n_images"] == 4 and m["n_patches"] == 24 * 24 and len(m["k"]) == 4  # 4-pixel merged units
    assert report["pixel_control"]["n_patches"] == 24 * 24 and np.isfinite(m["auroc_pooled"])
    assert "model (attn_received)" in format_report(report)
    assert run_premise(data, tmp_path / "m", n=2, batch_size=2)["stage1"]["score"] == "mean_distance"
