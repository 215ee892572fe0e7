"""The pruned forward in training: gradients flow, PEFT LoRA wraps it, the teacher is the stock model."""

import torch
from peft import LoraConfig, get_peft_model

from tpkit.models import attach_pruner, pruning_disabled
from tpkit.pruning import PruningConfig

TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)"


def test_backward_through_the_pruned_forward(tiny_llava, make_llava_batch):
    model = attach_pruner(tiny_llava, PruningConfig()).train()
    batch = make_llava_batch(model, before=(3, 6), after=(4, 2), answer=(3, 2))
    labels = batch["input_ids"].masked_fill(~batch["answer_mask"], -100)
    out = model(**batch, labels=labels)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    lm = model.model.language_model
    assert lm.layers[-1].mlp.down_proj.weight.grad.abs().sum() > 0  # layers after stage 2
    assert model.model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0  # kept patches


def test_peft_lora_student_and_teacher(tiny_llava, make_llava_batch):
    batch = make_llava_batch(tiny_llava, before=(3, 6), after=(4, 2), answer=(3, 2))
    with torch.no_grad():
        stock = tiny_llava(**batch).logits
    peft_model = get_peft_model(tiny_llava, LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False))
    assert not any("vision_tower" in n for n, _ in peft_model.named_parameters() if "lora_" in n)
    attach_pruner(peft_model, PruningConfig())
    student = peft_model(**batch)
    assert student.logits.shape[1] < stock.shape[1] and student.kept_index is not None
    student.logits.float().pow(2).mean().backward()
    grads = [p.grad for n, p in peft_model.named_parameters() if "lora_" in n and p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    with torch.no_grad(), peft_model.disable_adapter(), pruning_disabled(peft_model):
        teacher = peft_model(**batch).logits
    torch.testing.assert_close(teacher, stock, rtol=0, atol=0)
