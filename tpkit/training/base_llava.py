"""Phase 2 of the base recipe: the trained tower, frozen, under a fresh 2-layer MLP projector and a
Llama language model, trained with cross-entropy on the answer tokens of the synthetic VQA train
split; and the dense accuracy of the result by greedy ``generate`` on the test and ood splits.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from tpkit.evaluation.metrics import normalize_answer
from tpkit.training import base_loop as loop
from tpkit.training.base_tower import FEATURE_LAYER, vision_config

if TYPE_CHECKING:
    from tpkit.training.base_recipe import BaseRecipeConfig


def llava_config(cfg: BaseRecipeConfig, processor: Any, vision_cfg: Any = None):
    """LlavaConfig: the tower's config, feature layer -2 without CLS ("default"), a Llama LM.

    ``vocab_size``, the special ids and ``image_token_id`` come from ``processor``'s tokenizer.
    """
    from transformers import LlamaConfig, LlavaConfig

    tok = processor.tokenizer
    image_token_id = tok.convert_tokens_to_ids(processor.image_token)
    lm = cfg.lm
    text = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=lm.hidden_size,
        intermediate_size=lm.intermediate_size,
        num_hidden_layers=lm.num_layers,
        num_attention_heads=lm.num_heads,
        num_key_value_heads=lm.num_kv_heads,
        max_position_embeddings=max(1024, lm.max_length),
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    vision = vision_cfg if vision_cfg is not None else vision_config(cfg.tower)
    n_patches = (vision.image_size // vision.patch_size) ** 2
    lc = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_id,
        image_seq_length=n_patches,
        vision_feature_layer=FEATURE_LAYER,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    lc.pad_token_id = tok.pad_token_id
    if lc.image_token_id != image_token_id:  # the attribute name moved between versions
        raise RuntimeError(f"LlavaConfig.image_token_id = {lc.image_token_id}, expected {image_token_id}")
    for c in (lc, lc.text_config, lc.vision_config):
        c._attn_implementation = "sdpa"
    return lc


def param_counts(model: nn.Module) -> dict[str, int]:
    """Parameter counts: total, and per LLaVA part when ``model`` is a LlavaForConditionalGeneration."""
    out = {"total": sum(p.numel() for p in model.parameters())}
    inner = getattr(model, "model", None)
    for part in ("vision_tower", "multi_modal_projector", "language_model"):
        sub = getattr(inner, part, None)
        if sub is not None:
            out[part] = sum(p.numel() for p in sub.parameters())
    if hasattr(model, "lm_head"):
        out["lm_head"] = sum(p.numel() for p in model.lm_head.parameters())
    return out


def answer_loss(
    model: Any, ids, mask, labels, pixel_values
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CE on answer tokens -> (loss, correct (B, T-1) bool, answer positions (B, T-1) bool).

    Position ids follow the attention mask (left padding), as ``generate`` builds them, so training
    sees the positions that inference uses. No boolean indexing: nothing here waits for the device.
    """
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
    hidden = model.model(
        input_ids=ids, pixel_values=pixel_values, attention_mask=mask, position_ids=pos
    ).last_hidden_state  # (B, T, H)
    logits = model.lm_head(hidden[:, :-1]).float()  # (B, T-1, V): token t predicts t+1
    target = labels[:, 1:]  # (B, T-1)
    loss = F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100)
    sel = target != -100
    return loss, (logits.argmax(-1) == target) & sel, sel


def answer_turn_types(record: dict[str, Any]) -> list[str]:
    """The question type of each supervised answer of a train/val record, in order ("caption" last)."""
    kinds = list(record.get("qtypes") or [record.get("qtype")])
    n_answers = sum(1 for t in record["conversations"] if t.get("from") == "gpt")
    return kinds + ["caption"] * (n_answers - len(kinds))


def _answer_runs(sel: torch.Tensor) -> torch.Tensor:
    """(B, T) answer-position mask -> (B, T) index of the answer (0, 1, ...) each position belongs to,
    -1 elsewhere. Answers are the maximal runs of consecutive answer positions."""
    start = sel & ~F.pad(sel[:, :-1], (1, 0), value=False)
    return torch.where(sel, start.long().cumsum(1) - 1, torch.full_like(sel, -1, dtype=torch.long))


