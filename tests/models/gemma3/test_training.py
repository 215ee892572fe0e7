"""LoRA + distillation on a pruned Gemma 3: one optimizer step of tpkit's training module (LoRA on the
language model only, the teacher the same weights unpruned and adapter-free), then the export reloads
with stock PEFT and with tpkit's loader (pruner attached); the student's stage 1 and the teacher share
the stock tower call when the score needs no hidden states."""

import pytest
import torch

from tpkit.models.families import attach_pruner
from tpkit.pruning import PruningConfig, Stage1Config, Stage2Config
from tpkit.training.config import DistillConfig, LoraConfig, OptimConfig
from tpkit.training.lora import apply_lora
from tpkit.training.module import DistillLoRAModule

from ..lora_kd import lora_kd_step_and_export
from .conftest import model_inputs

CUT = PruningConfig(stage1=Stage1Config(min_keep=2, max_keep=12), stage2=Stage2Config(layer=2))
SAMPLES = [
    [("text", 3), ("image", None), ("text", 4)],
    [("text", 2), ("image", None), ("image", None), ("text", 5)],
]


def test_lora_distillation_step_and_export_reload(gemma_factory, make_gemma_batch, tmp_path):
    gemma_factory("sdpa", seed=0).save_pretrained(tmp_path / "base")
    with pytest.raises(ValueError, match="hits the vision tower"):
        apply_lora(gemma_factory(), LoraConfig(target_modules=r".*\.(q_proj|fc1)"))
    lora_kd_step_and_export(
        tmp_path / "base",
        "Gemma3ForConditionalGeneration",
        lambda model: make_gemma_batch(model, SAMPLES, seed=0, answer=(3, 2)),
        model_inputs,
        CUT,
        "vision_tower",
        tmp_path / "export",
    )


@pytest.mark.parametrize("score, runs", [("cosine_mean", (1, 2)), ("attn_received", (2, 2))])
def test_student_and_teacher_share_the_stock_tower_call(gemma_factory, make_gemma_batch, score, runs):
    """cosine_mean scores the tower's last output: stage 1's call is stock's, run once for both;
    attn_received asks for the hidden states too, a call of its own."""
    model = gemma_factory("sdpa", seed=0)
    batch = make_gemma_batch(model, SAMPLES, seed=0, answer=(3, 2))
    batch["labels"] = batch["input_ids"].masked_fill(~batch["answer_mask"], -100)
    peft_model = apply_lora(model, LoraConfig(r=4, alpha=8.0))
    cut = PruningConfig(stage1=Stage1Config(min_keep=2, score=score), stage2=Stage2Config(layer=2))
    attach_pruner(peft_model.get_base_model(), cut)
    module = DistillLoRAModule(peft_model, DistillConfig(alpha=1.0), OptimConfig(lr=5e-3), max_steps=1,
                               pruning_attached=True)  # fmt: skip
    seen = []
    tower = peft_model.get_base_model().model.vision_tower
    handle = tower.post_layernorm.register_forward_hook(lambda *args: seen.append(1))  # once per real run
    try:
        with torch.no_grad():
            shared = module.losses(batch)
            n_shared = len(seen)
            seen.clear()
            alone = module._losses(batch)
    finally:
        handle.remove()
    assert (n_shared, len(seen)) == runs
    for name in shared:
        torch.testing.assert_close(shared[name], alone[name], rtol=0, atol=0)
