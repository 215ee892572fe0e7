"""DDP on CPU processes (gloo): train the tiny student a few steps on 2 ranks, dump each rank's weights.

    python scripts/ddp_check.py --out /tmp/ddp [--data train.json] [--steps 2] [--devices 2]
    python scripts/ddp_check.py --out /tmp/ddp --cli --steps 40 --step-seconds 0.5   # then signal a rank

Run as a script, not inside pytest: Lightning's DDP launcher re-executes ``sys.argv`` for rank >= 1
(a Lightning DDP launcher behaviour). Each rank writes ``<out>/rank<r>.pt``: its trainable tensors and the record ids
of the batches it trained on. tests/training/test_ddp.py compares them. ``--teacher-cache DIR``
distills from a teacher cache instead of the online teacher (built first by rank 0 if missing).

``--cli`` runs the same config through ``tpkit train`` (its exit code is the script's) with every
step taking ``--step-seconds`` at least; each rank writes ``<out>/rank<r>.pid`` when training
starts and rank 0 ``<out>/step<N>`` after each step, so that a test can signal one rank mid-run
(tests/training/test_ddp.py: a signal on either rank stops both, with one checkpoint).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install


class Marks(L.Callback):
    """Slow steps and marker files for a test that signals one rank mid-run (``--cli``)."""

    def __init__(self, out: Path, step_seconds: float) -> None:
        self.out, self.step_seconds = out, step_seconds

    def on_train_start(self, trainer, pl_module) -> None:
        (self.out / f"rank{trainer.global_rank}.pid").write_text(str(os.getpid()))

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if trainer.global_rank == 0:
            (self.out / f"step{trainer.global_step}").touch()
        time.sleep(self.step_seconds)


class RecordIds(L.Callback):
    def __init__(self) -> None:
        self.ids: list[list[str]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.ids.append(list(batch["ids"]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--data", default=None, help="train json (default: a 16-record synthetic split in <out>)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--devices", type=int, default=2)
    ap.add_argument(
        "--teacher-cache",
        default=None,
        help="distill from a teacher cache in this directory (rank 0 builds it first when missing)",
    )
    ap.add_argument("--cli", action="store_true", help="run through `tpkit train` (exit code, messages)")
    ap.add_argument("--step-seconds", type=float, default=0.0, help="with --cli: each step takes this long")
    args = ap.parse_args()
    out = Path(args.out)
    data = Path(args.data) if args.data else out / "data" / "train.json"
    if not data.exists() and os.environ.get("LOCAL_RANK", "0") == "0":
        from tpkit.synthetic.splits import generate_split

        generate_split(data.parent, split="train", n=16, seed=0)

    from tpkit.config import from_dict, save_config
    from tpkit.synthetic.questions import synthetic_processor
    from tpkit.training import recipe
    from tpkit.training.config import TrainConfig
    from tpkit.training.recipe import fit

    torch.set_num_threads(1)  # two ranks share the cores
    cfg = from_dict(
        TrainConfig,
        {
            "model": {
                "path": "tiny:llama",
                "tiny": {"hidden_size": 32, "num_layers": 2, "intermediate_size": 64},
            },
            "pruning": {"stage1": {"min_keep": 4}, "stage2": {"layer": 1}},
            "lora": {"r": 4, "alpha": 8.0},
            "distill": {"alpha": 1.0, "teacher_cache": args.teacher_cache},
            "data": {"train_json": str(data), "batch_size": 2, "max_length": 128},
            "optim": {"lr": 5e-3, "scheduler": "constant"},
            "trainer": {
                "out_dir": str(out / "run"),
                "max_steps": args.steps,
                "accelerator": "cpu",
                "devices": args.devices,
                "strategy": "ddp",
                "logger": "none",
                "progress_bar": False,
                "checkpoint_every_n_steps": 0,
                "export_at_end": False,
            },
        },
    )
    processor = synthetic_processor(image_size=32, patch_size=8)
    if args.cli:
        from tpkit.cli import main as tpkit_main

        processor.save_pretrained(str(out / "processor"))
        cfg.model.processor_path = str(out / "processor")
        cfg.trainer.checkpoint_every_n_steps = 3
        save_config(cfg, out / "ddp.yaml")
        build = recipe.build_trainer

        def build_trainer(c, extra_callbacks=None, **kw):  # the test's slow steps and marker files
            return build(c, [*(extra_callbacks or []), Marks(out, args.step_seconds)], **kw)

        recipe.build_trainer = build_trainer
        sys.exit(tpkit_main(["train", "--config", str(out / "ddp.yaml")]))
    cache = Path(args.teacher_cache) if args.teacher_cache else None
    if cache is not None and not (cache / "meta.json").exists() and os.environ.get("LOCAL_RANK", "0") == "0":
        # before fit: the launcher starts rank 1 inside fit, so it finds the cache finished
        from tpkit.training.teacher_cache.build import build_teacher_cache

        build_teacher_cache(cfg, cache, processor=processor, device="cpu", progress=False)
    ids = RecordIds()
    res = fit(cfg, processor=processor, callbacks=[ids])
    rank = res.module.global_rank
    weights = {n: p.detach().cpu() for n, p in res.module.model.named_parameters() if p.requires_grad}
    torch.save(
        {"weights": weights, "ids": ids.ids, "world_size": res.module.trainer.world_size},
        out / f"rank{rank}.pt",
    )
    print(f"rank {rank}: {len(weights)} trainable tensors, {len(ids.ids)} batches")


if __name__ == "__main__":
    main()
