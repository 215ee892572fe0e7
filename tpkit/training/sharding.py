"""``trainer.strategy: fsdp``: the model sharded with FSDP2 (torch's ``fully_shard``), one unit per
decoder layer and vision block, on GPUs (NCCL) or CPU processes (gloo) alike.

Why FSDP2 (Lightning's :class:`~lightning.pytorch.strategies.ModelParallelStrategy`) and not Lightning's
``FSDPStrategy`` (FSDP1):

* FSDP1 flattens the tensors of a unit into one buffer of one dtype, and a LoRA run keeps its trainable
  tensors in fp32 beside a bf16 base: wrapping fails ("Must flatten tensors with uniform dtype").
  FSDP2 shards each tensor on its own (DTensor) and all-gathers a unit of mixed dtypes in one call.
* The same code runs on CPU ranks: Lightning refuses ``FSDPStrategy`` off CUDA by name, and FSDP1 needs
  an accelerator device; FSDP2 shards over a device mesh of any device type. A CPU run is the GPU
  run's code path with the gloo backend, which is how the tests prove it (scripts/sharded_check.py).

The units are the family's :meth:`~tpkit.models.core.family.Family.fsdp_blocks` (the model's own
``_no_split_modules`` blocks), then the rest of the model (embeddings, projector, norms, LM head) as
the root unit. :meth:`DistillLoRAModule.configure_model <tpkit.training.module.DistillLoRAModule>`
asks the strategy to shard, as Lightning's model-parallel strategies expect.

Checkpoints are the file a DDP run writes: the trainable tensors gathered whole on rank 0 (the frozen
base is never gathered), the optimizer state in torch's own format (tensors keyed by their position in
the optimizer), written atomically. So ``--resume`` continues a DDP checkpoint with FSDP and an FSDP
checkpoint with DDP (same world size: the data order is sharded by rank), and ``tpkit export``
reads either.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn

from tpkit.training.checkpoint import AtomicCheckpointIO
from tpkit.training.rundir import CheckpointError, load_checkpoint

__all__ = ["FullyShardedStrategy", "optimizer_state_by_name", "optimizer_state_by_position"]


def optimizer_state_by_position(state: dict[str, Any]) -> dict[str, Any]:
    """A full optimizer state keyed by parameter names (``get_optimizer_state_dict``) -> torch's own
    format, keyed by each tensor's position in the optimizer's groups (what ``optimizer.state_dict()``
    of a DDP run holds)."""
    order = [name for group in state["param_groups"] for name in group["params"]]
    pos = {name: i for i, name in enumerate(order)}
    return {
        "state": {pos[name]: s for name, s in state["state"].items()},
        "param_groups": [{**g, "params": [pos[n] for n in g["params"]]} for g in state["param_groups"]],
    }


def optimizer_state_by_name(
    state: dict[str, Any], optimizer: torch.optim.Optimizer, model: nn.Module
) -> dict[str, Any]:
    """The inverse of :func:`optimizer_state_by_position` for ``optimizer`` over ``model``'s parameters."""
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    saved = [i for g in state["param_groups"] for i in g["params"]]
    if len(saved) != len(order):
        raise CheckpointError(
            f"the checkpoint's optimizer holds {len(saved)} tensors, this run trains {len(order)}: "
            "was it written with another lora/model config?"
        )
    return {
        "state": {order[i]: s for i, s in state["state"].items()},
        "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in state["param_groups"]],
    }


class FullyShardedStrategy(ModelParallelStrategy):
    """FSDP2 over every rank (data parallel only), one unit per block of ``blocks`` (module classes)."""

    def __init__(self, blocks: set[type]) -> None:
        super().__init__(save_distributed_checkpoint=False)
        if not blocks:
            raise ValueError("trainer.strategy = fsdp: the model family names no block classes to shard")
        self.blocks = frozenset(blocks)
        self.checkpoint_io = AtomicCheckpointIO()
        self.units: list[str] = []  # the sharded modules' names, the root ("") last

    def setup_environment(self) -> None:
        # every process is one shard of a 1-D data-parallel mesh (no tensor parallelism)
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()

    def shard(self, model: nn.Module) -> None:
        """``fully_shard`` each block of ``model``, then ``model`` itself (the root unit). Called once,
        from the LightningModule's ``configure_model``."""
        from torch.distributed.fsdp import fully_shard

        if self.units:
            return
        mesh = self.device_mesh["data_parallel"]
        units = [(name, m) for name, m in model.named_modules() if type(m) in self.blocks]
        if not units:
            names = ", ".join(sorted(c.__name__ for c in self.blocks))
            raise ValueError(f"trainer.strategy = fsdp: {type(model).__name__} has no module of {names}")
        for _, module in units:
            fully_shard(module, mesh=mesh)
        fully_shard(model, mesh=mesh)
        self.units = [name for name, _ in units] + [""]

    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The trainable tensors, whole, on rank 0 (empty elsewhere): what a tpkit checkpoint keeps
        (:meth:`DistillLoRAModule.on_save_checkpoint`); the frozen base is not gathered."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        return get_model_state_dict(self.model, options=options)

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The optimizer state, whole, on rank 0, in torch's positional format (as DDP saves it)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_optimizer_state_dict(self.model, optimizer, options=options)
        return optimizer_state_by_position(state) if self.is_global_zero else {}

    def load_checkpoint(
        self, checkpoint_path: str | Path, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Read a tpkit checkpoint (DDP's or this strategy's: the same file) on every rank, tensors and
        plain containers only, and load its trainable tensors and optimizer state into the shards."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        path = Path(self.broadcast(str(checkpoint_path)))
        checkpoint = load_checkpoint(path)
        full = StateDictOptions(full_state_dict=True, strict=False)  # trainable tensors only
        set_model_state_dict(self.model, checkpoint["state_dict"], options=full)
        if self.lightning_module.trainer.state.fn == TrainerFn.FITTING:
            states = checkpoint.get("optimizer_states") or []
            if len(states) != len(self.optimizers):
                raise CheckpointError(
                    f"{path}: holds {len(states)} optimizer states, this run has {len(self.optimizers)}"
                )
            for optimizer, state in zip(self.optimizers, states):
                named = optimizer_state_by_name(state, optimizer, self.model)
                set_optimizer_state_dict(
                    self.model, optimizer, named, options=StateDictOptions(full_state_dict=True)
                )
        return checkpoint
