"""LightningModule: pruned LoRA student distilled from the same weights, unpruned and adapter-free.

One copy of the base weights: the student is ``PeftModel(base)`` with the pruner attached to
``base``; the teacher is the same object under ``disable_adapter()`` + ``pruning_disabled(base)``
and ``no_grad``. Checkpoints hold trainable tensors only (LoRA, and the projector when trained),
plus optimizer/scheduler/loop/sampler state and the RNG state.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from peft import PeftModel
from transformers.utils import ModelOutput

from tpkit.data.labels import IGNORE_INDEX, next_token_targets
from tpkit.models.core.attach import last_stats, pruning_disabled
from tpkit.models.families import model_inputs
from tpkit.models.registry import family_of
from tpkit.training.config import DistillConfig, OptimConfig
from tpkit.training.losses import answer_ce, distill_rows, distill_rows_topk, hidden_cosine
from tpkit.training.sharding import FullyShardedStrategy
from tpkit.training.teacher_cache.cache import TeacherCache, TeacherCacheError, answer_ranks

__all__ = [
    "DistillLoRAModule",
    "LossWatch",
    "NonFiniteError",
    "NothingTrainedError",
    "lr_lambda",
    "reuse_tower_output",
]


def _batch_size(batch: dict) -> int:
    """Records in a batch (0: every record was skipped at collation, ``data.on_error: skip``)."""
    return len(batch["ids"]) if "ids" in batch else int(batch["input_ids"].shape[0])


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss or weights: stopped before it is saved or exported."""


class NothingTrainedError(RuntimeError):
    """The run ended without a single record trained on (every one was skipped at batch time)."""


