"""LoRA + distillation on a pruned Qwen3-VL and Qwen3.5: one optimizer step of tpkit's training module
(LoRA on the language model only, Qwen3.5's Gated DeltaNet projections included; the teacher the same
weights unpruned and adapter-free), then the export reloads with stock PEFT and with tpkit's loader
(pruner attached). ``lora.train_projector`` trains Qwen3-VL's merger and its DeepStack mergers."""

import pytest
import torch

from tests.models.lora_kd import lora_kd_step_and_export
from tests.models.qwen2_vl.reference import model_inputs
from tpkit.models import pruning_disabled
from tpkit.models.families import attach_pruner
from tpkit.models.registry import family_of
from tpkit.pruning import PruningConfig, Stage1Config, Stage2Config
from tpkit.training.config import DistillConfig, LoraConfig, OptimConfig
from tpkit.training.lora import apply_lora, lora_target_names
from tpkit.training.module import DistillLoRAModule, reuse_tower_output

from .conftest import build_qwen3_batch

CUT = PruningConfig(stage1=Stage1Config(min_keep=2, max_keep=12), stage2=Stage2Config(layer=1))
SAMPLES = [
    [("text", 3), ("image", (8, 12)), ("text", 4)],
    [("text", 2), ("video", (2, 8, 8)), ("text", 5)],
]


@pytest.mark.parametrize(
    "variant, class_name",
    [("qwen3-vl", "Qwen3VLForConditionalGeneration"), ("qwen3.5", "Qwen3_5ForConditionalGeneration")],
)
def test_lora_distillation_step_and_export_reload(qwen3_factory, tmp_path, variant, class_name):
    qwen3_factory(variant, "sdpa", seed=0).save_pretrained(tmp_path / "base")
    lora_kd_step_and_export(
        tmp_path / "base",
        class_name,
        lambda model: build_qwen3_batch(model, SAMPLES, seed=0, answer=(3, 2)),
        model_inputs,
        CUT,
        ".visual.",
        tmp_path / "export",
    )


def test_qwen3_5_lora_targets_its_linear_attention_layers(qwen3_factory):
    """The default targets reach every decoder layer: the Gated DeltaNet projections (layers 0, 2) as
    well as the attention ones (1, 3), and the MLPs; nothing in the tower."""
    model = qwen3_factory("qwen3.5")
    names = lora_target_names(model, family_of(model).lora_target)
    for i, parts in ((0, ("in_proj_qkv", "in_proj_z", "out_proj")), (1, ("q_proj", "o_proj"))):
        for part in parts:
            assert any(f"layers.{i}.{'linear_attn' if i == 0 else 'self_attn'}.{part}" in n for n in names)
    assert any("layers.2.mlp.down_proj" in n for n in names) and not any(".visual." in n for n in names)


def test_train_projector_trains_the_mergers_and_the_teacher_keeps_the_stock_ones(qwen3_factory):
    """``lora.train_projector`` on Qwen3-VL trains ``visual.merger`` and the three DeepStack mergers;
    they sit inside the tower module, so student and teacher each run the tower (no shared output)
    and the teacher stays the stock model after a step."""
    model = qwen3_factory("qwen3-vl", "sdpa", seed=0)
    batch = build_qwen3_batch(model, SAMPLES, seed=0, answer=(3, 2))
    batch["labels"] = batch["input_ids"].masked_fill(~batch["answer_mask"], -100)
    with torch.no_grad():
        stock = model(**model_inputs(batch)).logits
    peft_model = apply_lora(model, LoraConfig(r=4, alpha=8.0, train_projector=True))
    trained = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    mergers = ["visual.merger"] + [f"visual.deepstack_merger_list.{i}" for i in range(3)]
    for m in mergers:
        assert any(f".{m}.modules_to_save." in n for n in trained), m
    assert all("lora_" in n or ".modules_to_save." in n for n in trained)
    attach_pruner(peft_model.get_base_model(), CUT)
    module = DistillLoRAModule(
        peft_model, DistillConfig(alpha=1.0), OptimConfig(lr=5e-2), max_steps=1, pruning_attached=True
    )
    module.model.train()
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=5e-2)
    runs = []
    tower = peft_model.get_base_model().model.visual
    handle = tower.merger.register_forward_hook(lambda *a: runs.append(1))
    try:
        module.losses(batch)["loss"].backward()
    finally:
        handle.remove()
    assert len(runs) == 4  # the image's and the video's tower runs, for the student and for the teacher
    opt.step()
    for m in mergers:
        params = [p for n, p in peft_model.named_parameters() if f".{m}.modules_to_save." in n]
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params), m
    with torch.no_grad():
        torch.testing.assert_close(module.teacher_logits(batch), stock, rtol=0, atol=0)


@pytest.mark.parametrize("score", ["cosine_mean", "attn_received"])
def test_stage1_reads_a_tower_run_shared_with_a_stock_call_made_first(qwen3_factory, score):
    """Under ``reuse_tower_output`` (a training step, ``prefill_speed.py --reuse-tower``) a stock call
    (the teacher's, dense) may run the tower first; the pruned forward served from that run scores the
    units as from its own (the merger's input is the output's ``last_hidden_state``; attn_received runs
    the tower once more for its last block's inputs)."""
    model = qwen3_factory("qwen3-vl", "sdpa", seed=0)
    batch = build_qwen3_batch(model, SAMPLES, seed=0)
    attach_pruner(
        model, PruningConfig(stage1=Stage1Config(score=score, min_keep=2, max_keep=12), stage2=CUT.stage2)
    )
    family = family_of(model)
    with torch.no_grad():
        alone = model(**model_inputs(batch)).logits
        with reuse_tower_output(family.vision_tower(model), family.tower_call_key):
            with pruning_disabled(model):
                model(**model_inputs(batch))
            shared = model(**model_inputs(batch)).logits
    torch.testing.assert_close(shared, alone, rtol=0, atol=0)
