"""The embedded base model: a small LLaVA trained from scratch, in LLaVA's two phases in miniature.

1. **Vision tower.** A ``CLIPVisionModel`` built from a config learns to say which shapes and which
   colours are in a synthetic image, from its CLS output (multi-label BCE, DESIGN.md "Measured: making
   the CLS premise hold"): that is what makes the CLS token a summary of the image, the premise of
   stage-1 pruning. No count or position heads: they destroyed the premise in the measured study.
2. **LLaVA.** The trained tower, frozen, under a fresh 2-layer MLP projector and Llama language model,
   trained with cross-entropy on the answer tokens of the synthetic VQA train split (records encoded
   by ``LlavaCollator`` in train mode). Greedy ``generate`` on the test and ood splits measures the
   dense accuracy per question type.

The result is a stock ``save_pretrained`` directory (``LlavaForConditionalGeneration`` + processor)
with ``metrics.json`` and the resolved ``recipe.yaml`` beside the weights::

    python -m tpkit.training.base_recipe --config configs/base_tiny.yaml --out assets/tiny-llava
    python -m tpkit.training.base_recipe --config configs/base_tiny.yaml --device cpu \\
        --set tower.max_steps=3 lm.max_steps=3 --out /tmp/smoke     # a CPU smoke run

Plain torch loops, no Lightning: this is a fixture builder. Each phase stops at ``max_steps`` or at
its wall-clock budget, whichever comes first; with a budget, the step count is fixed after the first
``calib_steps`` from the measured speed, so the cosine schedule ends where training ends. Runs are
deterministic per seed for a given step count (fix ``max_steps`` and set ``time_budget_s: 0`` to
reproduce a run exactly on the same machine).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import platform
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from tpkit.config import ConfigError, load_config, save_config, to_dict

__all__ = [
    "TowerConfig",
    "LMConfig",
    "EvalConfig",
    "BaseRecipeConfig",
    "resolve_device",
    "vision_config",
    "llava_config",
    "param_counts",
    "train_tower",
    "train_llava",
    "evaluate_vqa",
    "run",
    "main",
]


# --------------------------------------------------------------------------------------------
# Config


@dataclass
class TowerConfig:
    """Phase 1: the CLIP vision tower and its CLS pretraining."""

    image_size: int = 96
    patch_size: int = 8  # 96/8 -> 144 patches
    hidden_size: int = 128
    intermediate_size: int = 512
    num_layers: int = 4
    num_heads: int = 4
    pool_size: int = 65536  # pre-rendered images, reused across epochs with hflip
    eval_size: int = 2048  # held-out images for F1
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 200
    min_lr_ratio: float = 0.05  # cosine decays to lr * min_lr_ratio
    max_steps: int = 8000
    time_budget_s: float = 0.0  # 0 = no time limit
    hflip: bool = True
    # Weight of the premise term: binary cross-entropy of ``scale * cos(CLS, patch) + bias`` at the
    # LLaVA's feature layer (the stage-1 score itself) against which patches are object patches
    # (boxes cover >= 25%); 0 = CLS classification only. Box supervision, so that few patches
    # resemble the CLS token and those are the objects, as the pruner assumes of CLIP: without it a
    # CPU-affordable tower (F1 0.950 after 768k images) scored per-image AUROC 0.75 and recall 0.59
    # at the knee, below the pixel control (assets/README.md).
    premise_loss: float = 0.0
    log_every: int = 200
    # A saved LLaVA directory whose vision tower to use instead of training one (phase 1 skipped;
    # the tower keys above must match its config). For re-running phase 2 on a trained tower.
    init_from: str = ""

    def validate(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"patch_size = {self.patch_size} must divide image_size = {self.image_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"num_heads = {self.num_heads} must divide hidden_size = {self.hidden_size}")
        for name in ("pool_size", "eval_size", "batch_size", "max_steps", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} = {getattr(self, name)} must be >= 1")
        if self.time_budget_s < 0 or self.lr <= 0 or self.premise_loss < 0:
            raise ValueError("time_budget_s and premise_loss must be >= 0 and lr > 0")


@dataclass
class LMConfig:
    """Phase 2: projector + Llama language model on the VQA train split, tower frozen."""

    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2  # < num_heads: grouped-query attention, as the pruner must support
    intermediate_size: int = 512
    n_train: int = 32768  # VQA train records (split "train", indices 0..n_train-1)
    n_val: int = 512  # val records for the teacher-forced accuracy logged during training
    turns: int = 3  # QA turns per train/val record: ~3x the supervised answers per image
    # A last turn "What is in the image?" -> "red circle, blue square, ..." (left to right) on train/val
    # records: dense image-grounded supervision, the miniature of LLaVA's caption alignment phase.
    caption_turn: bool = True
    # One more question on train/val records that have none of type "position" yet, where one can be
    # asked: the hardest type is otherwise ~14% of the questions (base_data.add_position_turn).
    position_turn: bool = False
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup_steps: int = 200
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0
    max_steps: int = 4000
    time_budget_s: float = 0.0  # 0 = no time limit
    log_every: int = 200
    max_length: int = 512  # collator max_length

    def validate(self) -> None:
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must divide hidden_size and num_kv_heads must divide num_heads")
        for name in ("n_train", "n_val", "batch_size", "max_steps", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} = {getattr(self, name)} must be >= 1")
        if not 1 <= self.turns <= 3:
            raise ValueError(f"turns = {self.turns} must be 1, 2 or 3")
        if self.batch_size > self.n_train:
            raise ValueError(f"batch_size = {self.batch_size} > n_train = {self.n_train}")
        if self.time_budget_s < 0 or self.lr <= 0:
            raise ValueError("time_budget_s must be >= 0 and lr > 0")


@dataclass
class EvalConfig:
    """Dense greedy-generation accuracy on the test and ood splits."""

    n_test: int = 1000
    n_ood: int = 500  # 0 = skip
    batch_size: int = 250
    max_new_tokens: int = 6

    def validate(self) -> None:
        if self.n_test < 1 or self.n_ood < 0 or self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError("need n_test >= 1, n_ood >= 0, batch_size >= 1, max_new_tokens >= 1")


@dataclass
class BaseRecipeConfig:
    seed: int = 0  # model init, batch order, augmentation
    data_seed: int = 0  # synthetic records (seed 0 = the benchmark's splits)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when present
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 autocast on cuda, fp32 on cpu
    # The language model's attention kernel while the LLaVA phase trains (the saved model is loaded
    # with whatever its user asks for; transformers' default is sdpa). On a CPU, eager ran a LLaVA
    # step of this recipe in 0.89x sdpa's time (791 vs 889 ms, 2 Zen 4 cores, bf16, batch 32 x 250
    # tokens, left padding: benchmarks/base_step.py); on a GPU, sdpa (flash) is the right choice.
    attention: Literal["sdpa", "eager"] = "sdpa"
    workers: int = 0  # data-generation processes; 0 = every core
    max_params: int = 3_500_000  # refuse to train a model whose fp32 weights would not fit the fixture
    # Whole-run deadline in seconds (0 = none): the LLaVA phase gets at most what is left of it after
    # data and tower, minus ``eval_reserve_s`` for saving and evaluation.
    total_budget_s: float = 0.0
    eval_reserve_s: float = 30.0
    # write a tar of the model directory right after saving, before evaluation (a GPU lease can end
    # at any time: what was packed comes back, what was not is lost); None = no archive
    archive: str | None = None
    # Save the training state to ``OUT/.resume/`` every this many seconds (0 = only when stopped by
    # Ctrl-C / SIGTERM); ``--resume`` continues from it. For long CPU runs; a GPU run takes minutes.
    checkpoint_every_s: float = 0.0
    tower: TowerConfig = field(default_factory=TowerConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# --------------------------------------------------------------------------------------------
# Small helpers


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but torch.cuda.is_available() is False")
    return torch.device(name)


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _log(msg: str) -> None:
    tqdm.write(msg, file=sys.stdout)
    sys.stdout.flush()


class StepPlan:
    """How many steps a phase runs: ``max_steps``, or fewer if ``budget_s`` would run out.

    ``total`` is first set at step ``calib[1]`` from the seconds per step measured since step
    ``calib[0]``, then re-estimated every ``replan_every`` steps from the latest window (the first
    steps can be slow while data workers still load the CPU), so that a cosine schedule reading
    ``total`` ends where training ends. ``expired`` is a hard stop at the budget.
    """

    def __init__(
        self,
        max_steps: int,
        budget_s: float,
        device: torch.device,
        calib: tuple[int, int] = (10, 40),
        replan_every: int = 250,
    ):
        self.total = max_steps
        self.max_steps = max_steps
        self.budget_s = budget_s
        self.device = device
        self.calib = calib
        self.replan_every = replan_every
        self.t0 = time.perf_counter()
        self._mark: tuple[int, float] | None = None

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def after_step(self, done: int) -> None:
        if not self.budget_s or self.max_steps <= self.calib[1]:
            return
        first, second = self.calib
        if done == first or (done > second and (done - second) % self.replan_every == 0) or done == second:
            _sync(self.device)
            now = time.perf_counter()
            if done > first and self._mark is not None:
                per_step = (now - self._mark[1]) / (done - self._mark[0])
                left = self.budget_s - (now - self.t0)
                self.total = max(done + 1, min(self.max_steps, done + int(0.98 * left / per_step)))
            self._mark = (done, now)

    def expired(self) -> bool:
        return bool(self.budget_s) and self.elapsed() > self.budget_s


# Set by the SIGINT/SIGTERM handler that ``main`` installs: the training loops see it at the next step
# boundary, save their state (a consistent one, never half a step) and stop with KeyboardInterrupt.
_STOP = {"requested": False}


def _install_stop_handlers() -> dict[int, Any]:
    """First Ctrl-C / SIGTERM: stop at the next step boundary with the state saved; second: now.

    Returns the previous handlers (for :func:`_restore_handlers`).
    """
    import signal

    def handler(signum: int, frame: Any) -> None:
        if _STOP["requested"]:
            raise KeyboardInterrupt
        _STOP["requested"] = True
        _log(
            f"[base] {signal.Signals(signum).name}: saving the state at the end of this step (again to abort)"
        )

    _STOP["requested"] = False
    return {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}


def _restore_handlers(previous: dict[int, Any]) -> None:
    import signal

    for sig, h in previous.items():
        signal.signal(sig, h)
    _STOP["requested"] = False


# Keys that may change between an interrupted run and its ``--resume`` (where and how fast it runs,
# not what it computes, up to floating-point rounding).
_RESUME_FREE_KEYS = ("device", "workers", "archive", "checkpoint_every_s", "attention")


class ResumeError(RuntimeError):
    """An interrupted run's state is in the way (no ``--resume``) or does not fit (another config)."""