class LossWatch:
    """The training loss seen from the start of a run: its first and latest values for the report,
    and one warning when it climbs far above where it started.

    ``first`` is the loss of the run's first batch (the model before any update: a learning rate far
    too high spoils the very next batches), ``now`` the mean of the last :attr:`WINDOW` batches. The
    run is taken to diverge when ``now > max(FACTOR * first, first + MARGIN)`` for :attr:`PATIENCE`
    batches in a row: a loss that a far too high learning rate sends up and keeps there without it
    ever becoming non-finite (the NaN guard never fires), not the noise of small batches (a window
    mean, held 10 batches) nor a loss that starts near zero (the margin). Part of the checkpoint: a
    resumed run keeps its start.
    """

    WINDOW = 10
    FACTOR = 2.0
    MARGIN = 1.0
    PATIENCE = 10

    def __init__(self) -> None:
        self.first: float | None = None
        self.recent: deque[float] = deque(maxlen=self.WINDOW)
        self.seen = 0  # batches
        self.above = 0
        self.warned = False

    @property
    def now(self) -> float | None:
        return sum(self.recent) / len(self.recent) if self.recent else None

    def summary(self) -> tuple[float, float, int] | None:
        """(the first batch's loss, the mean of the last k batches, k); None before the first batch."""
        if self.first is None:
            return None
        return self.first, self.now, len(self.recent)

    def add(self, loss: float) -> bool:
        """Record one batch's loss; True once, when the run has just been found diverging."""
        self.seen += 1
        if self.first is None:
            self.first = loss
        self.recent.append(loss)
        if len(self.recent) < self.WINDOW:
            return False
        high = self.now > max(self.FACTOR * self.first, self.first + self.MARGIN)
        self.above = self.above + 1 if high else 0
        if self.above >= self.PATIENCE and not self.warned:
            self.warned = True
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        return {
            "first": self.first,
            "recent": list(self.recent),
            "seen": self.seen,
            "above": self.above,
            "warned": self.warned,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        first = state.get("first")
        self.first = float(first) if isinstance(first, (int, float)) else None
        self.recent = deque((float(x) for x in state.get("recent", [])), maxlen=self.WINDOW)
        self.seen = int(state.get("seen", len(self.recent)))
        self.above, self.warned = int(state.get("above", 0)), bool(state.get("warned", False))


@contextlib.contextmanager
def reuse_tower_output(tower: torch.nn.Module, key: Callable[[torch.Tensor, tuple, dict], tuple | None]):
    """Inside the block, each vision-tower call runs once: a later call with the same ``key`` (the
    family's :meth:`~tpkit.models.core.family.Family.tower_call_key`) gets the first call's output.

    The student (stage 1) and the teacher see the same pixel values and the tower is frozen
    and adapter-free (``apply_lora`` refuses vision-tower targets), so its output is the same
    tensor for both. Each caller gets its own shallow copy of a ``ModelOutput`` (stock callers set
    fields on it).
    """
    cache: dict[tuple, Any] = {}
    original = tower.forward

    def forward(pixel_values: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        k = key(pixel_values, args, kwargs)
        if k is None:
            return original(pixel_values, *args, **kwargs)
        if k not in cache:
            cache[k] = original(pixel_values, *args, **kwargs)
        out = cache[k]
        return type(out)(**out) if isinstance(out, ModelOutput) else out

    tower.forward = forward
    try:
        yield
    finally:
        del tower.forward


def lr_lambda(cfg: OptimConfig, max_steps: int):
    """Linear warmup, then cosine / linear decay to ``min_lr_ratio`` at ``max_steps``, or constant."""

    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        if cfg.scheduler == "constant":
            return 1.0
        span = max(1, max_steps - cfg.warmup_steps)
        p = min(1.0, (step - cfg.warmup_steps) / span)
        decay = 0.5 * (1 + math.cos(math.pi * p)) if cfg.scheduler == "cosine" else 1 - p
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay

    return f


class DistillLoRAModule(L.LightningModule):
    """Student/teacher training step; ``model`` is a PeftModel whose base may carry the pruner."""

    def __init__(
        self,
        model: PeftModel,
        distill: DistillConfig,
        optim: OptimConfig,
        *,
        max_steps: int,
        pruning_attached: bool = False,
        teacher_cache: TeacherCache | None = None,
    ) -> None:
        super().__init__()
        self.teacher_cache = teacher_cache  # None: the online teacher
        self.model = model
        self.distill = distill
        self.optim = optim
        self.max_steps = max_steps
        self.pruning_attached = pruning_attached
        self.strict_loading = False  # checkpoints hold trainable tensors only
        self._t_last: float | None = None
        self._pending_rng: dict | None = None
        self.loss_watch = LossWatch()
        # records trained on over the whole run, all ranks (None: resumed from a checkpoint that
        # predates the count)
        self.records_trained: int | None = 0

    # ---------------------------------------------------------------------------------------
    # forward passes

    @property
    def base(self) -> torch.nn.Module:
        return self.model.get_base_model()

    def _inputs(self, batch: dict) -> dict[str, Any]:
        return {**model_inputs(self.base, batch), "use_cache": False}

    def student_forward(self, batch: dict) -> Any:
        kw = self._inputs(batch)
        if self.pruning_attached:
            kw["answer_mask"] = batch["answer_mask"]
        return self.model(**kw)

    @torch.no_grad()
    def teacher_logits(self, batch: dict, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of the base model, adapter off and pruner off, at original positions.

        (B, T, V), or (B, P, V) at ``positions`` (P,) sorted — the LM head then runs on P rows only.
        """
        off = pruning_disabled(self.base) if self.pruning_attached else contextlib.nullcontext()
        kw = self._inputs(batch)
        if positions is not None:
            kw["logits_to_keep"] = positions
        with self.model.disable_adapter(), off:
            return self.model(**kw).logits

    @contextlib.contextmanager
    def final_hidden(self):
        """Records the language model's final-normed hidden states of the forwards inside: a list of
        (B, T, D) tensors, one per forward (the pruned forward's are its kept positions)."""
        seen: list[torch.Tensor] = []
        handle = (
            family_of(self.base)
            .language_model(self.base)
            .norm.register_forward_hook(lambda m, a, out: seen.append(out))
        )
        try:
            yield seen
        finally:
            handle.remove()

    def cached_teacher_rows(self, batch: dict, mask: torch.Tensor, orig: torch.Tensor, targets: torch.Tensor):
        """The teacher's rows for the student's answer rows, from the teacher cache (no forward)."""
        if "ids" not in batch:
            raise TeacherCacheError(
                "distill.teacher_cache needs record ids in the batch (LlavaCollator adds them)"
            )
        rows = mask.nonzero()[:, 0]
        counts, ranks = answer_ranks(batch["labels"], rows, orig)
        t = self.teacher_cache.lookup(batch["ids"], counts, rows, ranks, device=mask.device)
        if not torch.equal(t.targets, targets[mask]):
            raise TeacherCacheError(
                f"teacher cache {self.teacher_cache.path}: the cached answer tokens differ from this batch's "
                f"(records {list(batch['ids'])[:4]}...): rebuild the cache for this data and tokenizer"
            )
        return t

    def losses(self, batch: dict) -> dict[str, torch.Tensor]:
        family = family_of(self.base)
        tower = family.vision_tower(self.base)
        online = self.distill.needs_teacher and self.teacher_cache is None
        # a projector trained inside the tower module (Qwen's merger, lora.train_projector) makes the
        # student's tower output differ from the teacher's: then each runs its own
        frozen = not any(p.requires_grad for p in tower.parameters())
        share = (
            reuse_tower_output(tower, family.tower_call_key)
            if online and frozen
            else contextlib.nullcontext()
        )
        with share:
            return self._losses(batch)

    def _losses(self, batch: dict) -> dict[str, torch.Tensor]:
        feat = self.distill.hidden_weight > 0
        with self.final_hidden() if feat else contextlib.nullcontext() as seen:
            out = self.student_forward(batch)
        kept = getattr(out, "kept_index", None)  # (B, T_out) or None (no pruner)
        parts: dict[str, torch.Tensor] = {}
        if self.pruning_attached:
            stats = last_stats(self.base) or {}
            if "token_layer_fraction" in stats:
                parts["kept_frac"] = stats["token_layer_fraction"].float().mean().detach()
            if "k1" in stats and "n_visual" in stats:
                parts["visual_kept"] = (stats["k1"].float() / stats["n_visual"].float().clamp(min=1)).mean()
        targets = next_token_targets(batch["labels"], kept)  # (B, T_out)
        ce = answer_ce(out.logits, targets)
        loss = self.distill.ce_weight * ce
        parts["ce"] = ce.detach()
        mask = targets != IGNORE_INDEX  # (B, T_out) answer-predicting positions
        with torch.no_grad():  # teacher-forced answer-token accuracy of the (pruned) student
            parts["acc"] = (out.logits[mask].argmax(-1) == targets[mask]).float().mean()
        teacher_hidden = None
        if self.distill.alpha > 0:
            if kept is None:
                kept = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
            orig = kept[mask]  # (N,) original position of each row: the teacher is unpruned
            kw = dict(
                kind=self.distill.kind, temperature=self.distill.temperature, beta=self.distill.jsd_beta
            )
            if self.teacher_cache is not None:
                t = self.cached_teacher_rows(batch, mask, orig, targets)
                kd = distill_rows_topk(out.logits[mask], t.values, t.indices, t.lse, **kw)
                teacher_pred = t.indices.gather(1, t.values.argmax(-1, keepdim=True))[:, 0]
            else:
                positions = torch.unique(orig)  # (P,) sorted; the teacher's LM head runs on these only
                with self.final_hidden() if feat else contextlib.nullcontext() as t_seen:
                    t_logits = self.teacher_logits(batch, positions)  # (B, P, V)
                teacher_hidden = t_seen[-1] if feat else None
                rows = mask.nonzero()[:, 0]
                t_rows = t_logits[rows, torch.searchsorted(positions, orig)]  # (N, V)
                kd = distill_rows(out.logits[mask], t_rows, **kw)
                teacher_pred = t_rows.argmax(-1)
            loss = loss + self.distill.alpha * kd
            parts["kd"] = kd.detach()
            parts["teacher_acc"] = (teacher_pred == targets[mask]).float().mean()
        if feat:
            hid = self.hidden_distill(batch, seen[-1], kept, teacher_hidden)
            loss = loss + self.distill.hidden_weight * hid
            parts["hid"] = hid.detach()
        parts["loss"] = loss
        return parts

    def hidden_distill(
        self,
        batch: dict,
        student: torch.Tensor,
        kept: torch.Tensor | None,
        teacher: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``1 - cos`` between the student's final hidden states (B, T_out, D) at its kept text
        positions and the unpruned teacher's (B, T, D) at the same original positions (``teacher``
        None: the teacher runs here)."""
        ids = batch["input_ids"]
        if kept is None:
            kept = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        kept = kept[:, -student.shape[1] :]
        visual = torch.tensor(family_of(self.base).placeholder_ids(self.base), device=ids.device)
        at = kept.clamp(min=0)
        text = (kept >= 0) & ~torch.isin(ids.gather(1, at), visual)  # (B, T_out)
        text &= batch["attention_mask"].gather(1, at).bool()  # a stock student keeps its pads
        if teacher is None:
            with self.final_hidden() as seen:  # the LM head on one position only
                self.teacher_logits(batch, positions=torch.zeros(1, dtype=torch.long, device=ids.device))
            teacher = seen[-1]
        rows = text.nonzero()  # (N, 2)
        t_rows = teacher[rows[:, 0], kept[rows[:, 0], rows[:, 1]]]
        return hidden_cosine(student[rows[:, 0], rows[:, 1]], t_rows)

    # ---------------------------------------------------------------------------------------
    # Lightning hooks

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        dm = getattr(self.trainer, "datamodule", None)
        skipped = batch.get("skipped") or []
        n = _batch_size(batch)
        if dm is not None and hasattr(dm, "mark_in_flight"):
            # committed to the loader's resume position at batch end: every record the sampler gave,
            # skipped ones too
            dm.mark_in_flight(n + len(skipped))
        if skipped and dm is not None and hasattr(dm, "report_skipped"):
            dm.report_skipped(skipped, stage="batch", step=self.trainer.global_step)
        if n:
            parts = self.losses(batch)
        else:
            # every record was skipped: a zero loss that reaches every trainable tensor, so that all
            # ranks of a DDP run still take part in the same gradient all-reduce
            parts = {"loss": sum(p.sum() for p in self.model.parameters() if p.requires_grad) * 0.0}
        self.watch(parts, n)
        if n:
            for k, v in parts.items():
                self.log(f"train/{k}", v, prog_bar=k in ("loss", "kd", "kept_frac", "acc"), batch_size=n)
            self.log("lr", self.optimizers().param_groups[0]["lr"], prog_bar=False, batch_size=n)
        return parts["loss"]

    def watch(self, parts: dict[str, torch.Tensor], n: int) -> None:
        """Per batch, on every rank at once (one all-reduce under DDP, one host sync): stop on a
        non-finite loss, count the records trained on, follow the loss (:class:`LossWatch`)."""
        loss = parts["loss"].detach().float()
        finite = torch.isfinite(loss)
        trained = float(n > 0)
        # (ranks whose loss is finite or who trained nothing, summed loss of ranks that trained,
        # ranks that trained, records)
        t = torch.stack(
            [
                (finite | (n == 0)).float(),
                torch.where(finite, loss, torch.zeros_like(loss)) * trained,
                loss.new_tensor(trained),
                loss.new_tensor(float(n)),
            ]
        )
        if self.trainer.world_size > 1:
            t = self.trainer.strategy.reduce(t, reduce_op="sum")
        ok, loss_sum, ranks, records = t.tolist()
        if ok < self.trainer.world_size:
            terms = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in parts.items() if v.numel() == 1)
            raise NonFiniteError(
                f"non-finite loss at step {self.trainer.global_step} ({terms}): training diverged. Nothing "
                f"of this step is saved; lower optim.lr (now {self.optim.lr:g}) or check the data, and start "
                "again (the last checkpoint holds the state before it)"
            )
        if self.records_trained is not None:
            self.records_trained += int(records)
        if ranks and self.loss_watch.add(loss_sum / ranks):
            w = self.loss_watch
            rank_zero_warn(
                f"the training loss has risen from {w.first:.4g} (the run's first batch) to {w.now:.4g} "
                f"(mean of the last {w.WINDOW}), above twice its start for {w.PATIENCE} batches in a row "
                f"(step {self.trainer.global_step}): the run is probably diverging. Lower optim.lr (now "
                f"{self.optim.lr:g}) and start again"
            )

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._t_last is None:
            self._t_last = time.perf_counter()

    def on_train_batch_end(self, outputs: Any, batch: dict, batch_idx: int) -> None:
        now = time.perf_counter()
        dt = now - (self._t_last or now)
        self._t_last = now
        bs = _batch_size(batch)
        if dt > 0 and bs:
            self.log("train/samples_per_s", bs * self.trainer.world_size / dt, prog_bar=True, batch_size=bs)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        if not _batch_size(batch):  # every record of the batch was skipped (data.on_error: skip)
            return
        parts = self.losses(batch)
        bs = batch["input_ids"].shape[0]
        for k, v in parts.items():
            self.log(f"val/{k}", v, prog_bar=k in ("loss", "acc"), batch_size=bs, sync_dist=True)

    def configure_optimizers(self) -> dict:
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(
            params,
            lr=self.optim.lr,
            betas=tuple(self.optim.betas),
            eps=self.optim.eps,
            weight_decay=self.optim.weight_decay,
        )
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(self.optim, self.max_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ---------------------------------------------------------------------------------------
    # checkpoints: trainable tensors + RNG only

    def _trainable_names(self) -> set[str]:
        # FSDP2 (trainer.strategy: fsdp) shards modules in place: the names are the model's own
        return {n for n, p in self.named_parameters() if p.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        names = self._trainable_names()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in names}
        bad = [
            k for k, v in checkpoint["state_dict"].items() if v.is_floating_point() and not v.isfinite().all()
        ]
        if bad:  # raised before the file is written: the previous checkpoint stays
            raise NonFiniteError(
                f"non-finite weights at step {checkpoint.get('global_step')} ({len(bad)} tensors, e.g. {bad[0]}): "
                "training diverged; not saved. Lower optim.lr and start again"
            )
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        checkpoint["tpkit_rng"] = rng
        checkpoint["tpkit_progress"] = {"records": self.records_trained, "loss": self.loss_watch.state_dict()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        names = self._trainable_names()
        missing = sorted(names - set(checkpoint.get("state_dict", {})))
        if missing:
            raise RuntimeError(
                f"checkpoint lacks {len(missing)} trainable tensors (first: {missing[0]}); "
                "was it written with another lora/model config?"
            )
        self._pending_rng = checkpoint.get("tpkit_rng")
        progress = checkpoint.get("tpkit_progress")
        progress = progress if isinstance(progress, dict) else {}
        records = progress.get("records")
        self.records_trained = records if isinstance(records, int) else None
        if isinstance(progress.get("loss"), dict):
            self.loss_watch.load_state_dict(progress["loss"])

    def configure_model(self) -> None:
        # trainer.strategy: fsdp shards the model here, one unit per block (tpkit.training.sharding)
        strategy = self.trainer.strategy
        if isinstance(strategy, FullyShardedStrategy):
            strategy.shard(self.model)

    def on_fit_start(self) -> None:
        self.model.train()  # from_pretrained / build_tiny_llava hand back eval-mode modules

    def on_train_start(self) -> None:
        # restored here, right before the first resumed step, so nothing in between draws from it
        if self._pending_rng is not None:
            torch.set_rng_state(self._pending_rng["torch"])
            if "cuda" in self._pending_rng and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(self._pending_rng["cuda"])
            self._pending_rng = None
