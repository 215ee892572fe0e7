"""LoRA + distillation on a pruned Gemma 3: one optimizer step of tpkit's training module (LoRA on the
language model only, the teacher the same weights unpruned and adapter-free), then the export reloads
with stock PEFT and with tpkit's loader (pruner attached); the student's stage 1 and the teacher share
the stock tower call when the score needs no hidden states."""

import pytest
import torch
from peft import PeftModel

from tpkit.models import ModelConfig, is_attached, pruning_disabled
from tpkit.models.families import attach_pruner
from tpkit.models.loading import load_base_model, load_exported
from tpkit.pruning import PruningConfig, Stage1Config, Stage2Config
from tpkit.training.config import DistillConfig, LoraConfig, OptimConfig, TrainConfig
from tpkit.training.export import export_adapter
from tpkit.training.lora import apply_lora
from tpkit.training.module import DistillLoRAModule

from .conftest import model_inputs

CUT = PruningConfig(stage1=Stage1Config(min_keep=2, max_keep=12), stage2=Stage2Config(layer=2))
SAMPLES = [
    [("text", 3), ("image", None), ("text", 4)],
    [("text", 2), ("image", None), ("image", None), ("text", 5)],
]


def test_lora_distillation_step_and_export_reload(gemma_factory, make_gemma_batch, tmp_path):
    base_dir = tmp_path / "base"  # the stock base as a local checkpoint, loaded as its own class
    gemma_factory("sdpa", seed=0).save_pretrained(base_dir)
    mcfg = ModelConfig(path=str(base_dir), attn_implementation="sdpa")
    model = load_base_model(mcfg)
    assert type(model).__name__ == "Gemma3ForConditionalGeneration"
    batch = make_gemma_batch(model, SAMPLES, seed=0, answer=(3, 2))
    batch["labels"] = batch["input_ids"].masked_fill(~batch["answer_mask"], -100)
    with torch.no_grad():
        stock = model(**model_inputs(batch)).logits
    with pytest.raises(ValueError, match="hits the vision tower"):
        apply_lora(gemma_factory(), LoraConfig(target_modules=r".*\.(q_proj|fc1)"))
    lora = LoraConfig(r=4, alpha=8.0)
    peft_model = apply_lora(model, lora)
    trained = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n and "language_model" in n for n in trained)
    attach_pruner(peft_model.get_base_model(), CUT)
    distill = DistillConfig(alpha=1.0, temperature=2.0, hidden_weight=1.0)
    module = DistillLoRAModule(peft_model, distill, OptimConfig(lr=5e-3), max_steps=2, pruning_attached=True)
    module.model.train()
    torch.testing.assert_close(module.teacher_logits(batch), stock, rtol=0, atol=0)  # unpruned, no adapter
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=5e-3)
    parts = module.losses(batch)
    assert {"ce", "kd", "hid", "loss", "kept_frac"} <= set(parts) and parts["kept_frac"] < 1
    assert torch.isfinite(parts["loss"]) and parts["kd"] >= 0
    parts["loss"].backward()
    grads = [p.grad for n, p in peft_model.named_parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for n, p in peft_model.named_parameters() if "vision_tower" in n)
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    opt.step()
    assert any(not torch.equal(before[n], p) for n, p in peft_model.named_parameters() if p.requires_grad)

    peft_model.eval()
    with torch.no_grad():
        pruned = peft_model(**model_inputs(batch))
        with pruning_disabled(peft_model.get_base_model()):
            dense = peft_model(**model_inputs(batch)).logits
    assert not torch.equal(dense, stock)  # the step moved the adapter
    cfg = TrainConfig(model=mcfg, pruning=CUT, lora=lora, distill=distill)
    out = export_adapter(peft_model, cfg, tmp_path / "export")
    with torch.no_grad():
        loaded = PeftModel.from_pretrained(load_base_model(mcfg), str(out)).eval()
        torch.testing.assert_close(loaded(**model_inputs(batch)).logits, dense, rtol=0, atol=0)
        for base in (load_base_model(mcfg), None):  # given, or the recorded path
            again, _ = load_exported(out, base=base)
            assert is_attached(again.get_base_model())
            got = again(**model_inputs(batch))
            torch.testing.assert_close(got.kept_index, pruned.kept_index, rtol=0, atol=0)
            torch.testing.assert_close(got.logits, pruned.logits, rtol=0, atol=0)


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
