"""Exact resume: N steps uninterrupted == N/2, crash, --resume, N/2 (adapter, optimizer, data order)."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from tpkit.config import from_dict
from tpkit.training.config import TrainConfig
from tpkit.training.data import ResumableSampler
from tpkit.training.recipe import fit

from .conftest import tiny_cfg_dict


class Crash(RuntimeError):
    pass


class CrashAt(L.Callback):
    """Dies (like kill -9: no save on the way out) before optimizer step ``step + 1``."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise Crash(f"simulated kill at step {self.step}")


class RecordIds(L.Callback):
    def __init__(self):
        self.ids: list[list[str]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.ids.append(list(batch["ids"]))


def _trainable(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.model.named_parameters() if p.requires_grad}


def test_sampler_shards_and_resumes():
    full = ResumableSampler(10, seed=3, num_replicas=1)
    order = list(full)
    assert sorted(order) == list(range(10)) and order != list(range(10))
    full.set_epoch(1)
    assert list(full) != order  # reshuffled per epoch, deterministically
    ranks = [ResumableSampler(10, seed=3, num_replicas=2, rank=r, drop_last=True) for r in range(2)]
    shards = [list(s) for s in ranks]
    assert sorted(shards[0] + shards[1]) == list(range(10)) and len(shards[0]) == len(shards[1]) == 5
    s = ResumableSampler(10, seed=3)
    s.mark_in_flight(4)
    s.commit()
    s.mark_in_flight(2)  # not committed: the step did not finish
    t = ResumableSampler(10, seed=3)
    t.load_state_dict(s.state_dict())
    assert list(t) == order[4:]


@pytest.mark.parametrize("n, half", [(6, 3), (8, 4)], ids=["mid-epoch", "epoch-boundary"])
def test_exact_resume_after_kill(train_json, processor, tmp_path, n, half):
    # 16 samples / batch 4 = 4 steps per epoch: the kill lands mid-epoch 0 (or at its end), the run
    # crosses into epoch 1
    sections = dict(
        lora={"dropout": 0.1},  # the RNG stream must be restored too
        optim={"lr": 5e-3, "scheduler": "cosine", "warmup_steps": 2},
        trainer={"max_steps": n, "checkpoint_every_n_steps": half},
    )
    ref_ids = RecordIds()
    ref = fit(
        from_dict(TrainConfig, tiny_cfg_dict(train_json, tmp_path / "ref", **sections)),
        processor=processor,
        callbacks=[ref_ids],
    )
    assert ref.metrics["global_step"] == n
    cfg = from_dict(TrainConfig, tiny_cfg_dict(train_json, tmp_path / "cut", **sections))
    ids_a = RecordIds()
    with pytest.raises(Crash):
        fit(cfg, processor=processor, callbacks=[ids_a, CrashAt(half)])
    ckpt = torch.load(tmp_path / "cut" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == half
    ids_b = RecordIds()
    resumed = fit(cfg, resume=True, processor=processor, callbacks=[ids_b])  # a fresh model, as a new process
    assert resumed.metrics["global_step"] == n
    # the same batches in the same order, none repeated or skipped
    assert ids_a.ids[:half] + ids_b.ids == ref_ids.ids
    a, b = _trainable(ref.module), _trainable(resumed.module)
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)


class SigtermAt(L.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            import os
            import signal

            os.kill(os.getpid(), signal.SIGTERM)  # the stop comes at the next step boundary


def test_sigterm_saves_before_exit(make_cfg, processor):
    import signal

    from tpkit.training.checkpoint import TrainingStopped

    cfg = make_cfg(trainer={"max_steps": 20, "checkpoint_every_n_steps": 0})
    with pytest.raises(TrainingStopped) as stop:
        fit(cfg, processor=processor, callbacks=[SigtermAt(3)])
    # the signal came after step 3's checks: the run stops at the next step boundary
    assert (stop.value.signum, stop.value.step) == (signal.SIGTERM, 4)
    ckpt = torch.load(f"{cfg.trainer.out_dir}/last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 4  # nothing lost although no periodic checkpoint was due
    loader_state = ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert (loader_state["epoch"], loader_state["consumed"]) == (0, 16)  # 16 records / batch 4: epoch 0 done
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are given back
