"""One LoRA + distillation step of tpkit's training module on a family's saved tiny model, and its export
reloaded: the check the family test packages share (``tests/models/<family>/test_training.py``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from peft import PeftModel

from tpkit.models import ModelConfig, is_attached, pruning_disabled
from tpkit.models.families import attach_pruner
from tpkit.models.loading import load_base_model, load_exported
from tpkit.pruning import PruningConfig
from tpkit.training.config import DistillConfig, LoraConfig, OptimConfig, TrainConfig
from tpkit.training.export import export_adapter
from tpkit.training.lora import apply_lora
from tpkit.training.module import DistillLoRAModule


def lora_kd_step_and_export(
    base_dir: Path,
    class_name: str,
    make_batch: Callable[[torch.nn.Module], dict],
    model_inputs: Callable[[dict], dict],
    cut: PruningConfig,
    tower: str,
    out_dir: Path,
) -> None:
    """The stock model saved in ``base_dir`` (loaded as its own class, ``class_name``), LoRA (default targets: the language model only) and the
    pruner ``cut``: the teacher is the stock model (adapter off, unpruned), one step moves the adapter and
    nothing in the vision tower (module names containing ``tower``), and the export in ``out_dir``
    reloads equal with stock PEFT (pruning off) and with ``load_exported`` (pruner attached).
    ``make_batch(model)`` gives a batch with ``answer_mask``; ``model_inputs`` picks the forward's."""
    mcfg = ModelConfig(path=str(base_dir), attn_implementation="sdpa")
    model = load_base_model(mcfg)
    assert type(model).__name__ == class_name
    batch = make_batch(model)
    batch["labels"] = batch["input_ids"].masked_fill(~batch["answer_mask"], -100)
    with torch.no_grad():
        stock = model(**model_inputs(batch)).logits
    lora = LoraConfig(r=4, alpha=8.0)
    peft_model = apply_lora(model, lora)
    trained = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n and "language_model" in n for n in trained)
    attach_pruner(peft_model.get_base_model(), cut)
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
    assert all(p.grad is None for n, p in peft_model.named_parameters() if tower in n)
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    opt.step()
    assert any(not torch.equal(before[n], p) for n, p in peft_model.named_parameters() if p.requires_grad)

    peft_model.eval()
    with torch.no_grad():
        pruned = peft_model(**model_inputs(batch))
        with pruning_disabled(peft_model.get_base_model()):
            dense = peft_model(**model_inputs(batch)).logits
    assert not torch.equal(dense, stock)  # the step moved the adapter
    cfg = TrainConfig(model=mcfg, pruning=cut, lora=lora, distill=distill)
    out = export_adapter(peft_model, cfg, out_dir)
    with torch.no_grad():
        loaded = PeftModel.from_pretrained(load_base_model(mcfg), str(out)).eval()
        torch.testing.assert_close(loaded(**model_inputs(batch)).logits, dense, rtol=0, atol=0)
        for base in (load_base_model(mcfg), None):  # given, or the recorded path
            again, _ = load_exported(out, base=base)
            assert is_attached(again.get_base_model())
            got = again(**model_inputs(batch))
            torch.testing.assert_close(got.kept_index, pruned.kept_index, rtol=0, atol=0)
            torch.testing.assert_close(got.logits, pruned.logits, rtol=0, atol=0)
