"""Graph capture for latency: what a pruned prefill and a decoding step run on the accelerator,
compiled with ``torch.compile`` (``mode="reduce-overhead"`` records CUDA graphs).

A compiled region must see fixed shapes and must not wait for the host. The pruned path is split so:
stage-1 selection and stage-2 selection (which read kept counts on the host) run eagerly; the two
decoder-layer groups of the prefill (:func:`tpkit.models.core.prefill.run_group`) and the whole
decoding step (:func:`tpkit.models.core.generate.decode_step`) are compiled. ``pruning.bucket``
rounds the pruned lengths to a few values (so the layer groups see a few shapes), and the cache of
a compiled model is static (:class:`tpkit.models.core.cache.PrunedCache` with ``static_extra``), so
every decoding step has the same shapes and updates its lengths on the device.

The dense path, to compare under the same mode, compiles the stock language model's forward; its
``generate`` uses transformers' static cache (``cache_implementation="static"``).
"""

from __future__ import annotations

import torch
from torch import nn

from tpkit.models.core.attach import unwrap
from tpkit.models.core.generate import decode_step
from tpkit.models.core.prefill import run_group
from tpkit.models.core.state import find_state

__all__ = ["COMPILE_MODES", "compile_model", "is_compiled"]

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")


def compile_model(model: nn.Module, mode: str = "reduce-overhead", backend: str = "inductor") -> nn.Module:
    """Compile an attached model's prefill layer groups and decoding step, and its stock language
    model (the dense path), with ``torch.compile(mode=mode)``; returns the same object.

    ``backend="eager"`` traces without compiling (a check, on any device, that the regions capture
    whole: ``fullgraph`` fails on a graph break such as a host sync).
    """
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode {mode!r} must be one of {', '.join(COMPILE_MODES)}")
    inner = unwrap(model)
    state = find_state(inner)
    if state is None:
        raise ValueError("compile_model: attach the pruner first (attach_pruner)")
    options = {"mode": mode} if backend == "inductor" else {}
    state.compiled = {
        "group": torch.compile(run_group, backend=backend, fullgraph=True, dynamic=False, **options),
        "decode": torch.compile(decode_step, backend=backend, fullgraph=True, dynamic=False, **options),
    }
    lm = state.family.language_model(inner)
    lm.forward = torch.compile(lm.forward, backend=backend, dynamic=False, **options)
    return model


def is_compiled(model: nn.Module) -> bool:
    state = find_state(unwrap(model))
    return state is not None and bool(state.compiled)