class RecipeState:
    """The recipe's resumable state in ``OUT/.resume/``: one file per phase, written atomically.

    ``tower.pt`` / ``llava.pt`` hold a phase in progress (weights, optimiser, scheduler, sampler and
    generator states, history); ``tower_done.pt`` the finished tower, so that a resumed run skips
    phase 1 and its data. Each file carries the resolved config (less :data:`_RESUME_FREE_KEYS`);
    resuming under a different one is refused, naming the keys. Removed when the recipe finishes.
    """

    def __init__(self, out_dir: Path, cfg: BaseRecipeConfig, enabled: bool = True):
        self.dir = Path(out_dir) / ".resume"
        self.every_s = cfg.checkpoint_every_s
        self.enabled = enabled
        self.config = {k: v for k, v in to_dict(cfg).items() if k not in _RESUME_FREE_KEYS}
        self.code = _code_version() if enabled else None
        self.last = time.perf_counter()

    def due(self) -> bool:
        return self.enabled and self.every_s > 0 and time.perf_counter() - self.last >= self.every_s

    def save(self, name: str, state: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"{name}.pt"
        tmp = path.with_suffix(".tmp")
        torch.save({"config": self.config, "code": self.code, **state}, tmp)
        os.replace(tmp, path)
        self.last = time.perf_counter()

    def load(self, name: str, resuming: bool = True) -> dict[str, Any] | None:
        """The saved state (on the CPU: ``load_state_dict`` moves it where it belongs), or None.

        Its ``code`` is the tpkit version that saved it; ``resuming`` warns when that is not this one.
        """
        path = self.dir / f"{name}.pt"
        if not (self.enabled and path.exists()):
            return None
        state = torch.load(path, map_location="cpu", weights_only=True)
        saved = state.pop("config")
        code = state.setdefault("code", None)
        if resuming and code != self.code:
            _log(
                f"[base] WARNING: {path} was saved by tpkit {code}, this is {self.code}: the resumed run mixes both"
            )
        diff = _config_diff(_phase_view(saved, name), _phase_view(self.config, name))
        if diff:
            hint = (
                f"remove {path} to retrain the LLaVA phase on the finished tower, or {self.dir} to start over"
                if name == "llava"
                else f"remove {self.dir} to start over"
            )
            raise ResumeError(
                f"{path} was saved under another config; differing keys (saved -> now): "
                + ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
                + f". Resume with the same config, or {hint}."
            )
        return state

    def verify(self) -> None:
        """Check every saved file's config now, before minutes of data rendering (see :meth:`load`)."""
        for path in sorted(self.dir.glob("*.pt")):
            self.load(path.stem)

    def remove(self, name: str) -> None:
        (self.dir / f"{name}.pt").unlink(missing_ok=True)

    def clear(self) -> None:
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)


