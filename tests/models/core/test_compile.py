"""Static shapes for graph capture: bucketed lengths give the same results as exact ones, the static
cache decodes like the dynamic one, and the compiled regions trace whole (no graph break, so no host
sync inside) and give the eager results."""

from __future__ import annotations

import pytest
import torch

from tpkit.models import attach_pruner, detach_pruner, last_stats
from tpkit.models.core.attach import CACHE_FIELD
from tpkit.models.core.cache import PrunedCache
from tpkit.models.core.compile import compile_model, is_compiled
from tpkit.models.core.prefill import prefill
from tpkit.pruning import PruningConfig, Stage1Config, Stage2Config

CUT = dict(stage1=Stage1Config(min_keep=3), stage2=Stage2Config(layer=2, selector="ratio", ratio=0.5))
GEN = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_bucketed_lengths_give_the_exact_results(tiny_llava_factory, make_llava_batch, attn):
    model = attach_pruner(tiny_llava_factory("llama", attn, seed=1), PruningConfig(**CUT))
    batch = make_llava_batch(model, before=(3, 6, 1), after=(4, 2, 6), seed=1)
    with torch.no_grad():
        exact = model(**batch)
        exact_stats = {k: v.clone() for k, v in last_stats(model).items() if torch.is_tensor(v)}
        exact_ids = model.generate(**batch, **GEN)
        attach_pruner(model, PruningConfig(**CUT, bucket=16))
        bucketed = model(**batch)
        ids = model.generate(**batch, **GEN)
    assert bucketed.logits.shape[1] % 16 == 0 and bucketed.logits.shape[1] > exact.logits.shape[1]
    for b in range(3):
        kept_e, kept_b = exact.kept_index[b] >= 0, bucketed.kept_index[b] >= 0
        assert torch.equal(exact.kept_index[b][kept_e], bucketed.kept_index[b][kept_b])
        torch.testing.assert_close(bucketed.logits[b][kept_b], exact.logits[b][kept_e])
    for key in ("k1", "k2", "n_prompt", "token_layer_fraction"):
        assert torch.equal(last_stats(model)[key], exact_stats[key]), key
    assert torch.equal(ids, exact_ids)


def test_the_static_cache_decodes_like_the_dynamic_one(tiny_llava, make_llava_batch):
    model = attach_pruner(tiny_llava, PruningConfig(**CUT, bucket=8))
    batch = make_llava_batch(model, before=(3, 6), after=(4, 2), seed=3)
    steps = {}
    with torch.no_grad():
        t1 = prefill(model, batch["input_ids"], batch["pixel_values"], batch["attention_mask"]).index1.shape[
            1
        ]
        for kind, cache in (("dynamic", None), ("static", PrunedCache(static_extra=5))):
            out = model(**batch, **{CACHE_FIELD: cache}, use_cache=True)
            cache = getattr(out, CACHE_FIELD)
            logits = [out.logits[:, -1]]
            for _ in range(4):
                out = model(input_ids=logits[-1].argmax(-1)[:, None], **{CACHE_FIELD: cache})
                logits.append(out.logits[:, -1])
            steps[kind] = torch.stack(logits, 1)
        # fixed shapes: group a's buffers were allocated once (T1 + 5 slots) and filled on the device
        assert cache.layers[0].keys.shape[2] == t1 + 5 and int(cache.layers[0].length) == t1 + 4
    torch.testing.assert_close(steps["static"], steps["dynamic"])


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_compiled_regions_trace_whole_and_match_eager(tiny_llava_factory, make_llava_batch, attn):
    torch._dynamo.reset()
    model = attach_pruner(tiny_llava_factory("llama", attn, seed=2), PruningConfig(**CUT, bucket=16))
    batch = make_llava_batch(model, before=(3, 6), after=(4, 2), seed=4)
    with torch.no_grad():
        eager_logits = model(**batch, use_cache=False).logits
        eager_ids = model.generate(**batch, **GEN)
        compile_model(model, backend="eager")  # fullgraph: a graph break (a host sync) would raise
        assert is_compiled(model)
        torch.testing.assert_close(model(**batch, use_cache=False).logits, eager_logits)
        ids = model.generate(**batch, **GEN)
    assert torch.equal(ids, eager_ids)
    detach_pruner(model)  # the compiled regions go with the pruner: stock class, stock LM forward
    lm = model.model.language_model
    assert (
        not is_compiled(model)
        and "forward" not in vars(lm)
        and type(model).__name__ == "LlavaForConditionalGeneration"
    )
