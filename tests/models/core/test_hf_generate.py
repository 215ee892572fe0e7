"""The pruned model generates through transformers' own generate(): with every token kept it equals the
stock model for every decoding option users pass; with tokens dropped, greedy and beam search equal
the unpruned model with the dropped tokens masked out."""

from __future__ import annotations

import io
import types
from contextlib import redirect_stdout

import pytest
import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
    TextStreamer,
)
from transformers.generation.streamers import BaseStreamer
from transformers.modeling_outputs import CausalLMOutputWithPast

from tpkit.models import attach_pruner, last_stats, pruning_disabled
from tpkit.models.core.attach import CACHE_FIELD
from tpkit.models.core.cache import PrunedCache
from tpkit.models.core.prefill import prefill
from tpkit.models.llava.tiny import build_tiny_llava
from tpkit.models.tiny import tiny_kwargs_from_processor
from tpkit.pruning import PruningConfig, Stage1Config, Stage2Config

from .test_generate import _slow_reference

KEEP_ALL = PruningConfig(
    stage1=Stage1Config(selector="ratio", ratio=1.0),
    stage2=Stage2Config(selector="ratio", ratio=1.0, layer=2),
)
CUT = PruningConfig(
    stage1=Stage1Config(min_keep=3), stage2=Stage2Config(layer=2, selector="ratio", ratio=0.5)
)


def _both(model, batch, **kw):
    """(stock, pruned) outputs of the same generate call; the RNG is reseeded before each."""
    with torch.no_grad():
        torch.manual_seed(0)
        with pruning_disabled(model):
            stock = model.generate(**batch, **kw)
        torch.manual_seed(0)
        pruned = model.generate(**batch, **kw)
    return stock, pruned


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("backbone", ["llama", "mistral", "qwen2"])
def test_keep_all_greedy_and_beam_search_equal_stock(tiny_llava_factory, make_llava_batch, backbone, attn):
    model = attach_pruner(tiny_llava_factory(backbone, attn, seed=1), KEEP_ALL)
    batch = make_llava_batch(model, before=(3, 6, 1), after=(4, 2, 6), seed=1)
    for kw in ({}, {"num_beams": 2}, {"num_beams": 4, "num_return_sequences": 2}):
        stock, pruned = _both(model, batch, max_new_tokens=6, do_sample=False, pad_token_id=0, **kw)
        assert torch.equal(stock, pruned), kw
    assert (
        last_stats(model)["k1"].tolist() == [16] * 12
    )  # 3 prompts x 4 beams, each prefill pruned (keep-all)


@pytest.fixture(scope="module")
def tokenized():
    """A tiny model whose vocabulary is a real tokenizer's (stop strings and streamers decode text)."""
    from tpkit.synthetic.questions import synthetic_processor

    processor = synthetic_processor(image_size=32, patch_size=8)
    model = build_tiny_llava(seed=2, **tiny_kwargs_from_processor(processor))
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    return attach_pruner(model, KEEP_ALL), processor.tokenizer


class _Recorder(BaseStreamer):
    def __init__(self):
        self.chunks = []

    def put(self, value):
        self.chunks.append(value.tolist())

    def end(self):
        self.chunks.append("end")


class _BanToken(LogitsProcessor):
    def __init__(self, token):
        self.token = token

    def __call__(self, input_ids, scores):
        return scores.masked_fill(torch.arange(scores.shape[-1]) == self.token, float("-inf"))


class _StopAfter(StoppingCriteria):
    def __init__(self, length):
        self.length = length

    def __call__(self, input_ids, scores, **kw):
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length, dtype=torch.bool)