# What phase 1 depends on: a finished (or half-trained) tower is reused when only the LLaVA phase's
# settings changed, e.g. to retrain phase 2 without repeating hours of CPU tower training.
_TOWER_KEYS = ("seed", "precision", "tower")


def _phase_view(config: dict, name: str) -> dict:
    return {k: config.get(k) for k in _TOWER_KEYS} if name.startswith("tower") else config


def _config_diff(a: dict, b: dict, prefix: str = "") -> dict[str, tuple[Any, Any]]:
    out: dict[str, tuple[Any, Any]] = {}
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            out.update(_config_diff(x, y, f"{prefix}{k}."))
        elif x != y:
            out[f"{prefix}{k}"] = (x, y)
    return out


def _loop_state(model: nn.Module, opt: Any, sched: Any, plan: StepPlan, step: int, history: list) -> dict:
    """What every phase's snapshot holds (each adds its sampler and running sums)."""
    return {
        "model": model.state_dict(),
        "opt": opt.state_dict(),
        "sched": sched.state_dict(),
        "step": step,
        "history": history,
        "plan_total": plan.total,
        "elapsed": plan.elapsed(),
    }


def _restore_loop(
    saved: dict, model: nn.Module, opt: Any, sched: Any, plan: StepPlan
) -> tuple[int, list, float]:
    """Load :func:`_loop_state` back -> (step, history, seconds already trained)."""
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    sched.load_state_dict(saved["sched"])
    plan.total = int(saved["plan_total"])
    return int(saved["step"]), list(saved["history"]), float(saved["elapsed"])


