"""LoRA + distillation on a pruned InternVL: one optimizer step of tpkit's training module (LoRA on the
language model only, InternViT refused, the teacher the same weights unpruned and adapter-free), the
export reloaded with stock PEFT and with tpkit's loader (pruner attached), and the tower run shared by
the student and the teacher."""

import pytest
import torch

from tpkit.config import ConfigError
from tpkit.models.families import attach_pruner
from tpkit.pruning import PruningConfig, Stage1Config, Stage2Config
from tpkit.training.config import DistillConfig, LoraConfig, OptimConfig
from tpkit.training.lora import apply_lora, lora_target_names
from tpkit.training.module import DistillLoRAModule

from ..lora_kd import lora_kd_step_and_export
from .conftest import model_inputs

CUT = PruningConfig(stage1=Stage1Config(min_keep=2, max_keep=12), stage2=Stage2Config(layer=1))
SAMPLES = [
    [("text", 3), ("image", 3), ("text", 4)],
    [("text", 2), ("image", 1), ("text", 2), ("video", 2), ("text", 3)],
]


def test_lora_refuses_internvit_and_trains_the_language_model_only(internvl_factory):
    model = internvl_factory()
    tower = lora_target_names(model, r".*\.(q_proj|fc1)")
    assert tower and any(n.startswith("model.vision_tower.encoder.layer.") for n in tower)
    with pytest.raises(ConfigError, match="hits the vision tower"):
        apply_lora(model, LoraConfig(target_modules=r".*\.(q_proj|fc1)"))
    peft_model = apply_lora(model, LoraConfig(r=4, alpha=8.0, train_projector=True))
    trained = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any("multi_modal_projector" in n for n in trained)  # lora.train_projector: InternVL's projector
    assert all("lora_" in n and ".language_model." in n for n in trained if "multi_modal_projector" not in n)


def test_lora_distillation_step_and_export_reload(internvl_factory, make_internvl_batch, tmp_path):
    internvl_factory("sdpa", seed=0).save_pretrained(tmp_path / "base")
    lora_kd_step_and_export(
        tmp_path / "base",
        "InternVLForConditionalGeneration",
        lambda model: make_internvl_batch(model, SAMPLES, seed=0, answer=(3, 2)),
        model_inputs,
        CUT,
        ".vision_tower.",
        tmp_path / "export",
    )


@pytest.mark.parametrize("score, runs", [("cosine", (1, 2)), ("cls_attn", (2, 2))])
def test_student_and_teacher_share_one_tower_run(internvl_factory, make_internvl_batch, score, runs):
    """With the online teacher, a training step runs the tower once when stage 1 reads only its output
    (the default ``cosine`` at the last layer), as the teacher's stock call does; a score that reads an
    inner layer (``cls_attn``) asks for every hidden state and runs it apart. The losses are those of
    running it twice either way."""
    model = internvl_factory("sdpa", seed=0)
    batch = make_internvl_batch(model, SAMPLES, seed=0, answer=(3, 2))
    batch["labels"] = batch["input_ids"].masked_fill(~batch["answer_mask"], -100)
    peft_model = apply_lora(model, LoraConfig(r=4, alpha=8.0))
    cut = PruningConfig(
        stage1=Stage1Config(min_keep=2, max_keep=12, score=score), stage2=Stage2Config(layer=1)
    )
    attach_pruner(peft_model.get_base_model(), cut)
    distill = DistillConfig(alpha=1.0, temperature=2.0, hidden_weight=1.0)
    module = DistillLoRAModule(peft_model, distill, OptimConfig(lr=5e-3), max_steps=1, pruning_attached=True)
    seen = []
    tower = peft_model.get_base_model().model.vision_tower
    handle = tower.encoder.register_forward_hook(lambda *args: seen.append(1))  # once per real tower run
    try:
        with torch.no_grad():
            shared = module.losses(batch)
            n_shared = len(seen)
            seen.clear()
            alone = module._losses(batch)  # no sharing: the student's and the teacher's calls both run
            n_alone = len(seen)
    finally:
        handle.remove()
    assert (n_shared, n_alone) == runs
    assert shared["kd"] > 0 and set(shared) == set(alone)
    for name in shared:
        torch.testing.assert_close(shared[name], alone[name], rtol=0, atol=0)
