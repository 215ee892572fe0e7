"""``tpkit``: one command for every job.

    tpkit train --config configs/train/tiny.yaml [--set optim.lr=1e-4 ...] [--resume]
    tpkit evaluate --config configs/eval/tiny.yaml [--set adapter=runs/tiny/export ...]
    tpkit export --ckpt runs/tiny/last.ckpt --out runs/tiny/export [--merged]
    tpkit teacher-cache --config configs/train/tiny.yaml --out runs/teacher_cache
    tpkit data synthetic --out runs/data/synthetic
    tpkit demo
    tpkit heldout
    tpkit fixture --config configs/fixture/tiny_gpu.yaml --out assets/tiny-llava
    tpkit premise --model assets/tiny-llava --data runs/data/synthetic --out outputs/premise
    tpkit lmms-task --data runs/data/synthetic/test.json --out runs/lmms_task
    tpkit config-reference --check

Every subcommand has ``--help``; the config-driven ones take ``--set key.sub=value`` (repeatable)
and ``--print-config`` (the resolved config with each key's comment). Configs are checked before
anything heavy is imported: the modules behind each command are imported inside it, for start-up
time (``tpkit --help`` and a config error answer in well under a second).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tpkit.config import (
    ConfigError,
    commented_yaml,
    load_config,
    reference_markdown,
    to_dict,
    unwritable_dir,
)
from tpkit.models.config import ModelSourceError

__all__ = ["main", "build_parser", "CONFIG_REFERENCE"]

CONFIG_REFERENCE = "docs/config.md"

# ``tpkit data synthetic --split``: the splits of tpkit.synthetic.scenes.SPLITS (a test keeps the two
# equal), said here so that --help needs no import of the generator
SYNTHETIC_SPLITS: dict[str, str] = {
    "train": "the demo's training scenes",
    "val": "the same generator",
    "test": "the same generator",
    "ood": "5-8 objects of 8-24 px",
    "fill": "held out: 1-3 objects of 26-40 px that fill the image",
    "clutter": "held out: 2.5x the background texture, ~3x the clutter",
    "palette": "held out: other shades of the colours, on saturated backgrounds",
    "crowd": "held out: 7-10 objects of 8-13 px",
    "small": "held out: objects of 6-9 px",
    "wording": "held out: the training generator's scenes, the questions in other words",
}


class _Fail(Exception):
    """A user-facing error: printed as ``error: <message>``, exit code 2."""


def _config_args(p: argparse.ArgumentParser, *, required: bool = True, default: str | None = None) -> None:
    p.add_argument(
        "--config",
        required=required,
        help="YAML file (relative paths in it are relative to its directory)"
        + (f"; default: {default}" if default else ""),
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set optim.lr=1e-4 (repeatable; several after one --set)",
    )
    p.add_argument(
        "--print-config", action="store_true", help="print the resolved config with comments and exit"
    )


def _load(cls: type, args: argparse.Namespace, extra: list[str] | None = None) -> Any:
    try:
        return load_config(cls, args.config, [*args.overrides, *(extra or [])])
    except ConfigError as e:
        raise _Fail(f"config error: {e}") from None


def _check_data(data: Any, keys: list[str]) -> None:
    """Every data file's records and images, before any heavy import (about a second)."""
    from tpkit.data.errors import LlavaDataError
    from tpkit.data.records import precheck

    try:
        precheck(data, keys)
    except LlavaDataError as e:
        raise _Fail(str(e)) from None


def _printed(cfg: Any, args: argparse.Namespace) -> bool:
    if args.print_config:
        print(commented_yaml(cfg), end="")
    return args.print_config


# --------------------------------------------------------------------------------------------
# train / evaluate / export / teacher-cache


def _command(args: argparse.Namespace) -> str:
    """The command line that ran, as a user would type it again (less --resume and --overwrite)."""
    argv = [a for a in args.argv if a not in ("--resume", "--overwrite")]
    if args.prog != "tpkit":  # train.py / evaluate.py: the subcommand is implied
        return " ".join(["python", args.prog, *map(shlex.quote, argv[1:])])
    return " ".join(["tpkit", *map(shlex.quote, argv)])