def _check_stop(state: RecipeState, name: str, snapshot: Any) -> None:
    """At a step boundary: save ``snapshot()`` when due or when a stop was requested (then stop)."""
    if _STOP["requested"]:
        state.save(name, snapshot())
        _STOP["requested"] = False
        raise KeyboardInterrupt(f"stopped; state saved in {state.dir} (continue with --resume)")
    if state.due():
        state.save(name, snapshot())


def _lr_lambda(plan: StepPlan, warmup: int, min_ratio: float):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, plan.total - warmup))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def _adamw(model: nn.Module, lr: float, weight_decay: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW with decay on matrices only (not on norms, biases, embeddings of position)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and "position_embedding" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), fused=device.type == "cuda")


# --------------------------------------------------------------------------------------------
# Model configs


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


# --------------------------------------------------------------------------------------------
# Phase 1: the vision tower


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


# The LLaVA's vision_feature_layer: its patch features, and where stage 1 scores them against CLS.
FEATURE_LAYER = -2


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


def _load_tower(path: str, lcfg: Any) -> Any:
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
    state: RecipeState | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Phase 1 -> (trained ``CLIPVisionModel`` on ``device``, metrics).

    With ``state``, continues from its ``tower.pt`` if there is one and saves into it when due or
    when a stop is requested (see :class:`RecipeState`).
    """
    from tpkit.data.synthetic import SHAPES
    from tpkit.training.base_data import image_norm, normalize_images

    tc = cfg.tower
    torch.manual_seed(cfg.seed)
    model = CLSClassifier(vision_config(tc), pool[1].shape[1]).to(device).train()
    opt = _adamw(model, tc.lr, tc.weight_decay, device)
    plan = StepPlan(tc.max_steps, tc.time_budget_s, device)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(plan, tc.warmup_steps, tc.min_lr_ratio))
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
    state = state or RecipeState(Path("."), cfg, enabled=False)
    saved = state.load("tower")
    if saved is not None:
        step, history, elapsed0 = _restore_loop(saved, model, opt, sched, plan)
        gen.set_state(saved["gen"])
        perm, flips, pos = saved["perm"].to(device), saved["flips"].to(device), int(saved["pos"])
        loss_sum += saved["loss_sum"].to(device)
        _log(f"[tower] resumed at step {step}/{plan.total} from {state.dir}")

    def snapshot() -> dict[str, Any]:
        return {
            **_loop_state(model, opt, sched, plan, step, history),
            "gen": gen.get_state(),
            "perm": perm,
            "flips": flips,
            "pos": pos,
            "loss_sum": loss_sum,
        }

    bar = tqdm(total=plan.total, initial=step, desc="tower", unit="step", dynamic_ncols=True, mininterval=2.0)
    plan.t0 = time.perf_counter() - elapsed0
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
        with _autocast(device, cfg.precision):
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
        if bar.total != plan.total:
            bar.total = plan.total
        bar.update()
        if step % tc.log_every == 0 or step == plan.total:
            k = step % tc.log_every or tc.log_every
            f1 = tower_eval(model, ev_images, ev_labels, ev_patches, norm, len(SHAPES))
            entry = {"step": step, "loss": loss_sum.item() / k, **f1, "time_s": round(plan.elapsed(), 1)}
            history.append(entry)
            loss_sum.zero_()
            _log(
                f"[tower] step {step}/{plan.total} loss {entry['loss']:.4f} F1 {f1['f1']:.4f} "
                f"(shape {f1['f1_shape']:.3f}, colour {f1['f1_color']:.3f}); premise: kept "
                f"{f1['premise_kept']:.1%}, recall {f1['premise_recall']:.3f}, AUROC {f1['premise_auroc']:.3f}; "
                f"lr {sched.get_last_lr()[0]:.2e} {entry['time_s']:.0f}s"
            )
        _check_stop(state, "tower", snapshot)
    bar.close()
    _sync(device)
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
    _log(
        f"[tower] done: {step} steps in {seconds:.0f}s, held-out F1 {final['f1']:.4f}, premise: kept "
        f"{final['premise_kept']:.1%}, recall {final['premise_recall']:.3f}, AUROC {final['premise_auroc']:.3f}"
    )
    return model.tower, metrics


# --------------------------------------------------------------------------------------------
# Phase 2: projector + language model


def _answer_loss(
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
        with _autocast(device, precision):
            _, correct, sel = _answer_loss(model, ids, mask, labels, normalize_images(imgs, *norm))
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
    state: RecipeState | None = None,
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
    opt = _adamw(model, lc.lr, lc.weight_decay, device)
    plan = StepPlan(lc.max_steps, lc.time_budget_s, device)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(plan, lc.warmup_steps, lc.min_lr_ratio))
    trainable = [p for p in model.parameters() if p.requires_grad]
    step, history = 0, []
    loss_sum, acc_sum = torch.zeros((), device=device), torch.zeros((), device=device)
    elapsed0 = 0.0
    state = state or RecipeState(Path("."), cfg, enabled=False)
    saved = state.load("llava")
    if saved is not None:
        step, history, elapsed0 = _restore_loop(saved, model, opt, sched, plan)
        data.load_state_dict(saved["data"])
        loss_sum += saved["loss_sum"].to(device)
        acc_sum += saved["acc_sum"].to(device)
        _log(f"[llava] resumed at step {step}/{plan.total} from {state.dir}")

    def snapshot() -> dict[str, Any]:
        return {
            **_loop_state(model, opt, sched, plan, step, history),
            "data": data.state_dict(),
            "loss_sum": loss_sum,
            "acc_sum": acc_sum,
        }

    bar = tqdm(total=plan.total, initial=step, desc="llava", unit="step", dynamic_ncols=True, mininterval=2.0)
    plan.t0 = time.perf_counter() - elapsed0
    while step < plan.total and not plan.expired():
        ids, mask, labels, imgs = data.sample(lc.batch_size)
        with _autocast(device, cfg.precision):
            loss, correct, sel = _answer_loss(model, ids, mask, labels, normalize_images(imgs, *norm))
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
        if bar.total != plan.total:
            bar.total = plan.total
        bar.update()
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
            _log(
                f"[llava] step {step}/{plan.total} loss {entry['loss']:.4f} train tok acc "
                f"{entry['train_token_acc']:.3f} val answer acc {v['answer_acc']:.3f} "
                f"lr {sched.get_last_lr()[0]:.2e} {entry['time_s']:.0f}s; answers right, val/train: {gap}"
            )
        _check_stop(state, "llava", snapshot)
    bar.close()
    if state.every_s > 0:
        state.save("llava", snapshot())
    _sync(device)
    seconds = plan.elapsed()
    model.eval()
    model.set_attn_implementation({"text_config": "sdpa"})
    _log(f"[llava] done: {step} steps in {seconds:.0f}s")
    return {
        "steps": step,
        "seconds": round(seconds, 1),
        "samples_seen": step * lc.batch_size,
        "epochs": round(step * lc.batch_size / len(train_set), 2),
        "history": history,
    }


# --------------------------------------------------------------------------------------------
# Evaluation: dense greedy generation


def _norm_answer(text: str) -> str:
    return text.strip().strip(".").strip().lower()


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
            ok = _norm_answer(text) == _norm_answer(gold)
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


# --------------------------------------------------------------------------------------------
# The recipe


def _code_version() -> str | None:
    """``git describe`` of the tpkit checkout (``-dirty`` with local changes), None outside git."""
    import subprocess

    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=12"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _machine(device: torch.device) -> dict[str, Any]:
    import transformers

    info = {
        "device": device.type,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu_cores": os.cpu_count(),
        "tpkit_code": _code_version(),
        "platform": platform.platform(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _archive(model_dir: Path, path: str | Path) -> None:
    """Tar ``model_dir`` (as its own name) into ``path`` atomically."""
    import tarfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tarfile.open(tmp, "w") as tar:
        tar.add(model_dir, arcname=model_dir.name)
    os.replace(tmp, path)
    _log(f"[base] archived {model_dir} -> {path}")


def run(cfg: BaseRecipeConfig, out_dir: str | Path, resume: bool = False) -> dict[str, Any]:
    """Data -> tower -> LLaVA -> save -> reload with stock classes -> evaluate. Returns metrics.

    ``resume``: continue from the state an interrupted run left in ``out_dir/.resume`` (see
    :class:`RecipeState`); without it, such a state is an error rather than silently overwritten.
    """
    from transformers import CLIPVisionModel, LlavaForConditionalGeneration, LlavaProcessor

    from tpkit.data.collator import LlavaCollator
    from tpkit.data.processor import build_processor
    from tpkit.training import base_data

    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = RecipeState(out_dir, cfg)
    if state.dir.exists() and any(state.dir.glob("*.pt")):
        if not resume:
            raise ResumeError(
                f"{state.dir} holds the state of an interrupted run: pass --resume to continue it, "
                "or remove that directory to start over"
            )
        state.verify()
    elif resume:
        _log(f"[base] --resume: no saved state in {state.dir}, starting from the beginning")
    device = resolve_device(cfg.device)
    workers = base_data.default_workers(cfg.workers)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _log(f"[base] device {device}, {workers} data workers, out {out_dir}")
    timings: dict[str, float] = {}

    # The process pool forks first: before CUDA and before any multi-threaded torch work here.
    tc, lc, ev = cfg.tower, cfg.lm, cfg.eval
    processor = build_processor(image_size=tc.image_size, patch_size=tc.patch_size)
    coll = LlavaCollator(processor, max_length=lc.max_length, mode="train")
    t = time.perf_counter()
    tower_done = state.load("tower_done")
    if tower_done is not None:
        timings.update(tower_done["timings"])
    with base_data.DataWorkers(workers, coll) as dw:
        # queued in this order: the tower's images first, the VQA sets render while the tower trains
        if not tc.init_from and tower_done is None:
            pool_job = dw.tower_images(tc.pool_size, 2 * cfg.seed, tc.patch_size, "tower pool")
            held_job = dw.tower_images(tc.eval_size, 2 * cfg.seed + 1, tc.patch_size, "tower held-out")
        kw = {"turns": lc.turns, "caption": lc.caption_turn, "position": lc.position_turn}
        # a run that checkpoints keeps its rendered VQA data beside the state (6 GB on disk for the
        # CPU config's train split), so that --resume does not spend minutes rendering it again
        cache = state.dir / "data" if state.every_s > 0 else None

        def vqa(split: str, n: int, **kw: Any) -> Any:
            return dw.vqa(split, n, cfg.data_seed, cache=cache / split if cache else None, **kw)

        train_job = vqa("train", lc.n_train, **kw)
        val_job = vqa("val", lc.n_val, **kw)
        test_job = vqa("test", ev.n_test, encode=False)
        ood_job = vqa("ood", ev.n_ood, encode=False) if ev.n_ood else None

        # The model's size is known before any training: refuse early if it cannot be the fixture.
        lcfg = llava_config(cfg, processor)
        counts = param_counts(LlavaForConditionalGeneration(lcfg))
        _log(f"[base] parameters: {counts}")
        if counts["total"] > cfg.max_params:
            raise ValueError(
                f"the LLaVA has {counts['total']:,} parameters > max_params = {cfg.max_params:,}: "
                "shrink lm.* or tower.*"
            )

        if tc.init_from:
            tower, tower_metrics = _load_tower(tc.init_from, lcfg), {"init_from": tc.init_from, "f1": None}
            _log(f"[base] vision tower loaded from {tc.init_from} (phase 1 skipped)")
        elif tower_done is not None:
            tower = CLIPVisionModel(lcfg.vision_config)
            tower.load_state_dict(tower_done["tower"])
            tower_metrics = tower_done["metrics"]
            _log(f"[base] vision tower from the interrupted run (F1 {tower_metrics['f1']:.4f}); phase 1 done")
        else:
            pool, held_out = pool_job.result(), held_job.result()
            timings["tower_data_s"] = round(time.perf_counter() - t, 1)
            _log(
                f"[base] tower images ready in {timings['tower_data_s']:.0f}s: {len(pool[0])} + {len(held_out[0])}"
            )
            # Phase 1 (the VQA data keeps rendering in the workers meanwhile)
            t = time.perf_counter()
            tower, tower_metrics = train_tower(cfg, pool, held_out, processor, device, state)
            timings["tower_s"] = round(time.perf_counter() - t, 1)
            del pool
            if state.every_s > 0 or state.dir.exists():
                state.save(
                    "tower_done", {"tower": tower.state_dict(), "metrics": tower_metrics, "timings": timings}
                )
                state.remove("tower")

        t = time.perf_counter()
        train_set, val_set, test_set = train_job.result(), val_job.result(), test_job.result()
        ood_set = ood_job.result() if ood_job is not None else None
        timings["vqa_data_wait_s"] = round(time.perf_counter() - t, 1)
    pixel_diff = base_data.pixel_check(processor, train_set.images[:16])
    if pixel_diff > 1e-4:
        _log(f"[base] WARNING: device-side normalisation differs from the processor by {pixel_diff:.2e}")
    lengths = [len(x) for x in train_set.ids]
    _log(
        f"[base] VQA data ready (waited {timings['vqa_data_wait_s']:.0f}s after the tower): train "
        f"{len(train_set)} (tokens {min(lengths)}-{max(lengths)}), val {len(val_set)}, test {len(test_set)}, "
        f"ood {len(ood_set) if ood_set else 0}; pixel check {pixel_diff:.1e}"
    )

    # Phase 2
    torch.manual_seed(cfg.seed + 1)
    model = LlavaForConditionalGeneration(lcfg)
    missing = model.model.vision_tower.load_state_dict(tower.state_dict())
    if missing.missing_keys or missing.unexpected_keys:
        raise RuntimeError(f"tower weights do not fit the LLaVA's vision tower: {missing}")
    del tower
    model.to(device)
    if cfg.total_budget_s:
        left = cfg.total_budget_s - (time.perf_counter() - t_start) - cfg.eval_reserve_s
        budget = max(10.0, min(lc.time_budget_s or math.inf, left))
        if budget != lc.time_budget_s:
            _log(f"[base] LLaVA phase budget {budget:.0f}s (total_budget_s {cfg.total_budget_s:.0f}s)")
            cfg = dataclasses.replace(cfg, lm=dataclasses.replace(lc, time_budget_s=budget))
    t = time.perf_counter()
    lm_metrics = train_llava(cfg, model, train_set, val_set, processor, device, state)
    timings["llava_s"] = round(time.perf_counter() - t, 1)

    # Save as a stock directory, then evaluate what was saved.
    _save_model(model, processor, out_dir)
    save_config(cfg, out_dir / "recipe.yaml")
    size = (out_dir / "model.safetensors").stat().st_size
    if cfg.archive:
        _archive(out_dir, cfg.archive)
    del model
    t = time.perf_counter()
    reloaded = LlavaForConditionalGeneration.from_pretrained(out_dir).to(device).eval()
    processor = LlavaProcessor.from_pretrained(out_dir)
    evaluation = {
        "test": evaluate_vqa(reloaded, processor, test_set, device, ev.batch_size, ev.max_new_tokens, "test")
    }
    if ood_set is not None:
        evaluation["ood"] = evaluate_vqa(
            reloaded, processor, ood_set, device, ev.batch_size, ev.max_new_tokens, "ood"
        )
    timings["eval_s"] = round(time.perf_counter() - t, 1)
    timings["total_s"] = round(time.perf_counter() - t_start, 1)

    metrics = {
        "tower": tower_metrics,
        "llava": lm_metrics,
        "eval": evaluation,
        "params": counts,
        "model_safetensors_bytes": size,
        "pixel_check_max_abs": pixel_diff,
        "train_tokens_per_record": {"min": min(lengths), "max": max(lengths)},
        "timings": timings,
        "machine": _machine(device),
        "config": to_dict(cfg),
    }
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    state.clear()
    for split, r in evaluation.items():
        per = ", ".join(f"{q} {a:.3f}" for q, a in r["per_type"].items())
        _log(f"[base] {split}: accuracy {r['accuracy']:.4f} over {r['n']} ({per})")
    _log(
        f"[base] tower F1 {tower_metrics['f1'] if tower_metrics['f1'] is None else round(tower_metrics['f1'], 4)}; "
        f"params {counts['total']:,}; "
        f"model.safetensors {size / 1e6:.2f} MB; timings {timings}; saved to {out_dir}"
    )
    return metrics


def _save_model(model: Any, processor: Any, out_dir: Path) -> None:
    """``model`` in fp32 (generation ids from the tokenizer) and ``processor`` as a stock directory."""
    model.to(torch.float32)
    tok = processor.tokenizer
    gc = model.generation_config
    gc.bos_token_id, gc.eos_token_id, gc.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)


def snapshot(cfg: BaseRecipeConfig, out_dir: str | Path, dest: str | Path) -> dict[str, Any]:
    """Write the LLaVA phase's last saved state in ``out_dir/.resume`` as a stock model directory
    ``dest`` (weights, processor, ``snapshot.json``), to evaluate a long run while it goes on.

    Reads only what the run writes atomically, so it is safe beside the running process; refuses a
    state saved under another config, as ``--resume`` does. Returns the snapshot's summary.
    """
    from transformers import LlavaForConditionalGeneration

    from tpkit.data.processor import build_processor

    state = RecipeState(Path(out_dir), cfg)
    saved = state.load("llava", resuming=False)
    if saved is None:
        raise ResumeError(f"no LLaVA-phase state in {state.dir}: the run has not saved phase 2 yet")
    processor = build_processor(image_size=cfg.tower.image_size, patch_size=cfg.tower.patch_size)
    model = LlavaForConditionalGeneration(llava_config(cfg, processor))
    model.load_state_dict(saved["model"])
    dest = Path(dest)
    _save_model(model, processor, dest)
    summary = {
        "run": str(out_dir),
        "step": int(saved["step"]),
        "of_steps": int(saved["plan_total"]),
        "train_seconds": round(float(saved["elapsed"]), 1),
        "last_log": saved["history"][-1] if saved["history"] else None,
        "code": saved["code"],
    }
    (dest / "snapshot.json").write_text(json.dumps(summary, indent=1) + "\n")
    _log(f"[base] snapshot of {state.dir} at step {summary['step']}/{summary['of_steps']} written to {dest}")
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m tpkit.training.base_recipe",
        description="Train the embedded tiny LLaVA from scratch (vision tower, then projector + LM).",
    )
    ap.add_argument("--config", required=True, help="YAML file (see configs/base_tiny.yaml)")
    ap.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides, e.g. lm.max_steps=3"
    )
    ap.add_argument("--out", required=True, help="output directory (the model directory)")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None, help="overrides 'device'")
    ap.add_argument("--archive", default=None, help="tar the model dir here right after saving (GPU leases)")
    ap.add_argument(
        "--resume",
        action="store_true",
        help="continue the interrupted run whose state is in OUT/.resume (same config; see checkpoint_every_s)",
    )
    ap.add_argument(
        "--snapshot",
        default=None,
        metavar="DIR",
        help="write the LLaVA phase's last saved state in OUT/.resume as a model directory DIR and exit "
        "(to evaluate a long run while it goes on; the run is not touched)",
    )
    args = ap.parse_args(argv)
    overrides = list(args.set)
    if args.archive is not None:
        overrides.append(f"archive={args.archive}")
    if args.device is not None:
        overrides.append(f"device={args.device}")
    try:
        cfg = load_config(BaseRecipeConfig, args.config, overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.snapshot is not None:
        try:
            snapshot(cfg, args.out, args.snapshot)
        except ResumeError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    previous = _install_stop_handlers()
    try:
        run(cfg, args.out, resume=args.resume)
    except ResumeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"interrupted: {e}" if str(e) else "interrupted", file=sys.stderr)
        return 130
    finally:
        _restore_handlers(previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
