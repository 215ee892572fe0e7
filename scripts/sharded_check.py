"""DDP and FSDP side by side on CPU processes (gloo): the same tiny runs, each rank's loss per step, the
checkpoints, the exports, ``--resume`` within and across strategies, the FSDP units and all-gathers.

    python scripts/sharded_check.py --out /tmp/sharded [--families llava qwen] [--steps 4] [--devices 2]

Run as a script, not inside pytest: Lightning's launcher re-executes ``sys.argv`` for rank >= 1, so
every rank runs the same sequence of fits (rank 0 writes files between them, behind a barrier). Per
family (``llava``: the tiny LLaVA on the synthetic data through the real collator; ``qwen``: a tiny
Qwen2.5-VL saved as a local model, on its family's random prompts, as no Qwen processor can be built
offline here), LoRA + both pruning stages + the online teacher (logits and hidden states), ``--steps``
optimizer steps with a checkpoint halfway (``H = steps // 2``):

    <out>/<family>/ddp, fsdp             the whole run (last.ckpt at step H copied to step<H>.ckpt, export/)
    <out>/<family>/fsdp_resumed          fsdp's step-H checkpoint, resumed with fsdp to the end
    <out>/<family>/fsdp_from_ddp         ddp's step-H checkpoint, resumed with fsdp
    <out>/<family>/ddp_from_fsdp         fsdp's step-H checkpoint, resumed with ddp
    <out>/<family>/<run>/rank<r>.json    that rank's loss (and its distillation terms) per step, the
                                         FSDP units and the all-gathers each unit ran per step, seconds

and, for LLaVA, the layout of a GPU run (a bf16 base, fp32 LoRA tensors, bf16 autocast) for ``H``
steps: ``ddp_bf16``, ``fsdp_bf16``.

tests/training/test_sharded.py compares them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

# tiny shapes: a training step takes milliseconds
LLAVA = {"hidden_size": 32, "num_layers": 2, "intermediate_size": 64}
QWEN = dict(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64, vision_layers=2)
TEXT_BEFORE, TEXT_AFTER, ANSWER = 6, 10, 3  # the Qwen prompts: tokens around the image, answer tokens


class RandomPrompts:
    """Collate records ``{"id": "<int>"}`` into the family's random prompts (``Family.random_prompt``,
    seeded by the id), the last ``ANSWER`` tokens supervised: training batches for a family whose
    processor cannot be built offline."""

    def __init__(self, model: torch.nn.Module) -> None:
        from tpkit.models.registry import family_of

        self.model, self.family = model, family_of(model)

    def __call__(self, records: list[dict]) -> dict:
        parts = [
            self.family.random_prompt(self.model, 1, TEXT_BEFORE, TEXT_AFTER, int(r["id"]), "cpu")
            for r in records
        ]
        batch = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        answer = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
        answer[:, -ANSWER:] = True
        batch["labels"] = batch["input_ids"].masked_fill(~answer, -100)
        return {**batch, "answer_mask": answer, "ids": [r["id"] for r in records]}


class Record(L.Callback):
    """Each rank's loss per optimizer step, and under FSDP the units and the all-gathers each ran."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.terms: list[dict[str, float]] = []  # kd, hid: the online teacher's terms
        self.gathers: list[dict[str, int]] = []
        self.units: list[str] = []
        self.t0 = time.perf_counter()
        self._counts: Counter | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        from tpkit.training.sharding import FullyShardedStrategy

        if isinstance(trainer.strategy, FullyShardedStrategy):
            self.units = list(trainer.strategy.units)
            self._counts = _count_gathers()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._counts is not None:
            self._counts.clear()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))
        metrics = trainer.callback_metrics
        self.terms.append({k: float(metrics[f"train/{k}"]) for k in ("kd", "hid") if f"train/{k}" in metrics})
        if self._counts is not None:
            self.gathers.append(dict(self._counts))

    def dump(self, path: Path, rank: int) -> None:
        record = {"losses": self.losses, "terms": self.terms, "units": self.units, "gathers": self.gathers}
        record["seconds"] = time.perf_counter() - self.t0
        (path / f"rank{rank}.json").write_text(json.dumps(record, indent=1))


_GATHERS: Counter = Counter()


def _count_gathers() -> Counter:
    """Count the all-gathers FSDP2 runs, per unit (its module name; the root is "")."""
    from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup

    if not getattr(FSDPParamGroup.unshard, "_counted", False):
        original = FSDPParamGroup.unshard

        def unshard(self, async_op: bool = False):
            if self._all_gather_result is None and not self.is_unsharded:  # a real all-gather
                _GATHERS[self._module_fqn or ""] += 1
            return original(self, async_op)

        unshard._counted = True
        FSDPParamGroup.unshard = unshard
    return _GATHERS