def test_keep_all_equals_stock_for_every_decoding_option(tokenized, make_llava_batch):
    model, tok = tokenized
    batch = make_llava_batch(model, before=(3, 6), after=(4, 2), seed=5)
    t = batch["input_ids"].shape[1]
    free = _both(model, batch, max_new_tokens=8, do_sample=False)[0]
    eos = int(free[0, t + 2])  # a token the model does produce: min_new_tokens and eos matter
    options = [
        {"do_sample": True, "temperature": 0.7, "top_k": 20, "top_p": 0.9},
        {"logits_processor": LogitsProcessorList([_BanToken(int(free[0, t]))])},
        {"stopping_criteria": StoppingCriteriaList([_StopAfter(t + 3)])},
        {"stop_strings": [tok.decode(free[1, t + 1 : t + 3])], "tokenizer": tok},
        {"eos_token_id": eos, "min_new_tokens": 5},
        {"eos_token_id": eos},
        {"repetition_penalty": 1.3},
        {"no_repeat_ngram_size": 2},
        {"num_beams": 3, "length_penalty": 0.5, "early_stopping": True},
    ]
    for kw in options:
        stock, pruned = _both(model, batch, **{"max_new_tokens": 8, "do_sample": False, **kw})
        assert torch.equal(stock, pruned), kw
    # return_dict_in_generate: the same sequences, scores and logits
    kw = dict(
        max_new_tokens=6,
        do_sample=False,
        return_dict_in_generate=True,
        output_scores=True,
        output_logits=True,
    )
    stock, pruned = _both(model, batch, **kw)
    assert torch.equal(stock.sequences, pruned.sequences)
    for a, b in zip(stock.scores + stock.logits, pruned.scores + pruned.logits):
        torch.testing.assert_close(a, b)
    assert isinstance(getattr(pruned, CACHE_FIELD), PrunedCache)
    # streamers: the same token chunks, the same text
    rec_stock, rec_pruned = _Recorder(), _Recorder()
    one = {k: v[:1] for k, v in batch.items()}
    _both(model, one, max_new_tokens=6, do_sample=False, streamer=rec_stock)
    torch.manual_seed(0)
    with torch.no_grad():
        model.generate(**one, max_new_tokens=6, do_sample=False, streamer=rec_pruned)
    with pruning_disabled(model), torch.no_grad():
        model.generate(**one, max_new_tokens=6, do_sample=False, streamer=rec_stock)
    assert rec_stock.chunks[-(len(rec_pruned.chunks)) :] == rec_pruned.chunks
    texts = []
    for ctx in (pruning_disabled(model), torch.no_grad()):
        buf = io.StringIO()
        with ctx, redirect_stdout(buf), torch.no_grad():
            model.generate(
                **one, max_new_tokens=6, do_sample=False, streamer=TextStreamer(tok, skip_prompt=True)
            )
        texts.append(buf.getvalue())
    assert texts[0] == texts[1] and texts[0].strip()


def test_model_defaults_give_stock_lengths(tokenized, make_llava_batch):
    """generate(**inputs) with nothing else: the model's generation_config decides, as on the stock model."""
    model, _ = tokenized
    batch = make_llava_batch(model, before=(3,), after=(4,), seed=6)
    t = batch["input_ids"].shape[1]
    gc = model.generation_config
    saved = (gc.max_length, gc.max_new_tokens, gc.eos_token_id)
    try:
        gc.max_length, gc.max_new_tokens, gc.eos_token_id = t + 7, None, None
        stock, pruned = _both(model, batch)
        assert pruned.shape[1] == stock.shape[1] == t + 7 and torch.equal(stock, pruned)
        gc.max_new_tokens = 3
        stock, pruned = _both(model, batch)
        assert pruned.shape[1] == t + 3 and torch.equal(stock, pruned)
    finally:
        gc.max_length, gc.max_new_tokens, gc.eos_token_id = saved


def _masked_reference(model, pre, split, prompt_len):
    """A stand-in forward: the unpruned model over the stage-1 sequence plus the generated tokens,
    recomputed from scratch at every step, the tokens stage 2 dropped masked out as keys from its
    layer on. Driven by generate(use_cache=False), it is the reference for greedy and beam search."""
    lm = model.model.language_model

    def forward(self, input_ids=None, pixel_values=None, attention_mask=None, position_ids=None,
                logits_to_keep=0, use_cache=None, **kwargs):  # fmt: skip
        rows = torch.arange(input_ids.shape[0]) // (input_ids.shape[0] // pre.embeds1.shape[0])
        new = input_ids[:, prompt_len:]
        g = new.shape[1]
        embeds = torch.cat([pre.embeds1[rows], lm.embed_tokens(new)], dim=1)
        nxt = pre.pos1[rows].max(dim=1, keepdim=True).values + 1
        pos = torch.cat([pre.pos1[rows], nxt + torch.arange(g)[None]], dim=1)
        ones = torch.ones(len(rows), g, dtype=torch.bool)
        valid, keep2 = torch.cat([pre.valid1[rows], ones], 1), torch.cat([pre.keep2[rows], ones], 1)
        logits = _slow_reference(model, embeds, pos, valid, keep2, split)[:, -1:]
        return CausalLMOutputWithPast(logits=logits)

    return forward


