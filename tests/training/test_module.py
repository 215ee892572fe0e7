"""The student/teacher step on the tiny model: targets, teacher == stock, KD 0 at init, learning."""

from __future__ import annotations

import copy

import pytest
import torch

from tpkit.data.collator import LlavaCollator
from tpkit.data.llava_json import load_llava_json
from tpkit.models import is_attached, pruning_disabled
from tpkit.models.loading import load_base_model, resolve_dtype
from tpkit.training.recipe import build_module, build_student, fit


@pytest.fixture(scope="module")
def batch(processor, train_json):
    ds, _ = load_llava_json(train_json)
    return LlavaCollator(processor, max_length=128, mode="train")([ds[i] for i in range(4)])


def _module(cfg, processor, base=None):
    peft_model, attached = build_student(cfg, processor, base=base)
    return build_module(cfg, peft_model, attached)


def test_lora_hits_language_model_only_and_answer_mask_reaches_pruned_forward(make_cfg, processor, batch):
    m = _module(make_cfg(), processor)
    trainable = [n for n, p in m.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and "language_model" in n for n in trainable)
    assert m.pruning_attached and is_attached(m.model.get_base_model())
    out = m.student_forward(batch)  # through PeftModel.forward
    T = batch["input_ids"].shape[1]
    assert out.logits.shape[1] < T  # stage 1 (16 -> >= 4 patches) shrank the sequence
    # every answer token's predecessor survived, so no answer target is lost
    kept = out.kept_index
    for b in range(kept.shape[0]):
        ans = batch["answer_mask"][b].nonzero().flatten()
        assert set((ans - 1).tolist()) <= set(kept[b].tolist())


def test_teacher_logits_equal_stock_model(make_cfg, processor, batch):
    cfg = make_cfg()
    base = load_base_model(cfg.model, dtype=resolve_dtype(cfg.model.dtype, "cpu"), processor=processor)
    stock = copy.deepcopy(base)
    m = _module(cfg, processor, base=base)
    with torch.no_grad():
        for p in m.model.parameters():  # a trained-looking adapter, so "adapter off" matters
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
        ref = stock(
            input_ids=batch["input_ids"],
            pixel_values=batch["pixel_values"],
            attention_mask=batch["attention_mask"],
        ).logits
        student = m.student_forward(batch).logits
    torch.testing.assert_close(m.teacher_logits(batch), ref, rtol=0, atol=0)
    assert student.shape != ref.shape  # the student itself is pruned
    # the adapter is back on after the teacher pass
    with pruning_disabled(m.model.get_base_model()), torch.no_grad():
        on = m.model(
            input_ids=batch["input_ids"],
            pixel_values=batch["pixel_values"],
            attention_mask=batch["attention_mask"],
        )
    assert not torch.allclose(on.logits, ref)


def test_kd_zero_when_student_equals_teacher(make_cfg, processor, batch):
    # LoRA B starts at 0 and pruning is off: the student is the teacher
    cfg = make_cfg(pruning={"stage1": {"enabled": False}, "stage2": {"enabled": False}})
    m = _module(cfg, processor)
    with torch.no_grad():
        parts = m.losses(batch)
    assert parts["kd"].item() == pytest.approx(0.0, abs=1e-7)
    assert parts["ce"].item() > 1.0


def test_hidden_distill_matches_a_reference_and_trains_the_adapter(make_cfg, processor, batch):
    off = {"stage1": {"enabled": False}, "stage2": {"enabled": False}}
    m = _module(make_cfg(pruning=off, distill={"hidden_weight": 1.0}), processor)
    with torch.no_grad():
        assert m.losses(batch)["hid"].item() == pytest.approx(0.0, abs=1e-6)  # student = teacher
    for alpha in (1.0, 0.0):  # the teacher's states from its logits pass, or from a pass of their own
        m = _module(make_cfg(distill={"hidden_weight": 2.0, "alpha": alpha}), processor)
        parts = m.losses(batch)
        assert ("kd" in parts) == (alpha > 0)
        hid = parts["hid"]
        # reference: both full final-normed hidden states, compared at the student's kept text positions
        base = m.model.get_base_model()
        with m.final_hidden() as seen, torch.no_grad():
            out = m.student_forward(batch)
            m.teacher_logits(batch)
        student, teacher = seen
        ids, kept = batch["input_ids"], out.kept_index
        ref = []
        for b in range(ids.shape[0]):
            for j in range(kept.shape[1]):
                i = int(kept[b, j])
                if i >= 0 and int(ids[b, i]) != base.config.image_token_id and batch["attention_mask"][b, i]:
                    ref.append(1 - torch.cosine_similarity(student[b, j], teacher[b, i], dim=0))
        assert 0 < hid.item() == pytest.approx(torch.stack(ref).mean().item(), rel=1e-5)
        assert parts["loss"].item() == pytest.approx(
            (parts["ce"] + parts.get("kd", 0.0) * alpha + 2.0 * hid).item(), rel=1e-5
        )
        parts["loss"].backward()
        grads = [p.grad for n, p in m.model.named_parameters() if p.requires_grad and "lora_B" in n]
        assert grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    with pytest.raises(ValueError, match="online teacher"):
        make_cfg(distill={"hidden_weight": 1.0, "teacher_cache": "runs/cache"})