def _checkpoint_hint(out: Path, command: str) -> str:
    """Where an ended run can continue from, when it left a checkpoint."""
    ckpt = out / "last.ckpt"
    if not ckpt.is_file():
        return ""
    return f"\nthe checkpoint {ckpt} is intact; continue with: {command} --resume"


def _train(args: argparse.Namespace) -> int:
    from tpkit.training.config import TrainConfig
    from tpkit.training.rundir import RunDirError
    from tpkit.training.runlock import run_lock

    cfg = _load(TrainConfig, args)
    if _printed(cfg, args):
        return 0
    # the model, data and teacher-cache paths and every record: before the lock, before anything is written
    if why := cfg.missing_inputs():
        raise _Fail(why)
    _check_data(cfg.data, ["train_json", "val_json"])
    out = Path(cfg.trainer.out_dir)
    command = _command(args)
    if args.resume and args.overwrite:
        raise _Fail("--resume continues the run in trainer.out_dir, --overwrite removes it: give one")
    flags = " --resume" if args.resume else " --overwrite" if args.overwrite else ""
    with contextlib.ExitStack() as stack:
        try:  # first: a live run's directory is refused at once, naming its owner
            note = stack.enter_context(run_lock(out, command + flags))
        except RunDirError as e:
            raise _Fail(str(e)) from None
        except OSError as e:
            raise _Fail(
                unwritable_dir(out, "trainer.out_dir") or f"trainer.out_dir {str(out)!r}: {e}"
            ) from None
        if note:
            print(note, file=sys.stderr)
        return _train_locked(args, cfg, out, command)


def _train_locked(args: argparse.Namespace, cfg: Any, out: Path, command: str) -> int:
    """``tpkit train`` once this process holds ``out`` (or is a DDP rank inside the run that does)."""
    from tpkit.training.rundir import (
        SKIPPED,
        CheckpointError,
        RunDirError,
        RunFinished,
        check_run_dir,
        new_run_refusal,
    )

    if not args.resume and not args.overwrite and (why := new_run_refusal(out, command)):
        raise _Fail(why)
    if args.resume:  # the checkpoint's config against this one (torch only: a second or so)
        try:
            check_run_dir(cfg, resume=True, announce=False)
        except RunFinished as e:
            if not e.export_missing:  # else fit writes the export the finished run lacks
                raise _Fail(str(e)) from None
        except (RunDirError, CheckpointError) as e:
            raise _Fail(str(e)) from None
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # lazy: lightning, peft and transformers take seconds
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    from tpkit.data.errors import LlavaDataError
    from tpkit.training.checkpoint import PeerExitNotice, TrainingStopped
    from tpkit.training.module import NonFiniteError, NothingTrainedError
    from tpkit.training.recipe import fit
    from tpkit.training.teacher_cache.cache import TeacherCacheError

    rank0 = rank_zero_only.rank == 0  # under ddp every rank runs this command
    try:
        # a rank killed outright: rank 0 says how to resume before Lightning's observer kills it too
        notice = PeerExitNotice(lambda: _checkpoint_hint(out, command) or " No checkpoint was written yet.")
        res = fit(cfg, resume=args.resume, overwrite=args.overwrite, callbacks=[notice])
    except TrainingStopped as e:
        if rank0:
            print(f"{e}\ncontinue with: {command} --resume", file=sys.stderr)
        return 128 + e.signum
    except LlavaDataError as e:  # at batch time: the state before the batch was saved
        hint = _checkpoint_hint(out, command)
        raise _Fail(
            f"{e}{hint} (once the record is fixed, or with --set data.on_error=skip)" if hint else str(e)
        ) from None
    except NothingTrainedError as e:
        raise _Fail(f"{e}: {command} --overwrite") from None
    except MisconfigurationException as e:  # Lightning's own check of a trainer setting
        raise _Fail(f"trainer: {e}") from None
    except (RunDirError, TeacherCacheError, ConfigError, NonFiniteError, CheckpointError) as e:
        raise _Fail(str(e)) from None
    except BaseException:  # every rank says it: under DDP the rank that saw a peer die may not be 0
        if hint := _checkpoint_hint(out, command):
            print(f"training ended with an error (below).{hint}", file=sys.stderr)
        raise
    if rank0:
        ckpt = f"checkpoint {res.checkpoint}" if res.checkpoint.is_file() else "no checkpoint"
        loss = ""
        if res.losses is not None:  # what the run did to its loss, so that nobody ships a diverged one
            first, last, k = res.losses
            loss = f"train loss {first:.4g} (first batch) -> {last:.4g} (mean of the last {k}), "
        print(f"done: step {int(res.metrics['global_step'])}, {loss}{ckpt}, export {res.export_dir}")
        if (out / SKIPPED).is_file():
            n = sum(1 for _ in open(out / SKIPPED))
            print(f"skipped {n} bad records (data.on_error: skip), each listed in {out / SKIPPED}")
    return 0


