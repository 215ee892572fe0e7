"""Gemma 3 on the latency path: the static cache (fixed buffers, sliding layers keeping every key and
masked by window from device-side positions) decodes like the dynamic one, and a decoding step makes
no host sync. (The compiled regions, windows and image blocks live, are the family contract's:
tests/models/core/test_families.py.)"""

import torch

from tests.models.core.test_syncs import _count
from tpkit.models import attach_pruner
from tpkit.models.core.attach import CACHE_FIELD
from tpkit.models.core.cache import PrunedCache
from tpkit.pruning import PruningConfig, Stage1Config, Stage2Config

from .conftest import model_inputs

CUT = dict(stage1=Stage1Config(min_keep=3), stage2=Stage2Config(layer=2, selector="ratio", ratio=0.5))
SAMPLES = [
    [("text", 3), ("image", None), ("text", 4)],
    [("text", 6), ("image", None), ("text", 1), ("image", None), ("text", 2)],
]


def _decode(model, inputs, cache, steps):
    out = model(**inputs, **{CACHE_FIELD: cache}, use_cache=True)
    cache = getattr(out, CACHE_FIELD)
    logits = [out.logits[:, -1]]
    for _ in range(steps):
        out = model(input_ids=logits[-1].argmax(-1)[:, None], **{CACHE_FIELD: cache})
        logits.append(out.logits[:, -1])
    return torch.stack(logits, 1), cache


def test_the_static_cache_decodes_like_the_dynamic_one(gemma_factory, make_gemma_batch):
    model = attach_pruner(gemma_factory("sdpa", seed=3), PruningConfig(**CUT, bucket=8))
    inputs = model_inputs(make_gemma_batch(model, SAMPLES, seed=3))
    with torch.no_grad():
        dynamic, _ = _decode(model, inputs, None, 10)
        static, cache = _decode(model, inputs, PrunedCache(static_extra=12), 10)
    assert all(type(layer).__name__ == "_StaticLayer" for layer in cache.layers)
    assert cache.rules[0].window == 8 and int(cache.layers[0].length) == cache.layers[0].keys.shape[2] - 2
    torch.testing.assert_close(static, dynamic)


def test_decoding_steps_make_no_host_sync(gemma_factory, make_gemma_batch):
    model = attach_pruner(gemma_factory("sdpa", seed=1), PruningConfig(**CUT))
    inputs = model_inputs(make_gemma_batch(model, SAMPLES, seed=1))
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
        step = {"input_ids": out.logits[:, -1:].argmax(-1), CACHE_FIELD: getattr(out, CACHE_FIELD)}
    assert step[CACHE_FIELD].key_pos is not None  # the sliding layers' windows are live (prompts > 8)
    assert _count(model, step) == 0
