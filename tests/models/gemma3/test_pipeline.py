"""Gemma 3 through the whole pipeline, with transformers' ``Gemma3Processor`` built offline
(:mod:`.processor`: its PIL image processor, a local tokenizer with Gemma's image and turn tokens):
the collator's ids, pixels and ``token_type_ids`` are the processor's (stock Gemma 3 lets an image's
tokens attend to each other by them), and ``tpkit evaluate`` runs on a ``save_pretrained`` checkpoint."""

from __future__ import annotations

import pytest
import torch

from tpkit.data.collator import LlavaCollator
from tpkit.models.gemma3.tiny import build_tiny_gemma3

from ..pipeline import assert_keep_all_is_stock, evaluate_saved, image_records, premise_report
from .processor import build_gemma3_processor, model_ids


@pytest.fixture(scope="module")
def processor():
    from tpkit.synthetic.questions import text_corpus

    return build_gemma3_processor(corpus=text_corpus())


def _model(processor, seed: int = 0):
    # a window of 64 positions: the prompts (~60 tokens) see every earlier token on every layer, so the
    # image block's bidirectional attention is the one difference token_type_ids make
    return build_tiny_gemma3(seed=seed, sliding_window=64, **model_ids(processor))


def _records() -> list[dict]:  # record 1 holds two images
    return image_records([[(40, 32)], [(40, 40), (36, 40)], [(40, 48)]])


def test_collator_ids_pixels_and_token_types_are_the_processors(processor):
    records = _records()
    collator = LlavaCollator(processor, max_length=512, mode="train")
    batch = collator(records)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    soft = processor.tokenizer.image_token_id
    assert (ids == soft).sum(1).tolist() == [16, 32, 16]
    assert collator.sequence_lengths(records) == mask.sum(1).tolist()
    assert torch.equal(batch["token_type_ids"], (ids == soft).long())
    for b, r in enumerate(records):  # what the processor makes of the rendered conversation
        text = collator._texts(r)[0]
        # the template writes <bos> itself (as Gemma's does), so the tokenizer must not add another
        ref = processor(text=[text], images=[r["image"]], return_tensors="pt", add_special_tokens=False)
        row = mask[b].bool()
        assert torch.equal(ids[b][row], ref["input_ids"][0])
        assert torch.equal(batch["token_type_ids"][b][row], ref["token_type_ids"][0])
        first = [0, 1, 3][b]  # the batch's images in prompt order
        torch.testing.assert_close(
            batch["pixel_values"][first : first + len(r["image"])], ref["pixel_values"]
        )
        answer = ids[b][row][batch["answer_mask"][b][row]]
        assert processor.tokenizer.decode(answer).startswith("red")
    model = _model(processor)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "token_type_ids")}
    with torch.no_grad():
        causal = model(**{k: v for k, v in inputs.items() if k != "token_type_ids"}).logits
    stock = assert_keep_all_is_stock(model, inputs)  # bidirectional images, as stock runs them
    # the marks matter: without them the image runs causally and the answer's logits change
    assert not torch.allclose(stock[:, -4:], causal[:, -4:], atol=1e-4)


def test_evaluate_on_a_saved_gemma3_checkpoint(processor, tmp_path, capsys):
    """``tpkit evaluate`` on a tiny Gemma 3 written by ``save_pretrained`` with its processor (SigLIP has
    no CLS: the CLS-less score, no topk-cls)."""
    methods = ["dense", "ours", "random", "fastv"]
    evaluate_saved(
        _model(processor),
        processor,
        tmp_path,
        methods,
        "pruning.stage1.score=null",
        "pruning.stage1.min_keep=4",
    )
    assert "report:" in capsys.readouterr().out


def test_premise_report_runs_on_gemma3s_tower(processor, tmp_path):
    """The premise report on SigLIP through Gemma 3's pooling: one score per LM token (4 x 4 of the
    tiny model's 8 x 8 patches), the CLS-less default score."""
    text, units = premise_report(_model(processor), processor, tmp_path)
    assert units == 16 and "model (mean_distance)" in text