@torch.no_grad()
def teacher_forced_accuracy(
    model: Any,
    batches: Any,
    norm: tuple,
    device: torch.device,
    precision: str,
    kinds: list[list[str]] | None = None,
) -> dict:
    """Token accuracy, record accuracy (every answer token of the record right) and, with ``kinds``
    (per record, the type of each answer: :func:`answer_turn_types`), answer accuracy per type,
    teacher-forced: {"token_acc", "answer_acc", "per_type": {type: accuracy}}."""
    from tpkit.training.base_data import normalize_images

    was = model.training
    model.eval()
    tok_ok = tok_n = ans_ok = 0
    per_ok: dict[str, int] = defaultdict(int)
    per_n: dict[str, int] = defaultdict(int)
    for s in range(0, batches.n, 256):
        idx = torch.arange(s, min(s + 256, batches.n))
        ids, mask, labels, imgs = batches.take(idx)
        with loop.autocast_for(device, precision):
            _, correct, sel = answer_loss(model, ids, mask, labels, normalize_images(imgs, *norm))
        tok_ok += int(correct.sum())
        tok_n += int(sel.sum())
        ans_ok += int((correct == sel).all(1).sum())  # every answer token right
        if kinds is not None:
            run = _answer_runs(sel)  # (B, T-1)
            n_runs = int(run.max()) + 1
            wrong = torch.zeros(len(idx), n_runs + 1, device=device, dtype=torch.long)
            wrong.scatter_add_(1, (run + 1).clamp(min=0), (sel & ~correct).long())  # column 0: not an answer
            ok = (wrong[:, 1:] == 0).cpu()
            for b, i in enumerate(idx.tolist()):
                for j, kind in enumerate(kinds[i][:n_runs]):
                    per_n[kind] += 1
                    per_ok[kind] += int(ok[b, j])
    model.train(was)
    out: dict[str, Any] = {"token_acc": tok_ok / max(1, tok_n), "answer_acc": ans_ok / batches.n}
    if kinds is not None:
        out["per_type"] = {k: per_ok[k] / per_n[k] for k in sorted(per_n)}
    return out


def train_llava(
    cfg: BaseRecipeConfig,
    model: Any,
    train_set: Any,
    val_set: Any,
    processor: Any,
    device: torch.device,
    state: loop.RecipeState | None = None,
) -> dict[str, Any]:
    """Phase 2, in place on ``model`` (a LlavaForConditionalGeneration, tower already loaded).

    With ``state``, continues from its ``llava.pt`` if there is one, saves into it when due or when
    a stop is requested, and once more when the phase ends (so that an interrupted evaluation does
    not retrain).
    """
    from tpkit.training.base_data import VQABatches, VQASet, image_norm, normalize_images

    lc = cfg.lm
    model.set_attn_implementation({"text_config": cfg.attention})
    model.model.vision_tower.requires_grad_(False).eval()
    model.model.multi_modal_projector.train()
    model.model.language_model.train()
    model.lm_head.train()
    pad = processor.tokenizer.pad_token_id
    data = VQABatches(train_set, pad, device, cfg.seed + 1)
    val = VQABatches(val_set, pad, device, cfg.seed + 2)
    val_kinds = [answer_turn_types(r) for r in val_set.records]
    # as many train records, scored like val: a train-val gap per question type shows memorising
    n_probe = min(len(val_set), len(train_set))
    probe_set = VQASet(
        train_set.records[:n_probe],
        train_set.images[:n_probe],
        train_set.ids[:n_probe],
        train_set.labels[:n_probe],
    )
    probe = VQABatches(probe_set, pad, device, cfg.seed + 3)
    probe_kinds = [answer_turn_types(r) for r in probe_set.records]
    norm = image_norm(processor, device)
    opt = loop.adamw(model, lc.lr, lc.weight_decay, device)
    plan = loop.StepPlan(lc.max_steps, lc.time_budget_s, device)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, loop.warmup_cosine(plan, lc.warmup_steps, lc.min_lr_ratio))
    trainable = [p for p in model.parameters() if p.requires_grad]
    step, history = 0, []
    loss_sum, acc_sum = torch.zeros((), device=device), torch.zeros((), device=device)
    elapsed0 = 0.0
    state = state or loop.RecipeState(Path("."), cfg, enabled=False)
    saved = state.load("llava")
    if saved is not None:
        step, history, elapsed0 = loop.restore_loop(saved, model, opt, sched, plan)
        data.load_state_dict(saved["data"])
        loss_sum += saved["loss_sum"].to(device)
        acc_sum += saved["acc_sum"].to(device)
        loop.log(f"[llava] resumed at step {step}/{plan.total} from {state.dir}")

    def snapshot() -> dict[str, Any]:
        return {
            **loop.loop_state(model, opt, sched, plan, step, history),
            "data": data.state_dict(),
            "loss_sum": loss_sum,
            "acc_sum": acc_sum,
        }

    plan.start(step, elapsed0, "llava")
    while step < plan.total and not plan.expired():
        ids, mask, labels, imgs = data.sample(lc.batch_size)
        with loop.autocast_for(device, cfg.precision):
            loss, correct, sel = answer_loss(model, ids, mask, labels, normalize_images(imgs, *norm))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if lc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(trainable, lc.grad_clip)
        opt.step()
        sched.step()
        step += 1
        loss_sum += loss.detach()
        acc_sum += correct.sum() / sel.sum().clamp(min=1)
        plan.after_step(step)
        if step % lc.log_every == 0 or step == plan.total:
            k = step % lc.log_every or lc.log_every
            v = teacher_forced_accuracy(model, val, norm, device, cfg.precision, val_kinds)
            tr = teacher_forced_accuracy(model, probe, norm, device, cfg.precision, probe_kinds)
            entry = {
                "step": step,
                "loss": loss_sum.item() / k,
                "train_token_acc": acc_sum.item() / k,
                "val_token_acc": v["token_acc"],
                "val_answer_acc": v["answer_acc"],
                "val_per_type": v["per_type"],
                "train_per_type": tr["per_type"],
                "epoch": data.epoch,
                "time_s": round(plan.elapsed(), 1),
            }
            history.append(entry)
            loss_sum.zero_()
            acc_sum.zero_()
            gap = ", ".join(
                f"{k} {a:.3f}/{tr['per_type'].get(k, float('nan')):.3f}" for k, a in v["per_type"].items()
            )
            loop.log(
                f"[llava] step {step}/{plan.total} loss {entry['loss']:.4f} train tok acc "
                f"{entry['train_token_acc']:.3f} val answer acc {v['answer_acc']:.3f} "
                f"lr {sched.get_last_lr()[0]:.2e} {entry['time_s']:.0f}s; answers right, val/train: {gap}"
            )
        loop.check_stop(state, "llava", snapshot)
    plan.close()
    if state.every_s > 0:
        state.save("llava", snapshot())
    loop.sync(device)
    seconds = plan.elapsed()
    model.eval()
    model.set_attn_implementation({"text_config": "sdpa"})
    loop.log(f"[llava] done: {step} steps in {seconds:.0f}s")
    return {
        "steps": step,
        "seconds": round(seconds, 1),
        "samples_seen": step * lc.batch_size,
        "epochs": round(step * lc.batch_size / len(train_set), 2),
        "history": history,
    }


