"""LLaVA-NeXT through the whole pipeline: the collator with an any-res processor (its counts and
tensors are the processor's), a LoRA + distillation run from a save_pretrained directory, its export
reloaded with the pruner."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from tpkit.config import from_dict
from tpkit.data.collator import LlavaCollator
from tpkit.data.processor import build_next_processor
from tpkit.models import is_attached, pruning_disabled
from tpkit.models.llava_next.tiny import tiny_next_config
from tpkit.models.loading import load_exported
from tpkit.models.registry import family_of
from tpkit.training.config import TrainConfig
from tpkit.training.recipe import fit

SIZES = [(64, 32), (64, 64), (30, 40), (32, 64)]  # (width, height) of PIL images


@pytest.fixture(scope="module")
def processor():
    from tpkit.synthetic.questions import text_corpus

    return build_next_processor(image_size=32, patch_size=8, corpus=text_corpus())


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


def _model(processor, seed: int = 0):
    tok = processor.tokenizer
    cfg = tiny_next_config(vocab_size=len(tok), image_token_id=processor.image_token_id, pad_token_id=tok.pad_token_id,
                           hidden_size=32, num_layers=2, intermediate_size=64)  # fmt: skip
    torch.manual_seed(seed)
    return transformers.LlavaNextForConditionalGeneration(cfg).eval()


def test_collator_counts_and_tensors_are_the_processors(processor):
    records = _records(4)
    collator = LlavaCollator(processor, max_length=512, mode="train")
    batch = collator(records)
    assert batch["pixel_values"].dim() == 5 and batch["image_sizes"].tolist() == [[h, w] for w, h in SIZES]
    model = _model(processor)
    fam = family_of(model)
    n_img = (batch["input_ids"] == processor.image_token_id).sum(1).tolist()
    assert n_img == [fam.image_token_count(model, (h, w)) for w, h in SIZES]
    assert len(set(n_img)) == 4  # any-res: different image sizes, different counts
    assert collator.sequence_lengths(records) == batch["attention_mask"].sum(1).tolist()
    # the ids are what the processor itself makes of the rendered conversation
    for b, r in enumerate(records):
        text = collator._texts(r)[0]
        ref = processor(text=[text], images=[r["image"]], return_tensors="pt")["input_ids"][0]
        assert torch.equal(batch["input_ids"][b][batch["attention_mask"][b].bool()], ref)
    with torch.no_grad():  # and the model takes the batch as it comes
        model(**{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_sizes")})


def test_lora_distillation_run_and_export_reload(processor, tmp_path):
    import json

    records = _records(8)
    for r in records:
        path = tmp_path / f"{r['id']}.png"
        r["image"].save(path)
        r["image"] = path.name
    data = tmp_path / "train.json"
    data.write_text(json.dumps(records))
    _model(processor).save_pretrained(tmp_path / "base")
    processor.save_pretrained(tmp_path / "base")
    cfg = from_dict(TrainConfig, {
        "model": {"path": str(tmp_path / "base"), "dtype": "float32"},
        "pruning": {"stage1": {"min_keep": 4}, "stage2": {"layer": 1}},
        "lora": {"r": 4, "alpha": 8.0},
        "distill": {"alpha": 1.0, "temperature": 2.0},
        "data": {"train_json": str(data), "batch_size": 4, "max_length": 512},
        "optim": {"lr": 5e-3, "scheduler": "constant"},
        "trainer": {"out_dir": str(tmp_path / "run"), "max_steps": 2, "logger": "none", "progress_bar": False,
                    "export_at_end": True},
    })  # fmt: skip
    res = fit(cfg)
    assert res.metrics["global_step"] == 2 and np.isfinite(res.metrics["train/kd"])
    batch = LlavaCollator(processor, max_length=512, mode="train")(_records(4, seed=1))
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_sizes")}
    module_model = res.module.model.eval()
    with torch.no_grad():
        ref = module_model(**inputs)
        model, proc = load_exported(res.export_dir)
        assert is_attached(model.get_base_model()) and proc is not None
        got = model(**inputs)
        torch.testing.assert_close(got.kept_index, ref.kept_index, rtol=0, atol=0)
        torch.testing.assert_close(got.logits, ref.logits)
        with pruning_disabled(model.get_base_model()):
            assert model(**inputs).logits.shape[1] == inputs["input_ids"].shape[1]


def test_evaluate_runs_every_method_on_a_next_checkpoint(processor, tmp_path):
    from tpkit.evaluation.config import EvalConfig
    from tpkit.evaluation.runner import evaluate
    from tpkit.models.config import ModelConfig
    from tpkit.synthetic.splits import generate_split

    _model(processor).save_pretrained(tmp_path / "base")
    processor.save_pretrained(tmp_path / "base")
    cfg = EvalConfig()
    cfg.model = ModelConfig(path=str(tmp_path / "base"), dtype="float32")
    cfg.data.test_json = str(generate_split(str(tmp_path / "data"), split="test", n=4, seed=2))
    cfg.data.eval_batch_size = 2
    cfg.pruning.stage2.layer = 1
    cfg.eval.methods = ["dense", "ours", "random", "topk-cls", "fastv"]
    cfg.eval.max_new_tokens, cfg.eval.budgets, cfg.eval.fastv_layer, cfg.eval.progress = 2, [0.4], 1, False
    cfg.speed.batch_size, cfg.speed.repeats, cfg.speed.warmup, cfg.speed.decode_tokens = 2, 1, 0, 1
    cfg.out_dir, cfg.device = str(tmp_path / "out"), "cpu"
    res = evaluate(cfg)
    ours = res["methods"]["ours"]
    sweep = {f"{m}@0.4" for m in cfg.eval.sweep_methods}
    assert set(res["methods"]) == {"dense", "ours", "random", "topk-cls", "fastv"} | sweep
    assert 0 < ours["tokens"]["fraction"]["mean"] < 1 and ours["speed"]["prefill"]["median_ms"] > 0
    assert res["methods"]["dense"]["tokens"]["fraction"]["mean"] == 1.0


def test_cls_baselines_are_refused_up_front_on_a_siglip_tower():
    from tpkit.evaluation.methods import check_methods
    from tpkit.models.llava_next.tiny import tiny_onevision_config

    model = transformers.LlavaOnevisionForConditionalGeneration(tiny_onevision_config())
    with pytest.raises(ValueError, match=r"\['topk-cls', 'prumerge-iqr'\] .*\(methods that apply: dense"):
        check_methods(family_of(model), model, ["dense", "ours", "topk-cls", "prumerge-iqr"])
    check_methods(family_of(model), model, ["dense", "ours", "random", "fastv"])


@pytest.mark.parametrize("kind", ["next", "ov"])
def test_premise_report_runs_on_the_base_view_of_any_res_towers(processor, kind, tmp_path):
    from tests.models.llava_next.test_family import build
    from tpkit.synthetic.premise import format_report, run_premise
    from tpkit.synthetic.splits import generate_split

    data = generate_split(str(tmp_path / "data"), split="test", n=4, seed=2)
    build(kind).save_pretrained(tmp_path / "m")
    if kind == "next":
        processor.save_pretrained(tmp_path / "m")  # OneVision's: the kit's default preprocessing
    report = run_premise(data, tmp_path / "m", n=4, batch_size=2)
    m = report["model_score"]
    assert m["n_images"] == 4 and m["n_patches"] == 16 and len(m["k"]) == 4
    assert f"model ({'cosine' if kind == 'next' else 'mean_distance'})" in format_report(report)


def test_collator_rebuilds_the_processors_token_types_for_the_final_ids(processor, monkeypatch):
    """Processors that mark each token's modality (Qwen2-VL's) get the marks rebuilt on the collated
    ids, which hold the whole conversation. NeXT's processor marks on request: an attribute on
    transformers >= 5.2x, a default text kwarg on 5.17."""
    import copy

    from transformers.models.llava_next import processing_llava_next

    marking = copy.deepcopy(processor)
    marking.return_mm_token_type_ids = True
    kwargs = getattr(processing_llava_next, "LlavaNextProcessorKwargs", None)
    if kwargs is not None and "return_mm_token_type_ids" in kwargs._defaults.get("text_kwargs", {}):
        text_defaults = {**kwargs._defaults["text_kwargs"], "return_mm_token_type_ids": True}
        monkeypatch.setitem(kwargs._defaults, "text_kwargs", text_defaults)
        batch = LlavaCollator(marking, max_length=512, mode="train")(_records(2))
        monkeypatch.undo()
    else:
        batch = LlavaCollator(marking, max_length=512, mode="train")(_records(2))
    types = batch["mm_token_type_ids"]
    assert types.shape == batch["input_ids"].shape
    assert torch.equal(types, (batch["input_ids"] == processor.image_token_id).long())
    assert "mm_token_type_ids" not in LlavaCollator(processor, max_length=512, mode="train")(_records(2))
