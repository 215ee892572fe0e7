"""Phase 1 of the base recipe: a ``CLIPVisionModel`` built from a config, pretrained so that its CLS
token summarises the image.

The objective is multi-label BCE over which shapes and which colours are in a synthetic image, read
from the CLS output (DESIGN.md "Measured: making the CLS premise hold"), plus, when
``tower.premise_loss`` > 0, the premise term: BCE of the pruner's own stage-1 score against the
objects' boxes. No count or position heads: they destroyed the premise in the measured study.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from tpkit.training import base_loop as loop

if TYPE_CHECKING:
    from tpkit.training.base_recipe import BaseRecipeConfig, TowerConfig

# The LLaVA's vision_feature_layer: its patch features, and where stage 1 scores them against CLS.
FEATURE_LAYER = -2


def vision_config(cfg: TowerConfig):
    """The CLIP vision tower's config (sdpa attention)."""
    from transformers import CLIPVisionConfig

    vc = CLIPVisionConfig(
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        projection_dim=cfg.hidden_size,
    )
    vc._attn_implementation = "sdpa"
    return vc


class CLSClassifier(nn.Module):
    """A CLIP vision tower with a linear multi-label head on its (post-layernorm) CLS output, and
    the premise term's logit scale and bias (see ``TowerConfig.premise_loss``)."""

    def __init__(self, vision_cfg: Any, n_labels: int):
        super().__init__()
        from transformers import CLIPVisionModel

        self.tower = CLIPVisionModel(vision_cfg)
        self.head = nn.Linear(vision_cfg.hidden_size, n_labels)
        self.premise_scale = nn.Parameter(torch.tensor(10.0))
        self.premise_bias = nn.Parameter(torch.tensor(-5.0))

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, S, S) -> (label logits (B, n_labels), the stage-1 cosine score of every patch at
        the feature layer (B, P), as the pruner computes it)."""
        from tpkit.pruning.stage1 import cls_cosine

        out = self.tower(pixel_values=pixel_values, output_hidden_states=True)
        return self.head(out.pooler_output), cls_cosine(out.hidden_states[FEATURE_LAYER])

    def premise_logits(self, scores: torch.Tensor) -> torch.Tensor:
        return self.premise_scale * scores + self.premise_bias


def _f1(logits: torch.Tensor, target: torch.Tensor) -> float:
    pred = logits > 0
    tgt = target > 0.5
    tp = (pred & tgt).sum().item()
    fp = (pred & ~tgt).sum().item()
    fn = (~pred & tgt).sum().item()
    return 2 * tp / max(1, 2 * tp + fp + fn)


@torch.no_grad()
def tower_eval(
    model: CLSClassifier,
    images: torch.Tensor,
    labels: torch.Tensor,
    patches: torch.Tensor,
    norm: tuple,
    n_shapes: int,
    bs: int = 512,
) -> dict[str, float]:
    """Micro-F1 of the multi-label head (threshold 0.5): all labels, shapes only, colours only; and
    the premise on these images with the pruner's default stage 1 (cosine, kneedle knee): mean kept
    fraction, recall of object patches, per-image AUROC (``tpkit.evaluation.premise``)."""
    from tpkit.evaluation.premise import premise_stats
    from tpkit.pruning import Stage1Config
    from tpkit.training.base_data import normalize_images

    was = model.training
    model.eval()
    out = [model(normalize_images(images[i : i + bs], *norm)) for i in range(0, len(images), bs)]
    model.train(was)
    logits = torch.cat([o[0] for o in out]).float()
    scores = torch.cat([o[1] for o in out]).float().cpu().numpy()
    premise = premise_stats(scores, patches.cpu().numpy().astype(np.float32), Stage1Config())
    return {
        "f1": _f1(logits, labels),
        "f1_shape": _f1(logits[:, :n_shapes], labels[:, :n_shapes]),
        "f1_color": _f1(logits[:, n_shapes:], labels[:, n_shapes:]),
        "premise_kept": premise["kept_mean"],
        "premise_recall": premise["recall_covered"],
        "premise_auroc": premise["auroc_per_image"],
    }


def load_tower(path: str, lcfg: Any) -> Any:
    """The vision tower of the saved LLaVA at ``path``; its config must equal ``lcfg``'s."""
    from transformers import LlavaForConditionalGeneration

    saved = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    mine, theirs = lcfg.vision_config.to_dict(), saved.config.vision_config.to_dict()
    diff = {
        k: (mine.get(k), theirs.get(k))
        for k in ("hidden_size", "num_hidden_layers", "image_size", "patch_size")
    }
    if any(a != b for a, b in diff.values()):
        raise ValueError(f"tower.init_from={path}: vision config differs (recipe, saved): {diff}")
    return saved.model.vision_tower


