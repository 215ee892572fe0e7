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

The phases live in ``base_tower`` and ``base_llava``, the loop machinery they share (step plans,
resumable state, stop signals) in ``base_loop``, the data in ``base_data``; this module holds the
recipe's config, ``run``, ``snapshot`` and the command line.

Plain torch loops, no Lightning: this is a fixture builder. Each phase stops at ``max_steps`` or at
its wall-clock budget, whichever comes first; with a budget, the step count is fixed after the first
``calib_steps`` from the measured speed, so the cosine schedule ends where training ends. Runs are
deterministic per seed for a given step count (fix ``max_steps`` and set ``time_budget_s: 0`` to
reproduce a run exactly on the same machine).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from tpkit.config import ConfigError, load_config, save_config, to_dict
from tpkit.training.base_llava import evaluate_vqa, llava_config, param_counts, train_llava
from tpkit.training.base_loop import (
    RecipeState,
    ResumeError,
    code_version,
    install_stop_handlers,
    log,
    resolve_device,
    restore_handlers,
)
from tpkit.training.base_tower import load_tower, train_tower

__all__ = ["TowerConfig", "LMConfig", "EvalConfig", "BaseRecipeConfig", "run", "snapshot", "main"]


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
# The recipe


def _machine(device: torch.device) -> dict[str, Any]:
    import transformers

    info = {
        "device": device.type,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu_cores": os.cpu_count(),
        "tpkit_code": code_version(),
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
    log(f"[base] archived {model_dir} -> {path}")


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
        log(f"[base] --resume: no saved state in {state.dir}, starting from the beginning")
    device = resolve_device(cfg.device)
    workers = base_data.default_workers(cfg.workers)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    log(f"[base] device {device}, {workers} data workers, out {out_dir}")
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
        log(f"[base] parameters: {counts}")
        if counts["total"] > cfg.max_params:
            raise ValueError(
                f"the LLaVA has {counts['total']:,} parameters > max_params = {cfg.max_params:,}: "
                "shrink lm.* or tower.*"
            )

        if tc.init_from:
            tower, tower_metrics = load_tower(tc.init_from, lcfg), {"init_from": tc.init_from, "f1": None}
            log(f"[base] vision tower loaded from {tc.init_from} (phase 1 skipped)")
        elif tower_done is not None:
            tower = CLIPVisionModel(lcfg.vision_config)
            tower.load_state_dict(tower_done["tower"])
            tower_metrics = tower_done["metrics"]
            log(f"[base] vision tower from the interrupted run (F1 {tower_metrics['f1']:.4f}); phase 1 done")
        else:
            pool, held_out = pool_job.result(), held_job.result()
            timings["tower_data_s"] = round(time.perf_counter() - t, 1)
            log(
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
        log(f"[base] WARNING: device-side normalisation differs from the processor by {pixel_diff:.2e}")
    lengths = [len(x) for x in train_set.ids]
    log(
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
            log(f"[base] LLaVA phase budget {budget:.0f}s (total_budget_s {cfg.total_budget_s:.0f}s)")
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
        # wall-clock seconds of this process only: after --resume they miss the earlier processes, whose
        # training time tower.seconds / llava.seconds (each phase's own clock, saved with its state) include
        "timings": timings,
        "machine": _machine(device),
        "config": to_dict(cfg),
    }
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    state.clear()
    for split, r in evaluation.items():
        per = ", ".join(f"{q} {a:.3f}" for q, a in r["per_type"].items())
        log(f"[base] {split}: accuracy {r['accuracy']:.4f} over {r['n']} ({per})")
    log(
        f"[base] tower F1 {tower_metrics['f1'] if tower_metrics['f1'] is None else round(tower_metrics['f1'], 4)}; "
        f"params {counts['total']:,}; "
        f"model.safetensors {size / 1e6:.2f} MB; training seconds, all resumed processes: tower "
        f"{tower_metrics.get('seconds')}, llava {lm_metrics.get('seconds')}; this process's timings {timings}; "
        f"saved to {out_dir}"
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
    log(f"[base] snapshot of {state.dir} at step {summary['step']}/{summary['of_steps']} written to {dest}")
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
    previous = install_stop_handlers()
    try:
        run(cfg, args.out, resume=args.resume)
    except ResumeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"interrupted: {e}" if str(e) else "interrupted", file=sys.stderr)
        return 130
    finally:
        restore_handlers(previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