def _pruning_overrides(cfg: Any, args: argparse.Namespace) -> dict[str, Any]:
    """The pruning keys set with ``--set pruning.KEY=VALUE`` ({"stage1.min_keep": 8}): with an adapter,
    they change its trained pruning config (the config file's pruning section does not)."""
    values = to_dict(cfg.pruning)
    out: dict[str, Any] = {}

    def leaves(value: Any, key: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                leaves(v, f"{key}.{k}")
        else:
            out[key] = value

    for item in args.overrides:
        key = item.split("=", 1)[0].strip()
        if key.startswith("pruning."):
            node: Any = values
            for part in key.removeprefix("pruning.").split("."):
                node = node[part]
            leaves(node, key.removeprefix("pruning."))
    return out


def _evaluate(args: argparse.Namespace) -> int:
    from tpkit.evaluation.config import EvalConfig

    extra = []
    if args.random_init:
        extra.append(f"random_init.name={args.random_init}")
    if args.scale_down:
        extra.append(f"random_init.scale_down={args.scale_down}")
    if args.device:
        extra.append(f"device={args.device}")
    if args.out:
        extra.append(f"out_dir={args.out}")
    cfg = _load(EvalConfig, args, extra)
    if _printed(cfg, args):
        return 0
    if why := cfg.missing_inputs():
        raise _Fail(why)
    if cfg.random_init.name is None:
        _check_data(cfg.data, ["test_json"])
    pruning_overrides = _pruning_overrides(cfg, args) if cfg.adapter else None
    from tpkit.data.errors import LlavaDataError  # lazy: torch and transformers take seconds
    from tpkit.evaluation.random_init import RandomInitError
    from tpkit.evaluation.report import random_init_summary
    from tpkit.evaluation.runner import EvalError, evaluate

    try:
        results = evaluate(cfg, pruning_overrides=pruning_overrides)
    except (EvalError, ConfigError, LlavaDataError, RandomInitError) as e:
        raise _Fail(str(e)) from None
    if results.get("mode") == "random_init":
        print(random_init_summary(results))
        print(f"results in {Path(cfg.out_dir) / 'speed.json'}")
        return 0
    print(results["table"])
    print(f"report: {', '.join(results['files'].values())}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from tpkit.training.export import export_checkpoint  # lazy: peft and transformers take seconds
    from tpkit.training.rundir import CheckpointError

    try:
        out = export_checkpoint(args.ckpt, args.out, config=args.config, merged=args.merged)
    except (ConfigError, FileNotFoundError, FileExistsError, CheckpointError) as e:
        raise _Fail(str(e)) from None
    print(f"exported {args.ckpt} -> {out}")
    return 0


def _teacher_cache(args: argparse.Namespace) -> int:
    from tpkit.training.config import TrainConfig

    if args.top_k < 0:
        raise _Fail("--top-k must be >= 0")
    try:
        shard = tuple(int(x) for x in args.shard.split("/"))
        if len(shard) != 2 or not 0 <= shard[0] < shard[1]:
            raise ValueError
    except ValueError:
        raise _Fail(f"--shard {args.shard!r}: expected I/N with 0 <= I < N, e.g. 3/8") from None
    cfg = _load(TrainConfig, args)
    if _printed(cfg, args):
        return 0
    if why := cfg.model.missing_paths():
        raise _Fail(why)
    _check_data(cfg.data, ["train_json"])
    if cfg.distill.hidden_weight > 0:
        print(
            f"note: the cache holds the teacher's answer logits only; training with it needs "
            f"--set distill.hidden_weight=0 (this config has {cfg.distill.hidden_weight:g})",
            file=sys.stderr,
        )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from tpkit.data.errors import LlavaDataError  # lazy: start-up time
    from tpkit.training.teacher_cache.build import build_teacher_cache
    from tpkit.training.teacher_cache.cache import TeacherCacheError

    try:
        out = build_teacher_cache(
            cfg,
            args.out,
            top_k=args.top_k,
            batch_size=args.batch_size,
            dtype=args.dtype,
            device=args.device,
            shard=shard,
            workers=args.workers,
        )
    except (TeacherCacheError, LlavaDataError) as e:
        raise _Fail(str(e)) from None
    meta = json.loads((out / "meta.json").read_text())
    size = sum(f.stat().st_size for f in out.iterdir())
    print(
        f"teacher cache: {meta['records']} records, {meta['rows']} answer rows, k={meta['k']}, "
        f"{size / 1e6:.1f} MB in {out}"
    )
    return 0


def _lmms_task(args: argparse.Namespace) -> int:
    from tpkit.data.errors import LlavaDataError  # lazy: datasets takes seconds
    from tpkit.evaluation.harness.task import write_lmms_task

    if args.max_new_tokens < 1:
        raise _Fail("--max-new-tokens must be >= 1")
    try:
        task = write_lmms_task(
            args.data, args.out, args.name, image_folder=args.image_folder, max_new_tokens=args.max_new_tokens
        )
    except (LlavaDataError, ValueError) as e:
        raise _Fail(str(e)) from None
    print(
        f"wrote the lmms-eval task {task.name} ({task.n} questions, generation, exact match) to {task.out_dir}"
    )
    if task.yes_no_name:
        print(f"and {task.yes_no_name} ({task.n_yes_no} yes/no questions, loglikelihood of yes and no)")
    print(f"run them (offline: HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1):\n  {task.command()}")
    return 0


# --------------------------------------------------------------------------------------------
# the embedded world: data, demo, fixture, premise


def _data_synthetic(args: argparse.Namespace) -> int:
    from tpkit.demo import SyntheticData  # lazy: start-up time
    from tpkit.synthetic.scenes import SyntheticConfig
    from tpkit.synthetic.splits import bench, ensure_split, generate_split

    if args.bench:
        return bench(args.bench, args.seed or 0)
    if not args.out:
        raise _Fail("--out is required (unless --bench)")
    try:
        if args.split is None:  # the demo's splits, reused when already written the same way
            d = SyntheticData()
            for split, n, seed in (
                ("train", d.n_train, d.seed),
                ("val", d.n_val, d.seed),
                ("test", d.n_test, d.test_seed),
            ):
                print(f"{ensure_split(args.out, split, n=n, seed=seed)}: {n} records (seed {seed})")
            return 0
        overrides = {} if args.image_size is None else {"image_size": args.image_size}
        cfg = SyntheticConfig.for_split(args.split, **overrides)
        n = args.n or 1000
        path = generate_split(
            args.out,
            args.split,
            n,
            args.seed or 0,
            cfg,
            turns=args.turns,
            workers=args.workers,
            progress=True,
        )
    except ValueError as e:
        raise _Fail(str(e)) from None
    print(f"wrote {n} records to {path}")
    return 0


def _heldout(args: argparse.Namespace) -> int:
    from tpkit.checkout import checkout_path
    from tpkit.synthetic.heldout import HeldoutConfig  # lazy: start-up time

    if args.config is None:  # the checkout's, whatever the current directory
        args.config = str(checkout_path("configs/heldout.yaml"))
    cfg = _load(HeldoutConfig, args)
    if _printed(cfg, args):
        return 0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from tpkit.evaluation.runner import EvalError
    from tpkit.synthetic.heldout import run_heldout

    try:
        run_heldout(cfg)
    except (ConfigError, EvalError, ValueError) as e:
        raise _Fail(str(e)) from None
    return 0


def _demo(args: argparse.Namespace) -> int:
    from tpkit.checkout import checkout_path
    from tpkit.demo import DEMO_MODELS, DemoConfig  # lazy: start-up time

    if args.model is not None:
        if args.config is not None:
            raise _Fail(f"--model {args.model} and --config {args.config}: give one (--model picks a config)")
        args.config = str(checkout_path(DEMO_MODELS[args.model]))
    elif args.config is None:  # the checkout's, whatever the current directory
        args.config = str(checkout_path(DEMO_MODELS["tiny-llava"]))
    cfg = _load(DemoConfig, args)
    if _printed(cfg, args):
        return 0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from tpkit.demo import run_demo

    try:
        run_demo(cfg)
    except (ConfigError, FileNotFoundError) as e:
        raise _Fail(str(e)) from None
    return 0


def _fixture(args: argparse.Namespace) -> int:
    from tpkit.synthetic.fixture.config import FixtureConfig

    extra = []
    if args.archive is not None:
        extra.append(f"archive={args.archive}")
    if args.device is not None:
        extra.append(f"device={args.device}")
    cfg = _load(FixtureConfig, args, extra)
    if _printed(cfg, args):
        return 0
    from tpkit.synthetic.fixture.loop import ResumeError, install_stop_handlers, restore_handlers  # lazy
    from tpkit.synthetic.fixture.recipe import run, snapshot

    if args.snapshot is not None:
        try:
            snapshot(cfg, args.out, args.snapshot)
        except ResumeError as e:
            raise _Fail(str(e)) from None
        return 0
    previous = install_stop_handlers()
    try:
        run(cfg, args.out, resume=args.resume)
    except ResumeError as e:
        raise _Fail(str(e)) from None
    except KeyboardInterrupt as e:
        print(f"interrupted: {e}" if str(e) else "interrupted", file=sys.stderr)
        return 130
    finally:
        restore_handlers(previous)
    return 0


def _premise(args: argparse.Namespace) -> int:
    from tpkit.pruning.config import Stage1Config

    try:
        cfg = Stage1Config(score=args.score, selector=args.selector, min_keep=args.min_keep)
        cfg.validate()
    except ValueError as e:
        raise _Fail(str(e)) from None
    import torch  # lazy: start-up time

    from tpkit.synthetic.premise import format_report, run_premise

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        report = run_premise(
            args.data,
            args.model,
            n=args.n,
            out_dir=args.out,
            cfg=cfg,
            patch_size=args.patch_size,
            batch_size=args.batch_size,
            device=device,
            progress=True,
        )
    except (ValueError, OSError) as e:
        raise _Fail(str(e)) from None
    print(format_report(report))
    if args.out:
        print(f"wrote {Path(args.out) / 'premise.json'}")
    return 0


# --------------------------------------------------------------------------------------------
# config reference


def config_classes() -> dict[str, type]:
    """The top-level configs users write, titled as in docs/config.md."""
    from tpkit.demo import DemoConfig
    from tpkit.evaluation.config import EvalConfig
    from tpkit.synthetic.fixture.config import FixtureConfig
    from tpkit.synthetic.heldout import HeldoutConfig
    from tpkit.training.config import TrainConfig

    return {
        "Training (`tpkit train`, `train.py`)": TrainConfig,
        "Evaluation (`tpkit evaluate`, `evaluate.py`)": EvalConfig,
        "Demo (`tpkit demo`)": DemoConfig,
        "Held-out comparison (`tpkit heldout`)": HeldoutConfig,
        "Base-model fixture (`tpkit fixture`)": FixtureConfig,
    }


def config_reference() -> str:
    head = (
        "# Configuration reference\n\n"
        "Every key of every config, with its type, default and the comment beside it in the source. "
        "Generated by `tpkit config-reference` from the dataclasses; a test fails when it is stale. "
        "Unknown keys, wrong types, non-finite numbers (no key takes `nan` or `inf`; where a key has no "
        "limit, its value is `null`) and impossible values fail when the file is loaded, naming the file, "
        "the line and the key; `--set key.sub=value` overrides any key, `--print-config` prints the "
        "resolved config. A relative path written in a config file (model, data, teacher cache, adapter, "
        "output directory) is relative to that file's directory; one given with `--set`, or a default, to "
        "the current directory.\n\n"
    )
    return head + reference_markdown(config_classes())


def _config_reference(args: argparse.Namespace) -> int:
    text = config_reference()
    path = Path(args.out)
    if args.check:
        if not path.is_file() or path.read_text() != text:
            raise _Fail(f"{path} is stale: run tpkit config-reference --out {path}")
        print(f"{path} is up to date")
        return 0
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"wrote {path}")
    return 0


# --------------------------------------------------------------------------------------------
# the parser


class _HelpFormatter(argparse.HelpFormatter):
    """Fills ``{architectures}`` in a help text when the help is shown (listing them imports torch,
    which no other use of the parser should pay for); never breaks a line inside a name like
    ``llava-next-7b``."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)

    def _expand_help(self, action: argparse.Action) -> str:
        text = super()._expand_help(action)
        if "{architectures}" in text:
            from tpkit.evaluation.random_init import architecture_names

            text = text.replace("{architectures}", ", ".join(architecture_names()))
        return text


def build_parser(prog: str = "tpkit") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog=prog,
        description="Two-stage token pruning + LoRA distillation for multimodal LLMs (transformers, Lightning).",
    )
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, func: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, formatter_class=_HelpFormatter)
        p.set_defaults(func=func)
        return p

    p = command("train", _train, "fine-tune LoRA with the pruner in the forward path and distillation")
    _config_args(p)
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in trainer.out_dir from its last.ckpt (refused when the config changes what "
        "the run computes: model, data, pruning, LoRA, loss, optimizer, seed)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start a new run in a trainer.out_dir that holds one, removing its checkpoint, export and logs",
    )

    p = command("evaluate", _evaluate, "compare dense, ours and baselines: accuracy, tokens, speed, FLOPs")
    _config_args(p, required=False)
    p.add_argument(
        "--random-init",
        metavar="NAME",
        help="speed only: dense against ours at random_init.budget on a full-size architecture with random "
        "weights, one of: {architectures}. On a CPU: float32, batch 1, 1 thread, 3 timed rounds (speed.*, "
        "random_init.dtype change them); with --scale-down 64, a minute or two",
    )
    p.add_argument(
        "--scale-down",
        type=int,
        metavar="N",
        help="with --random-init: divide the widths by N (not the depths, nor the token counts), so that a "
        "CPU runs the same code path in seconds to minutes",
    )
    p.add_argument("--device", help="cuda / cpu / auto (overrides the config)")
    p.add_argument("--out", help="output directory (overrides out_dir)")

    p = command("export", _export, "write a PEFT adapter export from a training checkpoint")
    p.add_argument("--ckpt", required=True, help="a training checkpoint (out_dir/last.ckpt)")
    p.add_argument("--out", required=True, help="export directory")
    p.add_argument("--config", default=None, help="the run's config (default: config.yaml next to --ckpt)")
    p.add_argument("--merged", action="store_true", help="also write a full merged model to <out>/merged")

    p = command(
        "teacher-cache",
        _teacher_cache,
        "precompute the unpruned teacher's answer logits (distill.teacher_cache)",
    )
    _config_args(p)
    p.add_argument("--out", required=True, help="cache directory (an unfinished build there continues)")
    p.add_argument(
        "--top-k", type=int, default=0, help="logits kept per row; 0 = the whole vocabulary (exact)"
    )
    p.add_argument("--batch-size", type=int, default=None, help="default: data.eval_batch_size")
    p.add_argument("--dtype", choices=["float32", "float16"], default="float32", help="stored logits")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument(
        "--workers", type=int, default=None, help="collation processes (default: data.num_workers)"
    )
    p.add_argument(
        "--shard", default="0/1", metavar="I/N", help="build records I, I+N, ... only (one process per GPU)"
    )

    p = command(
        "lmms-task",
        _lmms_task,
        "write a local lmms-eval task over a LLaVA-JSON file, for lmms-eval --model tpkit with no hub",
    )
    p.add_argument(
        "--data", required=True, help="a LLaVA-JSON (or JSONL) file, e.g. runs/data/synthetic/test.json"
    )
    p.add_argument("--out", required=True, help="the task directory (lmms-eval's --include_path)")
    p.add_argument(
        "--name", default=None, help="task name (default: tpkit_<folder>_<file>, e.g. tpkit_synthetic_test)"
    )
    p.add_argument(
        "--image-folder", default=None, help="where relative image paths are (default: the file's directory)"
    )
    p.add_argument(
        "--max-new-tokens", type=int, default=16, help="the generation task's max_new_tokens (default 16)"
    )

    p = command("data", lambda a: 0, "write datasets (the synthetic benchmark)")
    data_sub = p.add_subparsers(dest="dataset", metavar="DATASET", required=True)
    d = data_sub.add_parser(
        "synthetic",
        help="the synthetic LLaVA benchmark",
        description="Write splits of the synthetic LLaVA benchmark: without --split, the demo's train, val "
        "and test splits (reused when already written the same way).",
    )
    d.set_defaults(func=_data_synthetic)
    d.add_argument("--out", help="output directory (gets <split>.json and images/<split>/)")
    d.add_argument(
        "--split",
        default=None,
        choices=list(SYNTHETIC_SPLITS),
        metavar="SPLIT",
        help="one split only: " + "; ".join(f"{name} ({what})" for name, what in SYNTHETIC_SPLITS.items()),
    )
    d.add_argument("--n", type=int, default=None, help="records of --split (default 1000)")
    d.add_argument("--seed", type=int, default=None, help="seed of --split (default 0)")
    d.add_argument("--turns", type=int, default=None, help="QA turns per record (1-3; default 1)")
    d.add_argument("--image-size", type=int, default=None, help="image side in pixels (default 96)")
    d.add_argument("--workers", type=int, default=1, help="processes (output identical for any value)")
    d.add_argument("--bench", type=int, default=0, metavar="N", help="only time scene rendering on N images")

    p = command("demo", _demo, "prune an embedded model, fine-tune it back, evaluate and print the tables")
    _config_args(
        p, required=False, default="the checkout's config of --model (tiny-llava's: configs/demo.yaml)"
    )
    p.add_argument(
        "--model",
        choices=["tiny-llava", "tiny-qwen2-vl"],
        default=None,
        help="which embedded model: tiny-llava (default: configs/demo.yaml) or tiny-qwen2-vl "
        "(configs/demo_tiny_qwen2_vl.yaml)",
    )

    p = command(
        "heldout",
        _heldout,
        "training-free ours vs random / topk-cls / FastV on the held-out synthetic splits, one table",
    )
    _config_args(p, required=False, default="configs/heldout.yaml")

    p = command(
        "fixture",
        _fixture,
        "train an embedded base model (assets/tiny-llava; a tiny Qwen2-VL) from scratch",
    )
    _config_args(p)
    p.add_argument("--out", required=True, help="output directory (the model directory)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None, help="overrides 'device'")
    p.add_argument("--archive", default=None, help="tar the model dir here right after saving (GPU leases)")
    p.add_argument(
        "--resume", action="store_true", help="continue the interrupted run whose state is in OUT/.resume"
    )
    p.add_argument(
        "--snapshot",
        default=None,
        metavar="DIR",
        help="write the VQA phase's last saved state in OUT/.resume as a model directory DIR and exit",
    )

    p = command("premise", _premise, "stage-1 premise report: kept fraction, object-patch recall, AUROC")
    p.add_argument("--model", default=None, help="model directory (omit: the pixel control only)")
    p.add_argument("--data", required=True, help="split JSON with 'objects', or a directory with test.json")
    p.add_argument("--n", type=int, default=300, help="number of records (the first n)")
    p.add_argument("--out", default=None, help="directory for premise.json and the curve PNGs")
    p.add_argument(
        "--score",
        default=None,
        help="stage-1 score: cosine, cosine_centered, cls_attn (CLS towers), mean_distance, cosine_mean, "
        "attn_received, random (default: the family's: cosine with a CLS token, else mean_distance)",
    )
    p.add_argument("--selector", default="kneedle", help="knee: kneedle, curvature, iqr, ratio, budget")
    p.add_argument("--min-keep", type=int, default=4)
    p.add_argument(
        "--patch-size", type=int, default=8, help="patch grid of the pixel control without a model"
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")

    p = command(
        "config-reference", _config_reference, f"write (or --check) the config reference {CONFIG_REFERENCE}"
    )
    p.add_argument("--out", default=CONFIG_REFERENCE, help=f"default: {CONFIG_REFERENCE}")
    p.add_argument("--check", action="store_true", help="exit 2 when the file differs from the code")
    return ap


def main(argv: list[str] | None = None, prog: str = "tpkit") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(prog).parse_args(argv)
    args.argv, args.prog = argv, prog
    try:
        return args.func(args)
    except (_Fail, ModelSourceError) as e:  # a model that cannot be loaded: from any command, its message
        msg = str(e)
        print(msg if msg.startswith("config error:") else f"error: {msg}", file=sys.stderr)
        return 2
