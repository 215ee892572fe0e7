"""``trainer.strategy: fsdp`` (FSDP2, :mod:`tpkit.training.sharding`) against DDP on 2 CPU ranks (gloo),
for a tiny LLaVA and a tiny Qwen2.5-VL, LoRA + both pruning stages + the online teacher: the loss per
step, the checkpoints, ``--resume`` within and across strategies, the exports, the shard units and the
all-gathers each unit runs. One subprocess script runs every run (scripts/sharded_check.py: DDP inside
pytest would re-run the suite); the tests read what it wrote. Below them, in-process checks of the
strategy's pieces."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tpkit.config import ConfigError, from_dict
from tpkit.training.config import TrainConfig
from tpkit.training.rundir import CheckpointError

from .conftest import tiny_cfg_dict

ROOT = Path(__file__).resolve().parents[2]
FAMILIES = ("llava", "qwen")
STEPS, HALF = 4, 2  # the script's defaults
# the script's tiny shapes: 2 decoder layers, 2 vision blocks; LoRA on 7 projections of each layer
LM_LAYERS = VISION_BLOCKS = 2
LORA_TENSORS = LM_LAYERS * 7 * 2  # lora_A and lora_B of q, k, v, o, gate, up, down
PREFIX = "base_model.model.model."  # PeftModel -> LoraModel -> *ForConditionalGeneration -> its .model
UNITS = {  # one FSDP unit per decoder layer and vision block, then the root (the rest of the model)
    "llava": [f"{PREFIX}vision_tower.encoder.layers.{i}" for i in range(VISION_BLOCKS)]
    + [f"{PREFIX}language_model.layers.{i}" for i in range(LM_LAYERS)]
    + [""],
    "qwen": [f"{PREFIX}visual.blocks.{i}" for i in range(VISION_BLOCKS)]
    + [f"{PREFIX}language_model.layers.{i}" for i in range(LM_LAYERS)]
    + [""],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sharded")
    env = dict(os.environ, PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    for k in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR"):
        env.pop(k, None)
    cmd = [sys.executable, str(ROOT / "scripts" / "sharded_check.py"), "--out", str(out)]
    proc = subprocess.run(cmd, env=env, cwd=out, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out


def _record(runs: Path, family: str, run: str, rank: int) -> dict:
    return json.loads((runs / family / run / f"rank{rank}.json").read_text())


def _ckpt(runs: Path, family: str, run: str, name: str = "last.ckpt") -> dict:
    return torch.load(runs / family / run / name, map_location="cpu", weights_only=True)


def _close(a: dict, b: dict, exact: bool = False) -> None:
    """Two checkpoints hold the same trainable tensors and optimizer state (``exact``: bit for bit)."""
    tol = dict(rtol=0, atol=0) if exact else dict(rtol=1e-5, atol=1e-6)
    assert a["global_step"] == b["global_step"] == STEPS
    assert a["state_dict"].keys() == b["state_dict"].keys() and len(a["state_dict"]) == LORA_TENSORS
    for k, v in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][k], v, **tol, msg=k)
    oa, ob = a["optimizer_states"][0], b["optimizer_states"][0]
    assert [g["params"] for g in oa["param_groups"]] == [g["params"] for g in ob["param_groups"]]
    assert oa["state"].keys() == ob["state"].keys() and len(oa["state"]) == LORA_TENSORS
    for i, s in oa["state"].items():
        for k, v in s.items():
            torch.testing.assert_close(ob["state"][i][k], v, **tol, msg=f"optimizer {i} {k}")


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_fsdp_loss_matches_ddp_step_for_step(runs, family):
    for rank in (0, 1):  # each rank trains on its own shard of the data
        ddp, fsdp = _record(runs, family, "ddp", rank), _record(runs, family, "fsdp", rank)
        assert len(ddp["losses"]) == len(fsdp["losses"]) == STEPS
        torch.testing.assert_close(fsdp["losses"], ddp["losses"], rtol=1e-6, atol=0)
        for d, f in zip(ddp["terms"], fsdp["terms"]):  # the teacher's terms: it ran, the same
            assert d.keys() == f.keys() == {"kd", "hid"} and d["kd"] > 0 and d["hid"] > 0
            torch.testing.assert_close(f, d, rtol=0, atol=1e-6)  # kd ~3e-4: a difference of log-probs
    assert _record(runs, family, "fsdp", 0)["losses"] != _record(runs, family, "fsdp", 1)["losses"]


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_fsdp_checkpoint_holds_what_ddp_does(runs, family):
    _close(_ckpt(runs, family, "ddp"), _ckpt(runs, family, "fsdp"))


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_fsdp_resumes_exactly(runs, family):
    whole, resumed = _ckpt(runs, family, "fsdp"), _ckpt(runs, family, "fsdp_resumed")
    assert _ckpt(runs, family, "fsdp", f"step{HALF}.ckpt")["global_step"] == HALF
    _close(whole, resumed, exact=True)
    for rank in (0, 1):
        torch.testing.assert_close(
            _record(runs, family, "fsdp_resumed", rank)["losses"],
            _record(runs, family, "fsdp", rank)["losses"][HALF:],
            rtol=0,
            atol=0,
        )


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_resume_across_strategies(runs, family):
    """DDP's step-2 checkpoint continued with FSDP lands where FSDP's own run lands, and the reverse."""
    _close(_ckpt(runs, family, "fsdp"), _ckpt(runs, family, "fsdp_from_ddp"))
    _close(_ckpt(runs, family, "ddp"), _ckpt(runs, family, "ddp_from_fsdp"))
    for run, ref in (("fsdp_from_ddp", "fsdp"), ("ddp_from_fsdp", "ddp")):
        for rank in (0, 1):
            got, want = _record(runs, family, run, rank), _record(runs, family, ref, rank)
            torch.testing.assert_close(got["losses"], want["losses"][HALF:], rtol=1e-6, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_fsdp_export_equals_ddp_export(runs, family):
    ddp, fsdp = runs / family / "ddp" / "export", runs / family / "fsdp" / "export"
    a, b = load_file(ddp / "adapter_model.safetensors"), load_file(fsdp / "adapter_model.safetensors")
    assert a.keys() == b.keys() and len(a) == LORA_TENSORS
    for k, v in a.items():
        torch.testing.assert_close(b[k], v, rtol=1e-5, atol=1e-6, msg=k)
    for name in ("adapter_config.json", "pruning.json"):
        assert json.loads((ddp / name).read_text()) == json.loads((fsdp / name).read_text()), name
    ma, mb = (json.loads((d / "tpkit_export.json").read_text()) for d in (ddp, fsdp))
    metrics_a, metrics_b = ma.pop("metrics"), mb.pop("metrics")
    assert ma == mb  # base (fingerprint included), lora, distill, pruning
    assert (
        metrics_a.keys() == metrics_b.keys() and metrics_a["global_step"] == metrics_b["global_step"] == STEPS
    )
    torch.testing.assert_close(metrics_b["train/loss"], metrics_a["train/loss"], rtol=1e-6, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_one_fsdp_unit_per_decoder_layer_and_vision_block(runs, family):
    for rank in (0, 1):
        assert _record(runs, family, "fsdp", rank)["units"] == UNITS[family]


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_all_gathers_per_step_with_the_online_teacher(runs, family):
    """Per step, each decoder layer is gathered 3 times: the student's forward, the teacher's (the same
    weights, adapter off: a second forward through the freed layer) and the student's backward (Qwen's
    runs checkpoint activations: the recomputation happens inside it); without the teacher it would be
    2, so the teacher costs one all-gather of the language model per step. Stage 2 scores layer 1 with
    its own q/k right before running it: no extra gather. The vision blocks once: the teacher reuses the
    student's tower run, and the frozen tower has no backward; the last one once more for the
    attention-based stage-1 score (LLaVA cls_attn, Qwen attn_received), which uses its q/k after the
    tower ran. The root unit (embeddings, projector, norm, head) stays gathered from the first forward
    to the backward: once."""
    last_block = UNITS[family][VISION_BLOCKS - 1]
    want = {u: 3 if ".language_model." in u else 2 if u == last_block else 1 for u in UNITS[family]}
    for rank in (0, 1):
        gathers = _record(runs, family, "fsdp", rank)["gathers"]
        assert gathers == [want] * STEPS


@pytest.mark.slow
def test_bf16_base_with_fp32_lora_trains_sharded(runs):
    """A GPU run's layout: the frozen base in bf16, LoRA tensors in fp32 in the same units (FSDP1 cannot
    flatten them together; FSDP2 shards each tensor), bf16 autocast: FSDP gives DDP's losses."""
    for rank in (0, 1):
        ddp, fsdp = _record(runs, "llava", "ddp_bf16", rank), _record(runs, "llava", "fsdp_bf16", rank)
        assert len(ddp["losses"]) == len(fsdp["losses"]) == HALF
        torch.testing.assert_close(fsdp["losses"], ddp["losses"], rtol=1e-3, atol=0)
    ckpt = _ckpt(runs, "llava", "fsdp_bf16")
    assert {v.dtype for v in ckpt["state_dict"].values()} == {torch.float32}


