"""InternVL through the whole pipeline, with transformers' ``InternVLProcessor`` built offline
(:mod:`.processor`: its PIL image processor, a local tokenizer, a stand-in video processor): the
collator's ids and tiles are the processor's (markers included), video frames as the processor lays them
out, ``tpkit evaluate`` on a ``save_pretrained`` checkpoint, and the premise report on InternViT."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tpkit.data.collator import LlavaCollator
from tpkit.models import attach_pruner, last_stats
from tpkit.models.internvl.tiny import build_tiny_internvl
from tpkit.pruning import PruningConfig, Stage1Config, Stage2Config

from ..pipeline import KEEP_ALL, assert_keep_all_is_stock, evaluate_saved
from .processor import build_internvl_processor, offline_video_processor

SIZES = [(64, 32), (32, 32), (96, 32), (64, 64)]  # (width, height): 2 + thumb, 1, 3 + thumb, 4 + thumb tiles
TILES = [3, 1, 4, 5]


@pytest.fixture(scope="module")
def processor():
    from tpkit.synthetic.questions import text_corpus

    with offline_video_processor():
        return build_internvl_processor(corpus=text_corpus())


def _model(processor, seed: int = 0):
    tok = processor.tokenizer
    return build_tiny_internvl(seed=seed, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                               hidden_size=32, num_layers=2, intermediate_size=64)  # fmt: skip


def _records(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        image = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        conv = [
            {"from": "human", "value": "<image>\nWhat color is the circle?"},
            {"from": "gpt", "value": "red"},
        ]
        out.append({"id": f"r{i}", "image": image, "conversations": conv})
    return out


def test_collator_ids_and_tiles_are_the_processors(processor):
    records = _records(4)
    collator = LlavaCollator(processor, max_length=512, mode="train")
    batch = collator(records)
    ids = batch["input_ids"]
    assert batch["pixel_values"].shape == (sum(TILES), 3, 32, 32)
    assert (ids == processor.image_token_id).sum(1).tolist() == [16 * n for n in TILES]
    assert collator.sequence_lengths(records) == batch["attention_mask"].sum(1).tolist()
    for b, r in enumerate(records):  # the ids are what the processor makes of the rendered conversation
        text = collator._texts(r)[0]
        ref = processor(text=[text], images=[r["image"]], return_tensors="pt")
        row = ids[b][batch["attention_mask"][b].bool()]
        assert torch.equal(row, ref["input_ids"][0])
        assert processor.tokenizer.decode(row[row != processor.image_token_id]).count("<img></img>") == 1
        first = sum(TILES[:b])
        assert torch.equal(batch["pixel_values"][first : first + TILES[b]], ref["pixel_values"])
        answer = row[batch["answer_mask"][b][batch["attention_mask"][b].bool()]]
        assert processor.tokenizer.decode(answer).startswith("red")
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    assert_keep_all_is_stock(_model(processor), inputs)  # the batch as it comes


def test_video_frames_as_the_processor_lays_them_out(processor):
    """A video through the processor: ``Frame{i}: <img> ... </img>`` per frame, one tile each; stage 1
    cuts one knee per frame (each its own run) and keep-all equals stock."""
    rng = np.random.default_rng(3)
    frames = [Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)) for _ in range(3)]
    image = Image.fromarray(rng.integers(0, 255, (32, 64, 3), dtype=np.uint8))
    inputs = processor(text=["<video>\nWhat moves? And here <IMG_CONTEXT> too?"], videos=[frames], images=[image],
                       return_tensors="pt")  # fmt: skip
    text = processor.tokenizer.decode(inputs["input_ids"][0])
    assert text.count("<img>") == 4 and "Frame3: <img>" in text
    assert inputs["pixel_values"].shape == (3 + 3, 3, 32, 32)  # frames first (prompt order), then the image
    model = _model(processor, seed=1)
    with torch.no_grad():
        stock = model(**inputs).logits
        attach_pruner(model, KEEP_ALL)
        torch.testing.assert_close(model(**inputs).logits, stock)
        attach_pruner(model, PruningConfig(stage1=Stage1Config(selector="budget", budget=3, min_keep=1),
                                           stage2=Stage2Config(enabled=False)))  # fmt: skip
        model(**inputs)
    assert last_stats(model)["k1"].tolist() == [3 * 3 + 3]  # three frames and one image, 3 tokens each


def test_evaluate_on_a_saved_internvl_checkpoint(processor, tmp_path, capsys):
    """``tpkit evaluate`` on a tiny InternVL written by ``save_pretrained`` with its processor: every
    method (InternViT has CLS: the CLS baselines apply)."""
    methods = ["dense", "ours-s1", "ours", "random", "topk-cls", "fastv", "prumerge-iqr"]
    with offline_video_processor():  # (InternVL's processor saves and loads only inside it)
        evaluate_saved(_model(processor), processor, tmp_path, methods, "eval.budgets=[0.4]")
    assert "report:" in capsys.readouterr().out


def test_premise_report_runs_on_internvit(processor, tmp_path):
    """One tile per image (the image processor without the processor's tiling), scored per LM token."""
    from tpkit.synthetic.premise import format_report, run_premise
    from tpkit.synthetic.splits import generate_split

    data = generate_split(str(tmp_path / "data"), split="test", n=4, seed=2)
    _model(processor).save_pretrained(tmp_path / "m")
    processor.image_processor.save_pretrained(tmp_path / "m")
    report = run_premise(data, tmp_path / "m", n=4, batch_size=2)
    m = report["model_score"]
    assert m["n_images"] == 4 and m["n_patches"] == 16 and len(m["k"]) == 4  # 4 x 4 tokens of 8 px
    assert report["pixel_control"]["n_patches"] == 16 and np.isfinite(m["auroc_pooled"])
    assert "model (cosine)" in format_report(report)
