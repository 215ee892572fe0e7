"""Host syncs of a pruned prefill do not grow with the batch (ops that block the host on CUDA, counted on CPU)."""

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tpkit.models import attach_pruner, last_stats
from tpkit.pruning import PruningConfig, Stage2Config

_SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "equal", "_unique2", "unique_dim"}


class _Syncs(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        hit = name in _SYNC_OPS
        if name in ("index", "index_put", "index_put_"):
            hit = any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1])
        if hit:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def _count(model, batch, **kw) -> int:
    orig = torch.Tensor.tolist
    counter = _Syncs()

    def tolist(t, *a, **k):  # below the dispatcher
        counter.ops["tolist"] += 1
        return orig(t, *a, **k)

    torch.Tensor.tolist = tolist
    try:
        with torch.no_grad(), counter:
            model(**batch, **kw)
    finally:
        torch.Tensor.tolist = orig
    return sum(counter.ops.values())


@pytest.mark.parametrize("selector", ["kneedle", "ratio", "forced", "diverse"])
def test_prefill_syncs_do_not_grow_with_batch(tiny_llava, make_llava_batch, selector):
    sel = "kneedle" if selector in ("forced", "diverse") else selector
    div = {"diversity": 1.0, "diversity_radius": 1} if selector == "diverse" else {}
    cfg = PruningConfig(stage2=Stage2Config(selector=sel, **div))
    attach_pruner(tiny_llava, cfg)
    counts = []
    for before, after in (((3,), (4,)), ((3, 5, 0, 7, 2, 6), (4, 2, 6, 1, 3, 5))):
        batch = make_llava_batch(tiny_llava, before=before, after=after)
        b = len(before)
        kw = (
            {"stage1_keep": torch.full((b,), 6), "stage2_keep": torch.arange(b) + 12}
            if selector == "forced"
            else {}
        )
        counts.append(_count(tiny_llava, batch, **kw))
    assert counts[0] == counts[1] <= (7 if div else 6), counts  # diversity: +1 (the largest patch count)
    assert len(last_stats(tiny_llava)["visual_keep"]) == 6  # lists still built on request


@pytest.mark.parametrize("before", [(3,), (3, 6)])  # no padding / padding
def test_decoding_steps_make_no_host_sync(tiny_llava, make_llava_batch, before):
    """After the prefill, a decoding step on the pruned cache never waits for the host (its masks come
    from the left padding recorded at the prefill, not from growing concatenated masks)."""
    from tpkit.models.core.attach import CACHE_FIELD

    attach_pruner(tiny_llava, PruningConfig(stage2=Stage2Config(selector="ratio", ratio=0.5)))
    batch = make_llava_batch(tiny_llava, before=before, after=(4,) * len(before))
    with torch.no_grad():
        out = tiny_llava(**batch, use_cache=True)
        step = {"input_ids": out.logits[:, -1:].argmax(-1), CACHE_FIELD: getattr(out, CACHE_FIELD)}
    assert _count(tiny_llava, step) == 0