# --------------------------------------------------------------------------------------------
# Evaluation: dense greedy generation


@torch.no_grad()
def evaluate_vqa(
    model: Any,
    processor: Any,
    data: Any,
    device: torch.device,
    batch_size: int = 250,
    max_new_tokens: int = 6,
    desc: str = "eval",
) -> dict[str, Any]:
    """Greedy ``generate`` on the first question of each record -> accuracy overall and per type.

    Batches come from ``LlavaCollator`` in eval mode, i.e. the same path as any evaluation of the
    fixture. Runs in fp32 (the fixture's dtype) whatever the training precision.
    """
    from PIL import Image

    from tpkit.data.collator import LlavaCollator

    coll = LlavaCollator(processor, mode="eval")
    tok = processor.tokenizer
    model.eval()
    right: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    examples = []
    for s in tqdm(
        range(0, len(data), batch_size), desc=desc, unit="batch", dynamic_ncols=True, mininterval=2.0
    ):
        recs = [
            {**r, "image": Image.fromarray(im)}
            for r, im in zip(data.records[s : s + batch_size], data.images[s : s + batch_size])
        ]
        batch = coll(recs)
        ids = batch["input_ids"].to(device)
        out = model.generate(
            input_ids=ids,
            pixel_values=batch["pixel_values"].to(device),
            attention_mask=batch["attention_mask"].to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        texts = tok.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
        for text, gold, qtype, rid in zip(texts, batch["answers"], batch["qtypes"], batch["ids"]):
            ok = normalize_answer(text) == normalize_answer(gold)
            right[qtype] += ok
            total[qtype] += 1
            if len(examples) < 8 or (not ok and len(examples) < 24):
                examples.append({"id": rid, "qtype": qtype, "answer": gold, "output": text, "correct": ok})
    n = sum(total.values())
    return {
        "n": n,
        "accuracy": sum(right.values()) / max(1, n),
        "per_type": {q: right[q] / total[q] for q in sorted(total)},
        "n_per_type": {q: total[q] for q in sorted(total)},
        "examples": examples,
    }