def train_tower(
    cfg: BaseRecipeConfig,
    pool: tuple[np.ndarray, np.ndarray],
    held_out: tuple[np.ndarray, np.ndarray],
    processor: Any,
    device: torch.device,
    state: loop.RecipeState | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Phase 1 -> (trained ``CLIPVisionModel`` on ``device``, metrics).

    With ``state``, continues from its ``tower.pt`` if there is one and saves into it when due or
    when a stop is requested (see :class:`loop.RecipeState`).
    """
    from tpkit.data.synthetic import SHAPES
    from tpkit.training.base_data import image_norm, normalize_images

    tc = cfg.tower
    torch.manual_seed(cfg.seed)
    model = CLSClassifier(vision_config(tc), pool[1].shape[1]).to(device).train()
    opt = loop.adamw(model, tc.lr, tc.weight_decay, device)
    plan = loop.StepPlan(tc.max_steps, tc.time_budget_s, device)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, loop.warmup_cosine(plan, tc.warmup_steps, tc.min_lr_ratio))
    norm = image_norm(processor, device)
    images = torch.from_numpy(pool[0]).to(device)  # (N, S, S, 3) uint8
    labels = torch.from_numpy(pool[1]).to(device)  # (N, 13)
    grid = tc.image_size // tc.patch_size
    patches = torch.from_numpy(pool[2]).to(device).view(-1, grid, grid)  # (N, rows, cols) object patches
    ev_images, ev_labels, ev_patches = (torch.from_numpy(a).to(device) for a in held_out)
    gen = torch.Generator().manual_seed(cfg.seed)
    n, bs = len(images), min(tc.batch_size, len(images))
    pos = n  # start with a new epoch
    step, loss_sum, history = 0, torch.zeros((), device=device), []
    perm = flips = None
    elapsed0 = 0.0
    state = state or loop.RecipeState(Path("."), cfg, enabled=False)
    saved = state.load("tower")
    if saved is not None:
        step, history, elapsed0 = loop.restore_loop(saved, model, opt, sched, plan)
        gen.set_state(saved["gen"])
        perm, flips, pos = saved["perm"].to(device), saved["flips"].to(device), int(saved["pos"])
        loss_sum += saved["loss_sum"].to(device)
        loop.log(f"[tower] resumed at step {step}/{plan.total} from {state.dir}")

    def snapshot() -> dict[str, Any]:
        return {
            **loop.loop_state(model, opt, sched, plan, step, history),
            "gen": gen.get_state(),
            "perm": perm,
            "flips": flips,
            "pos": pos,
            "loss_sum": loss_sum,
        }

    plan.start(step, elapsed0, "tower")
    while step < plan.total and not plan.expired():
        if pos + bs > n:
            # order and flips drawn on the CPU once per epoch, copied once: no per-step transfer
            perm = torch.randperm(n, generator=gen).to(device)
            flips = (torch.rand(n, generator=gen) < 0.5).to(device)
            pos = 0
        idx = perm[pos : pos + bs]
        x = normalize_images(images[idx], *norm)  # (B, 3, S, S)
        obj = patches[idx]  # (B, rows, cols)
        if tc.hflip:
            flip = flips[pos : pos + bs]
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            obj = torch.where(flip[:, None, None], obj.flip(-1), obj)
        pos += bs
        with loop.autocast_for(device, cfg.precision):
            logits, scores = model(x)
        loss = F.binary_cross_entropy_with_logits(logits.float(), labels[idx])
        if tc.premise_loss > 0:
            premise = model.premise_logits(scores.float())  # (B, P)
            loss = loss + tc.premise_loss * F.binary_cross_entropy_with_logits(
                premise, obj.flatten(1).float()
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        loss_sum += loss.detach()
        plan.after_step(step)
        if step % tc.log_every == 0 or step == plan.total:
            k = step % tc.log_every or tc.log_every
            f1 = tower_eval(model, ev_images, ev_labels, ev_patches, norm, len(SHAPES))
            entry = {"step": step, "loss": loss_sum.item() / k, **f1, "time_s": round(plan.elapsed(), 1)}
            history.append(entry)
            loss_sum.zero_()
            loop.log(
                f"[tower] step {step}/{plan.total} loss {entry['loss']:.4f} F1 {f1['f1']:.4f} "
                f"(shape {f1['f1_shape']:.3f}, colour {f1['f1_color']:.3f}); premise: kept "
                f"{f1['premise_kept']:.1%}, recall {f1['premise_recall']:.3f}, AUROC {f1['premise_auroc']:.3f}; "
                f"lr {sched.get_last_lr()[0]:.2e} {entry['time_s']:.0f}s"
            )
        loop.check_stop(state, "tower", snapshot)
    plan.close()
    loop.sync(device)
    seconds = plan.elapsed()
    final = tower_eval(model, ev_images, ev_labels, ev_patches, norm, len(SHAPES))
    metrics = {
        **final,
        "steps": step,
        "seconds": round(seconds, 1),
        "images_seen": step * bs,
        "pool_size": n,
        "eval_size": len(ev_images),
        "history": history,
    }
    loop.log(
        f"[tower] done: {step} steps in {seconds:.0f}s, held-out F1 {final['f1']:.4f}, premise: kept "
        f"{final['premise_kept']:.1%}, recall {final['premise_recall']:.3f}, AUROC {final['premise_auroc']:.3f}"
    )
    return model.tower, metrics
