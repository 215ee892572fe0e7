"""LoRA + distillation on a pruned Qwen2.5-VL: one optimizer step of tpkit's training module (LoRA on
the language model only, the teacher the same weights unpruned and adapter-free), then the export
reloads with stock PEFT and with tpkit's loader (pruner attached)."""

import pytest
import torch

from tpkit.models.families import attach_pruner
from tpkit.pruning import PruningConfig, Stage1Config, Stage2Config
from tpkit.training.config import DistillConfig, LoraConfig, OptimConfig
from tpkit.training.lora import apply_lora
from tpkit.training.module import DistillLoRAModule

from ..lora_kd import lora_kd_step_and_export
from .reference import model_inputs

CUT = PruningConfig(stage1=Stage1Config(min_keep=2, max_keep=12), stage2=Stage2Config(layer=1))
SAMPLES = [
    [("text", 3), ("image", (8, 12)), ("text", 4)],
    [("text", 2), ("video", (2, 8, 8)), ("text", 5)],
]


def test_lora_distillation_step_and_export_reload(qwen_factory, make_qwen_batch, tmp_path):
    qwen_factory("qwen2.5-vl", "sdpa", seed=0).save_pretrained(tmp_path / "base")
    with pytest.raises(ValueError, match="hits the vision tower"):
        apply_lora(qwen_factory("qwen2.5-vl"), LoraConfig(target_modules=r".*\.(qkv|gate_proj)"))
    lora_kd_step_and_export(
        tmp_path / "base",
        "Qwen2_5_VLForConditionalGeneration",
        lambda model: make_qwen_batch(model, SAMPLES, seed=0, answer=(3, 2)),
        model_inputs,
        CUT,
        ".visual.",
        tmp_path / "export",
    )


@pytest.mark.parametrize("in_tower_block", [None, 1])
def test_student_and_teacher_share_one_tower_run(qwen_factory, make_qwen_batch, in_tower_block):
    """With the online teacher, a training step runs each stock tower call once (the image's and the
    video's), and the losses are those of running it twice; the in-tower stage 1 runs its own loop, so
    nothing is shared there."""
    model = qwen_factory("qwen2.5-vl", "sdpa", seed=0)
    batch = make_qwen_batch(model, SAMPLES, seed=0, answer=(3, 2))
    batch["labels"] = batch["input_ids"].masked_fill(~batch["answer_mask"], -100)
    peft_model = apply_lora(model, LoraConfig(r=4, alpha=8.0))
    cut = PruningConfig(
        stage1=Stage1Config(min_keep=2, max_keep=12, in_tower_block=in_tower_block),
        stage2=Stage2Config(layer=1),
    )
    attach_pruner(peft_model.get_base_model(), cut)
    distill = DistillConfig(alpha=1.0, temperature=2.0, hidden_weight=1.0)
    module = DistillLoRAModule(peft_model, distill, OptimConfig(lr=5e-3), max_steps=1, pruning_attached=True)
    runs = []
    tower = peft_model.get_base_model().model.visual
    handle = tower.merger.register_forward_hook(lambda *args: runs.append(1))  # once per real tower run
    try:
        with torch.no_grad():
            shared = module.losses(batch)
            n_shared = len(runs)
            runs.clear()
            alone = module._losses(batch)  # no sharing: the student's and the teacher's calls both run
            n_alone = len(runs)
    finally:
        handle.remove()
    if in_tower_block is None:  # the image's run and the video's, each once
        assert (n_shared, n_alone) == (2, 4)
    else:  # the student's cut runs and the teacher's stock runs
        assert n_shared == n_alone == 4
    assert shared["kd"] > 0 and set(shared) == set(alone)
    for name in shared:
        torch.testing.assert_close(shared[name], alone[name], rtol=0, atol=0)


def test_train_projector_trains_the_merger_and_the_teacher_keeps_the_stock_one(qwen_factory, make_qwen_batch):
    """``lora.train_projector`` on Qwen trains ``visual.merger`` (the family's projector); the merger
    sits inside the tower module, so student and teacher each run the tower (no shared output) and the
    teacher stays the stock model after a step."""
    model = qwen_factory("qwen2.5-vl", "sdpa", seed=0)
    batch = make_qwen_batch(model, SAMPLES, seed=0, answer=(3, 2))
    batch["labels"] = batch["input_ids"].masked_fill(~batch["answer_mask"], -100)
    with torch.no_grad():
        stock = model(**model_inputs(batch)).logits
    peft_model = apply_lora(model, LoraConfig(r=4, alpha=8.0, train_projector=True))
    trained = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert any(".visual.merger.modules_to_save." in n for n in trained)
    assert all("lora_" in n or ".visual.merger.modules_to_save." in n for n in trained)
    attach_pruner(peft_model.get_base_model(), CUT)
    module = DistillLoRAModule(
        peft_model, DistillConfig(alpha=1.0), OptimConfig(lr=5e-2), max_steps=1, pruning_attached=True
    )
    module.model.train()
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=5e-2)
    runs = []
    handle = peft_model.get_base_model().model.visual.merger.register_forward_hook(lambda *a: runs.append(1))
    try:
        module.losses(batch)["loss"].backward()
    finally:
        handle.remove()
    assert len(runs) == 4  # the image's and the video's tower runs, for the student and for the teacher
    opt.step()
    merger = [p for n, p in peft_model.named_parameters() if ".visual.merger.modules_to_save." in n]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in merger)
    with torch.no_grad():
        torch.testing.assert_close(module.teacher_logits(batch), stock, rtol=0, atol=0)