# ---------------------------------------------------------------------------------------------------
# in-process


def test_fsdp_on_cpu_builds_a_trainer_lightning_accepts(train_json, processor, tmp_path):
    """Lightning refuses its own FSDPStrategy on a CPU by name; tpkit's FSDP2 strategy is the same code
    on GPUs and CPUs, with the family's blocks as units."""
    from lightning.pytorch.strategies import FSDPStrategy
    from transformers.models.clip.modeling_clip import CLIPEncoderLayer
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from tpkit.training.recipe import build_student, build_trainer
    from tpkit.training.sharding import FullyShardedStrategy

    d = tiny_cfg_dict(
        train_json, tmp_path / "run", trainer={"strategy": "fsdp", "accelerator": "cpu", "devices": 2}
    )
    cfg = from_dict(TrainConfig, d)
    student, _ = build_student(cfg, processor)
    trainer = build_trainer(cfg, model=student)
    assert isinstance(trainer.strategy, FullyShardedStrategy) and trainer.world_size == 2
    assert trainer.strategy.blocks == {LlamaDecoderLayer, CLIPEncoderLayer}
    with pytest.raises(ValueError, match="requires a GPU accelerator"):
        build_trainer(cfg, model=student, strategy=FSDPStrategy())


def test_optimizer_state_by_name_and_back():
    from tpkit.training.sharding import optimizer_state_by_name, optimizer_state_by_position

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)  # a frozen tensor: not in the optimizer, positions skip it
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=0.1)
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    saved = opt.state_dict()
    named = optimizer_state_by_name(saved, opt, model)
    assert list(named["state"]) == ["0.bias", "1.weight", "1.bias"]
    assert named["param_groups"][0]["params"] == ["0.bias", "1.weight", "1.bias"]
    back = optimizer_state_by_position(named)
    assert back["param_groups"] == saved["param_groups"]
    for i, s in saved["state"].items():
        for k, v in s.items():
            assert torch.equal(back["state"][i][k], v)
    fewer = torch.optim.AdamW(params[:2], lr=0.1)
    with pytest.raises(CheckpointError, match="optimizer holds 3 tensors, this run trains 2"):
        optimizer_state_by_name(saved, fewer, model)


@pytest.mark.parametrize(
    "trainer, match",
    [
        ({"strategy": "fsdp", "precision": "16-mixed"}, "use precision: bf16-mixed"),
        ({"strategy": "deepspeed"}, "deepspeed is not supported: .* Use strategy: fsdp"),
    ],
)
def test_strategy_settings_that_cannot_run_are_refused_at_load(train_json, tmp_path, trainer, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(TrainConfig, tiny_cfg_dict(train_json, tmp_path / "run", trainer=trainer))