def config(
    family: str,
    out: Path,
    strategy: str,
    steps: int,
    data: Path,
    base: Path,
    devices: int,
    bf16: bool = False,
):
    from tpkit.config import from_dict
    from tpkit.training.config import TrainConfig

    model = {"path": "tiny:llama", "tiny": LLAVA} if family == "llava" else {"path": str(base)}
    model["dtype"] = "bfloat16" if bf16 else "float32"
    # the attention-based stage-1 scores: they use the last tower block's q/k after it ran (a sharded
    # block is gathered again for them); Qwen with gradient checkpointing, as the 7B configs train
    score = "cls_attn" if family == "llava" else "attn_received"
    return from_dict(
        TrainConfig,
        {
            "model": model,
            "pruning": {"stage1": {"min_keep": 2, "score": score}, "stage2": {"layer": 1}},
            "lora": {"r": 4, "alpha": 8.0},
            "distill": {"alpha": 1.0, "temperature": 2.0, "hidden_weight": 1.0},
            "data": {"train_json": str(data), "batch_size": 2, "max_length": 128},
            # a clip below the gradients' norm: the step depends on the norm summed over the shards
            "optim": {"lr": 5e-3, "scheduler": "cosine", "warmup_steps": 1, "grad_clip": 0.05},
            "trainer": {
                "out_dir": str(out),
                "max_steps": steps,
                "accelerator": "cpu",
                "devices": devices,
                "strategy": strategy,
                "logger": "none",
                "progress_bar": False,
                "precision": "bf16-mixed" if bf16 else "32",
                "gradient_checkpointing": family == "qwen",
                "checkpoint_every_n_steps": steps // 2,
                "export_at_end": not bf16,
            },
        },
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--families", nargs="+", default=["llava", "qwen"], choices=["llava", "qwen"])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--devices", type=int, default=2)
    args = ap.parse_args()
    out = Path(args.out)
    data = out / "data" / "train.json"
    qwen_base = out / "qwen_base"
    rank0 = os.environ.get("LOCAL_RANK", "0") == "0"  # rank >= 1 is launched inside the first fit
    torch.set_num_threads(1)  # the ranks share the cores
    from tpkit.synthetic.questions import synthetic_processor

    if rank0 and not data.exists():
        from tpkit.synthetic.splits import generate_split

        generate_split(data.parent, split="train", n=16, seed=0)
    if rank0 and not qwen_base.exists() and "qwen" in args.families:
        from tpkit.models.registry import build_tiny

        build_tiny("qwen2_5_vl", seed=0, **QWEN).save_pretrained(qwen_base)

    from tpkit.training.recipe import build_datamodule, fit

    processor = synthetic_processor(image_size=32, patch_size=8)
    half = args.steps // 2

    def run(
        family: str, name: str, strategy: str, resume_from: Path | None = None, steps: int = args.steps
    ) -> None:
        run_dir = out / family / name
        if resume_from is not None:  # a run dir holding only the checkpoint (and the run's config)
            if int(os.environ.get("LOCAL_RANK", "0")) == 0:
                run_dir.mkdir(parents=True, exist_ok=True)
                shutil.copy(resume_from, run_dir / "last.ckpt")
            torch.distributed.barrier()
        bf16 = name.endswith("_bf16")
        cfg = config(family, run_dir, strategy, steps, data, qwen_base, args.devices, bf16)
        dm = None
        if family == "qwen":
            from tpkit.models.registry import config_builder

            build, model_class = config_builder("qwen2_5_vl")
            with torch.device("meta"):  # the prompts need the config only
                shape = model_class(build(**QWEN))
            records = [{"id": str(i)} for i in range(16)]
            dm = build_datamodule(cfg, processor, train_dataset=records, collate_fn=RandomPrompts(shape))
        record = Record()
        keep = KeepCheckpoint(run_dir, half)
        res = fit(
            cfg, resume=resume_from is not None, processor=processor, datamodule=dm, callbacks=[record, keep]
        )
        record.dump(run_dir, res.module.global_rank)
        torch.distributed.barrier()

    for family in args.families:
        run(family, "ddp", "ddp")
        run(family, "fsdp", "fsdp")
        run(family, "fsdp_resumed", "fsdp", out / family / "fsdp" / f"step{half}.ckpt")
        run(family, "fsdp_from_ddp", "fsdp", out / family / "ddp" / f"step{half}.ckpt")
        run(family, "ddp_from_fsdp", "ddp", out / family / "fsdp" / f"step{half}.ckpt")
        if family == "llava":
            run(family, "ddp_bf16", "ddp", steps=half)
            run(family, "fsdp_bf16", "fsdp", steps=half)
    print(f"rank {os.environ.get('LOCAL_RANK', '0')}: done")


class KeepCheckpoint(L.Callback):
    """Copies ``last.ckpt`` to ``step<N>.ckpt`` once it holds step N (a later save overwrites it)."""

    def __init__(self, run_dir: Path, step: int) -> None:
        self.run_dir, self.step = run_dir, step

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        # after LastCheckpoint's save of this step (callbacks run in order: LastCheckpoint first)
        if trainer.global_step == self.step and trainer.is_global_zero:
            shutil.copy(self.run_dir / "last.ckpt", self.run_dir / f"step{self.step}.ckpt")


if __name__ == "__main__":
    main()
