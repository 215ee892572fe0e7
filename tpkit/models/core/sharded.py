"""Calls into one block of a sharded model that do not go through the block's own forward.

Under ``trainer.strategy: fsdp`` every decoder layer and vision block is one FSDP2 unit
(:mod:`tpkit.training.sharding`): each rank holds a shard of its parameters, gathered by the block's
forward pre-hook and freed after its forward. The pruner also uses a block's own projections outside
that forward: stage 2 scores with layer K's q/k right before layer K runs, the attention-based stage-1
scores use the last tower block's q/k after the tower ran. :func:`gathered` makes the block whole for
such a call; on a model that is not sharded it does nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
from torch import nn

__all__ = ["gathered", "is_sharded_unit", "with_gathered"]

T = TypeVar("T")


def is_sharded_unit(module: nn.Module) -> bool:
    """Whether ``module`` is an FSDP2 unit (``torch.distributed.fsdp.fully_shard`` applied to it)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


@contextlib.contextmanager
def gathered(module: nn.Module, *, for_forward: bool = False) -> Iterator[None]:
    """Inside the block, ``module``'s own parameters are whole on every rank (one all-gather, a
    collective: every rank enters the block together, as every rank runs the same forward).

    ``for_forward``: the module's own forward comes next (stage 2 scores layer K, then runs it): the
    parameters stay gathered for it, which frees them after it runs, so scoring costs no second
    all-gather. Otherwise they are freed on leaving the block.
    """
    if not is_sharded_unit(module):
        yield
        return
    module.unshard()
    try:
        yield
    finally:
        if not for_forward:
            module.reshard()


def with_gathered(module: nn.Module, fn: Callable[..., T]) -> Callable[..., T]:
    """``fn``, called with ``module``'s parameters gathered (:func:`gathered`): a lazy score that uses
    a block's own projections (:func:`tpkit.pruning.stage1.encoder_attention`)."""

    def call(*args: Any, **kwargs: Any) -> T:
        with gathered(module):
            return fn(*args, **kwargs)

    return call
