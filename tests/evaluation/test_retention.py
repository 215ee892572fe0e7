import itertools
import random

import pytest
import torch

from tpkit.evaluation.retention import named_cells, object_cells, p_all_hit, patch_coverage, retention
from tpkit.synthetic.questions import make_record, named_objects


def _brute(objects, pool, k):
    pool = sorted(pool)
    subsets = list(itertools.combinations(pool, k))
    return sum(all(set(s) & o for o in objects) for s in subsets) / len(subsets)


@pytest.mark.parametrize("seed", range(6))
def test_p_all_hit_matches_enumeration(seed):
    rng = random.Random(seed)
    pool = frozenset(rng.sample(range(12), rng.randint(3, 9)))
    objects = [frozenset(rng.sample(range(12), rng.randint(1, 3))) for _ in range(rng.randint(1, 3))]
    for k in range(len(pool) + 1):
        assert p_all_hit(objects, pool, k) == pytest.approx(_brute(objects, pool, k), abs=1e-12)


def test_retention_by_hand():
    cells = [[frozenset({0, 1}), frozenset({5})], [frozenset({2}), frozenset({3})], None]
    kept = [torch.tensor([0, 5]), torch.tensor([2]), torch.tensor([1])]
    r = retention(cells, kept, 6, ["position", "color", "exist"])
    assert r["n"] == 2  # the third sample names nothing
    assert r["all_kept"] == 0.5 and r["object_recall"] == 0.75 and r["kept_patches"] == 1.5
    # 2 of 6 patches hit {0,1} and {5}: 2 pairs of 15; 1 patch cannot hit two objects
    assert r["random_all_kept"] == pytest.approx((2 / 15 + 0) / 2)
    assert r["by_qtype"]["position"]["all_kept"] == 1.0 and r["by_qtype"]["color"]["all_kept"] == 0.0
    # stage 2: the pool is each sample's stage-1 set; unpruned samples (None) are not counted
    s2 = retention(cells, [torch.tensor([5]), None, None], [torch.tensor([0, 5]), None, None])
    assert s2["n"] == 1 and s2["all_kept"] == 0.0 and s2["random_all_kept"] == 0.0
    assert retention([None], [torch.tensor([0])], 4) is None


def test_object_cells():
    # 96-pixel image, patch 8: a box covering patch (row 1, col 2) fully and a sliver of its neighbour
    assert object_cells([16, 8, 25, 16], 96, 8) == {1 * 12 + 2}
    # too small to cover any patch by 25%: its most covered patch
    assert object_cells([17, 9, 19, 11], 96, 8) == {1 * 12 + 2}
    # the tower sees the image at another size: boxes are scaled
    assert object_cells([48, 48, 96, 96], 32, 8, scale=32 / 96) == {10, 11, 14, 15}


def test_named_cells_skip_what_does_not_apply():
    recs = [make_record(i, "test", 0)[0] for i in range(8)]
    cells = named_cells(recs + [{"conversations": []}], 96, 8)
    assert cells[-1] is None
    for r, c in zip(recs, cells):
        objs = named_objects(r)
        assert (c is None) == (not objs)
        if c is not None:
            assert len(c) == len(objs) and all(x <= set(range(144)) for x in c)


def test_runner_skips_data_without_object_boxes(tiny_llava):
    """Real LLaVA-JSON data (no ``objects``) gets no retention numbers, and no error."""
    import datasets

    from tpkit.evaluation.retention import dataset_cells

    ds = datasets.Dataset.from_list(
        [{"id": "a", "conversations": [{"from": "human", "value": "<image>\nWhat is this?"}]}]
    )
    vc = tiny_llava.config.vision_config
    assert dataset_cells(ds, tiny_llava.config.vision_config) == (None, (vc.image_size // vc.patch_size) ** 2)


def test_patch_coverage_hand_made():
    cov = patch_coverage([[0, 0, 8, 8]], 16, 8)
    assert cov.tolist() == [1.0, 0.0, 0.0, 0.0]
    cov = patch_coverage([[4, 4, 12, 12]], 16, 8)
    assert cov.tolist() == [0.25, 0.25, 0.25, 0.25]
    # overlapping boxes count once; row-major patch order
    cov = patch_coverage([[8, 0, 16, 4], [8, 0, 16, 2], [0, 8, 2, 16]], 16, 8)
    assert cov.tolist() == [0.0, 0.5, 0.25, 0.0]
    assert patch_coverage([], (16, 24), 8).shape == (6,)
    with pytest.raises(ValueError, match="must divide"):
        patch_coverage([], 20, 8)
