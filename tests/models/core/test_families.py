"""The core's contract, checked on every registered family's tiny model (as peft parametrises its tests
over toy models): pruning off and keep-all equal the stock model (prefill logits and greedy ids), a
ragged batch equals each sample alone (logits, accounting and generated ids), and the compiled regions
trace whole. Each family's own tests add its masked references, layouts and inputs."""

from __future__ import annotations

import pytest
import torch

from tpkit.models import attach_pruner, detach_pruner, last_stats, pruning_disabled
from tpkit.models.core.compile import compile_model
from tpkit.models.families import model_inputs
from tpkit.models.registry import build_tiny, families, family_of
from tpkit.pruning import PruningConfig, Stage1Config, Stage2Config

BUILDERS = sorted(k for f in families() for k in f.builders)
KEEP_ALL = PruningConfig(
    stage1=Stage1Config(selector="ratio", ratio=1.0),
    stage2=Stage2Config(layer=1, selector="ratio", ratio=1.0),
)
CUT = PruningConfig(
    stage1=Stage1Config(selector="ratio", ratio=0.5, min_keep=2),
    stage2=Stage2Config(layer=1, selector="ratio", ratio=0.5),
)
GEN = dict(max_new_tokens=6, do_sample=False, min_new_tokens=6)
# stage 1's kept-set options (which patches fill the knee's count): the same contract must hold with them
SPREAD = dict(diversity=1.0, diversity_radius=1, context_tokens=2)


def _with(cfg: PruningConfig, options: dict) -> PruningConfig:
    return PruningConfig(stage1=Stage1Config(**{**vars(cfg.stage1), **options}), stage2=cfg.stage2)


def _ragged(model, befores: tuple[int, ...], seed: int) -> tuple[dict, list[dict]]:
    """A left-padded batch of one-image prompts with ``befores`` text tokens before the image (the
    family's own random prompt per sample), and the samples alone."""
    fam = family_of(model)
    alone = [
        fam.random_prompt(model, 1, b, 3 + i, seed + i, torch.device("cpu")) for i, b in enumerate(befores)
    ]
    t = max(s["input_ids"].shape[1] for s in alone)
    pad = getattr(fam.language_model(model).config, "pad_token_id", None) or 0
    batch: dict = {}
    for key in alone[0]:
        parts = [s[key] for s in alone]
        if parts[0].dim() == 2 and parts[0].shape == alone[0]["input_ids"].shape and key != "image_grid_thw":
            fill = pad if key == "input_ids" else 0
            parts = [torch.nn.functional.pad(p, (t - p.shape[1], 0), value=fill) for p in parts]
        batch[key] = torch.cat(parts)
    return batch, alone


@pytest.fixture(params=BUILDERS)
def toy(request):
    return build_tiny(request.param, seed=0, attn_implementation="sdpa")


@pytest.mark.parametrize("options", [{}, SPREAD], ids=["by-score", "spread"])
def test_off_and_keep_all_equal_stock(toy, options):
    batch, _ = _ragged(toy, (2, 4), seed=0)
    detach_pruner(toy)
    inputs = model_inputs(toy, batch)
    with torch.no_grad():
        stock = toy(**inputs).logits
        stock_ids = toy.generate(**inputs, **GEN)
        attach_pruner(toy, _with(KEEP_ALL, options))
        out = toy(**inputs)
        s = last_stats(toy)
        assert torch.equal(s["k1"], s["n_visual"]) and torch.equal(s["k2"], s["n_dense"])
        ids = toy.generate(**inputs, **GEN)
        with pruning_disabled(toy):
            off = toy(**inputs).logits
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(out.logits[valid], stock[valid])
    torch.testing.assert_close(off, stock, rtol=0, atol=0)
    assert torch.equal(ids, stock_ids)


@pytest.mark.parametrize("options", [{}, SPREAD], ids=["by-score", "spread"])
def test_ragged_batch_equals_each_sample_alone(toy, options):
    attach_pruner(toy, _with(CUT, options))
    batch, alone = _ragged(toy, (2, 5, 3), seed=1)
    with torch.no_grad():
        out = toy(**model_inputs(toy, batch), use_cache=False)
        stats = {k: last_stats(toy)[k].clone() for k in ("k1", "k2", "n_visual", "n_dense")}
        ids = toy.generate(**model_inputs(toy, batch), **GEN)
        for i, sample in enumerate(alone):
            one = toy(**model_inputs(toy, sample), use_cache=False)
            s = last_stats(toy)
            assert [int(s[k][0]) for k in stats] == [int(v[i]) for v in stats.values()]
            n = one.logits.shape[1]
            torch.testing.assert_close(out.logits[i, -n:], one.logits[0], rtol=1e-4, atol=1e-4)
            one_ids = toy.generate(**model_inputs(toy, sample), **GEN)
            assert torch.equal(ids[i, -GEN["max_new_tokens"] :], one_ids[0, -GEN["max_new_tokens"] :])
    assert (stats["k1"] < stats["n_visual"]).all() and (stats["k2"] < stats["n_dense"]).all()


def test_options_at_zero_are_the_papers_set_bit_for_bit(toy):
    """diversity 0 and context_tokens 0 (whatever diversity_by / radius say) run the paper's rule: the
    same kept patches and the same logits, bit for bit, as a config without the options; the options on
    keep the knee's count and change which patches fill it."""
    batch, _ = _ragged(toy, (2, 5), seed=3)
    inputs = model_inputs(toy, batch)
    runs = {}
    with torch.no_grad():
        for name, options in (("paper", {}), ("zero", dict(diversity=0.0, diversity_by="grid",
                              diversity_radius=1, context_tokens=0)), ("spread", SPREAD)):  # fmt: skip
            attach_pruner(toy, _with(CUT, options))
            logits = toy(**inputs, use_cache=False).logits
            s = last_stats(toy)
            runs[name] = (logits, s["k1"].clone(), s["visual_keep_mask"].clone())
    (paper, k1, kept), (zero, k1_zero, kept_zero), (_, k1_spread, kept_spread) = runs.values()
    assert torch.equal(zero, paper) and torch.equal(k1_zero, k1) and torch.equal(kept_zero, kept)
    assert torch.equal(k1_spread, k1) and not torch.equal(kept_spread, kept)


@pytest.mark.slow
@pytest.mark.parametrize(
    "key", [k for k in BUILDERS if k != "llava"]
)  # LLaVA's: tests/models/core/test_compile.py
def test_compiled_regions_trace_whole(key):
    toy = build_tiny(key, seed=0, attn_implementation="sdpa")
    torch._dynamo.reset()
    attach_pruner(toy, PruningConfig(stage1=CUT.stage1, stage2=CUT.stage2, bucket=8))
    batch, _ = _ragged(toy, (2, 4), seed=2)
    inputs = model_inputs(toy, batch)
    with torch.no_grad():
        eager = toy(**inputs, use_cache=False).logits
        eager_ids = toy.generate(**inputs, **GEN)
        compile_model(toy, backend="eager")  # fullgraph: a graph break (a host sync) would raise
        torch.testing.assert_close(toy(**inputs, use_cache=False).logits, eager)
        assert torch.equal(toy.generate(**inputs, **GEN), eager_ids)