@pytest.mark.parametrize("num_beams", [1, 2, 4])
@pytest.mark.parametrize("backbone, attn", [("llama", "sdpa"), ("qwen2", "eager")])
def test_pruned_greedy_and_beam_search_equal_the_masked_reference(
    tiny_llava_factory, make_llava_batch, backbone, attn, num_beams
):
    model = attach_pruner(tiny_llava_factory(backbone, attn, seed=4), CUT)
    batch = make_llava_batch(model, before=(3, 6, 1), after=(4, 2, 6), seed=2)
    t = batch["input_ids"].shape[1]
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, num_beams=num_beams, return_dict_in_generate=True,
              output_scores=True)  # fmt: skip
    with torch.no_grad():
        pre = prefill(model, batch["input_ids"], batch["pixel_values"], batch["attention_mask"])
        assert (pre.keep2 < pre.valid1).any() and (last_stats(model)["k1"] < 16).any()  # both stages cut
        pruned = model.generate(**batch, **kw)
        reference = build_tiny_llava(backbone, seed=4, attn_implementation=attn)
        reference.load_state_dict(model.state_dict())
        reference.forward = types.MethodType(_masked_reference(model, pre, pre.split, t), reference)
        expected = reference.generate(**batch, use_cache=False, **kw)
    assert torch.equal(pruned.sequences, expected.sequences)
    if num_beams > 1:
        torch.testing.assert_close(pruned.sequences_scores, expected.sequences_scores)


def test_decoding_by_hand_with_the_returned_cache(tiny_llava, make_llava_batch):
    """Like the stock model, a pruned forward returns its cache; feeding it back decodes."""
    model = attach_pruner(tiny_llava, CUT)
    batch = make_llava_batch(model, before=(3, 6), after=(4, 2), seed=3)
    with torch.no_grad():
        out = model(**batch, use_cache=True)
        cache = getattr(out, CACHE_FIELD)
        assert isinstance(cache, PrunedCache) and cache.split == 2
        tokens = [out.logits[:, -1].argmax(-1)]
        for _ in range(4):
            out = model(input_ids=tokens[-1][:, None], **{CACHE_FIELD: cache})
            tokens.append(out.logits[:, -1].argmax(-1))
        gen = model.generate(**batch, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(torch.stack(tokens, 1), gen[:, batch["input_ids"].shape[1] :])


def test_what_cannot_prune_says_so_and_names_pruning_disabled(tiny_llava, make_llava_batch):
    model = attach_pruner(tiny_llava, CUT)
    batch = make_llava_batch(model, before=(3,), after=(4,))
    bad = [
        {"penalty_alpha": 0.6, "top_k": 4},
        {"prompt_lookup_num_tokens": 3},
        {"output_attentions": True, "return_dict_in_generate": True},
        {CACHE_FIELD: PrunedCache()},
    ]
    for kw in bad:
        with pytest.raises(ValueError, match="pruning_disabled"):
            model.generate(**batch, max_new_tokens=2, **kw)
    with pytest.raises(ValueError, match="pruning_disabled"), torch.no_grad():
        model(**batch, output_attentions=True)
    with pruning_disabled(model), torch.no_grad():  # the stock model does what the pruner cannot
        assert model.generate(**batch, max_new_tokens=2, prompt_lookup_num_tokens=3).shape[0] == 1


def test_hidden_states_come_back_and_last_stats_follow_the_last_call(tiny_llava, make_llava_batch):
    model = attach_pruner(tiny_llava, CUT)
    batch = make_llava_batch(model, before=(3, 6), after=(4, 2), seed=3)
    with torch.no_grad():
        out = model.generate(
            **batch, max_new_tokens=3, return_dict_in_generate=True, output_hidden_states=True
        )
        prefill_states, step_states = out.hidden_states[0], out.hidden_states[1]
        n_layers = model.config.text_config.num_hidden_layers
        assert len(prefill_states) == len(step_states) == n_layers + 1
        assert prefill_states[-1].shape[1] < prefill_states[0].shape[1]  # stage 2 dropped tokens
        assert step_states[0].shape[1] == 1
        assert last_stats(model) is not None
        with pruning_disabled(model):
            model(**batch)
        assert last_stats(model) is None  # that call pruned nothing
