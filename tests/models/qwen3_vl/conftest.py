"""Tiny random Qwen3-VL / Qwen3-VL-MoE / Qwen3.5 models and left-padded batches laid out as Qwen3-VL's
processor does.

* ``qwen3_factory(variant="qwen3-vl", attn="sdpa", seed=0, **config_kwargs)`` -> a fresh tiny model
  (eval, fp32): patch 2, 2x2 merge, 4 tower blocks (DeepStack from blocks 0, 1, 2 into LM layers 0, 1,
  2), 4 LM layers of width 64 (Qwen3.5: [Gated DeltaNet, full, Gated DeltaNet, full]).
* ``build_qwen3_batch(model, samples, seed=0, answer=None)``: Qwen2-VL's test batches
  (:func:`tests.models.qwen2_vl.conftest.build_qwen_batch`) with Qwen3-VL's video layout: each frame its
  own ``<|vision_start|>`` ... ``<|vision_end|>`` run after 3 timestamp text tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest

from tests.models.qwen2_vl.conftest import build_qwen_batch
from tpkit.models.qwen3_vl.tiny import build_tiny_qwen3

FRAME_TEXT = 3  # "<0.5 seconds>" before each frame, as random text tokens


def build_qwen3_batch(model, samples: Sequence[Sequence[tuple]], seed: int = 0, answer=None) -> dict:
    return build_qwen_batch(model, samples, seed=seed, answer=answer, frame_text=FRAME_TEXT)


@pytest.fixture
def qwen3_factory() -> Callable:
    def make(variant: str = "qwen3-vl", attn: str = "sdpa", seed: int = 0, **kwargs):
        return build_tiny_qwen3(variant, seed=seed, attn_implementation=attn, **kwargs)

    return make


@pytest.fixture
def make_qwen3_batch() -> Callable:
    return build_qwen3_batch