def test_loss_decreases(make_cfg, processor, batch):
    torch.manual_seed(0)
    m = _module(make_cfg(), processor)
    m.model.train()
    opt = torch.optim.AdamW([p for p in m.model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = m.losses(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3, losses
    assert all(b < a for a, b in zip(losses, losses[1:])), losses


@pytest.mark.parametrize("train_projector", [False, True])
def test_only_trainable_params_change(make_cfg, processor, train_projector):
    cfg = make_cfg(
        lora={"train_projector": train_projector}, trainer={"max_steps": 3, "checkpoint_every_n_steps": 0}
    )
    base = load_base_model(cfg.model, processor=processor)
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    res = fit(cfg, processor=processor, base=base)
    changed_trainable = 0
    for n, p in res.module.model.named_parameters():
        if p.requires_grad:
            assert "lora_" in n or (train_projector and "modules_to_save" in n), n
            changed_trainable += 1
    assert changed_trainable > 0
    for n, p in base.named_parameters():
        if "lora_" in n or "modules_to_save" in n:
            continue
        key = n.replace(".base_layer", "").replace(".original_module", "")
        assert torch.equal(p, before[key]), f"base weight {n} changed"
    lora_b = [p for n, p in res.module.model.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in lora_b)  # B started at 0: the adapter trained
    if train_projector:
        proj = dict(res.module.model.named_parameters())
        trained = [p for n, p in proj.items() if "modules_to_save" in n and p.requires_grad]
        assert trained and any(
            not torch.equal(
                p, before[n.split("base_model.model.", 1)[1].replace(".modules_to_save.default", "")]
            )
            for n, p in proj.items()
            if "modules_to_save" in n
        )
    # the checkpoint holds trainable tensors only
    sd = torch.load(res.checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    assert set(sd) == {n for n, p in res.module.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind", ["forward_kl", "jsd"])
def test_fast_kd_path_equals_the_naive_one(make_cfg, processor, batch, kind):
    """Shared tower output + teacher LM head on answer rows only == full teacher logits gathered."""
    from tpkit.data.labels import next_token_targets
    from tpkit.models.core.masks import gather_rows

    from .test_losses import distill_loss

    m = _module(make_cfg(distill={"kind": kind, "temperature": 2.0}), processor)
    with torch.no_grad():
        for p in m.model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
        parts = m.losses(batch)
        out = m.student_forward(batch)
        targets = next_token_targets(batch["labels"], out.kept_index)
        teacher = gather_rows(m.teacher_logits(batch), out.kept_index)
        naive = distill_loss(out.logits, teacher, targets, kind=kind, temperature=2.0)
    assert naive.item() > 1e-4
    torch.testing.assert_close(parts["kd"], naive, rtol=1e-5, atol=1e-7)


def test_student_and_teacher_share_one_tower_run(make_cfg, processor, batch):
    """The online teacher reuses the student's vision-tower run; the losses are those of two runs."""
    from tpkit.models.registry import family_of

    m = _module(make_cfg(distill={"kind": "forward_kl", "temperature": 2.0}), processor)
    base = m.model.get_base_model()
    runs = []
    inner = next(family_of(base).vision_tower(base).children())  # runs inside the tower's own forward only
    handle = inner.register_forward_hook(lambda *args: runs.append(1))
    try:
        with torch.no_grad():
            shared = m.losses(batch)
            n_shared = len(runs)
            alone = m._losses(batch)
    finally:
        handle.remove()
    assert (n_shared, len(runs)) == (1, 3)
    assert set(shared) == set(alone)
    for name in shared:
        torch.testing.assert_close(shared[name], alone[name], rtol=0, atol=0)


def test_gradient_checkpointing_gives_the_same_gradients(make_cfg, processor, batch):
    """... and the frozen vision tower stays out of the backward either way."""
    grads = []
    for ckpt in (False, True):
        cfg = make_cfg(trainer={"gradient_checkpointing": ckpt})
        m = _module(cfg, processor)
        m.model.train()
        assert m.base.is_gradient_checkpointing == ckpt
        with torch.no_grad():
            for p in m.model.parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        tower: list[bool] = []
        hook = m.base.model.vision_tower.register_forward_hook(
            lambda mod, args, out, seen=tower: seen.append(out.last_hidden_state.requires_grad)
        )
        m.losses(batch)["loss"].backward()
        hook.remove()
        assert tower and not any(tower)  # no graph through the tower
        grads.append({n: p.grad.clone() for n, p in m.model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-5, atol=1e-7, msg=k)


def test_bf16_base_keeps_trainable_tensors_in_fp32(make_cfg, processor):
    cfg = make_cfg(model={"dtype": "bfloat16"}, lora={"train_projector": True})
    m = _module(cfg, processor)
    dtypes = {p.dtype for p in m.model.parameters() if p.requires_grad}
    assert dtypes == {torch.float32}
    assert m.base.model.language_model.layers[0].mlp.down_proj.base_layer.weight.dtype == torch.bfloat16
