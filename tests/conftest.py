"""Shared fixtures: tiny random LLaVA models (tpkit.models.llava.tiny) and left-padded multimodal batches.

Generic on purpose (other test packages use them):

* ``tiny_llava_factory(backbone="llama", attn="sdpa", seed=0, **config_kwargs)`` -> a fresh tiny
  ``LlavaForConditionalGeneration`` (eval, fp32): image 32, patch 8 -> 16 image tokens, 4 LM layers.
* ``tiny_llava`` -> ``tiny_llava_factory()``.
* ``make_llava_batch(model, before=(3, 5), after=(4, 2), seed=0, answer=None)`` -> dict with
  ``input_ids``/``attention_mask`` (B, T) left-padded, ``pixel_values`` (B, 3, S, S), and
  ``answer_mask`` (B, T) bool when ``answer`` gives per-sample answer lengths (the last tokens).
  Sample i is ``[bos] + before[i] text + image run + after[i] text (+ answer[i] text)``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import pytest
import torch

from tpkit.models.llava.tiny import build_tiny_llava

# Tiny models are launch-bound: one intra-op thread is ~10x faster than two when the 2-core CI box
# is busy (OpenMP spin contention). TPKIT_TEST_THREADS overrides.
torch.set_num_threads(int(os.environ.get("TPKIT_TEST_THREADS", "1")))

BOS, EOS, IMAGE, PAD = 1, 2, 3, 0
FIRST_TEXT_ID = 4


def build_llava_batch(
    model,
    before: Sequence[int] = (3, 5),
    after: Sequence[int] = (4, 2),
    seed: int = 0,
    answer: Sequence[int] | None = None,
) -> dict[str, torch.Tensor]:
    cfg = model.config
    vc = cfg.vision_config
    n_img = (vc.image_size // vc.patch_size) ** 2 + int(cfg.vision_feature_select_strategy == "full")
    vocab = cfg.text_config.vocab_size
    g = torch.Generator().manual_seed(seed)
    rows, answers = [], []
    for i, (a, c) in enumerate(zip(before, after)):
        n_ans = answer[i] if answer is not None else 0
        text = torch.randint(FIRST_TEXT_ID, vocab, (a + c + n_ans,), generator=g)
        row = torch.cat([torch.tensor([BOS]), text[:a], torch.full((n_img,), cfg.image_token_id), text[a:]])
        rows.append(row)
        answers.append(n_ans)
    t = max(len(r) for r in rows)
    b = len(rows)
    input_ids = torch.full((b, t), PAD, dtype=torch.long)
    attention_mask = torch.zeros(b, t, dtype=torch.long)
    answer_mask = torch.zeros(b, t, dtype=torch.bool)
    for i, r in enumerate(rows):
        input_ids[i, t - len(r) :] = r
        attention_mask[i, t - len(r) :] = 1
        if answers[i]:
            answer_mask[i, t - answers[i] :] = True
    pixel_values = torch.randn(b, 3, vc.image_size, vc.image_size, generator=g)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}
    if answer is not None:
        batch["answer_mask"] = answer_mask
    return batch


@pytest.fixture
def tiny_llava_factory() -> Callable:
    def make(backbone: str = "llama", attn: str = "sdpa", seed: int = 0, **kwargs):
        return build_tiny_llava(backbone, seed=seed, attn_implementation=attn, **kwargs)

    return make


@pytest.fixture
def tiny_llava(tiny_llava_factory):
    return tiny_llava_factory()


@pytest.fixture
def make_llava_batch() -> Callable:
    return build_llava_batch


@pytest.fixture
def unreachable_hub(tmp_path) -> tuple[dict[str, str], str]:
    """(env, endpoint) for a subprocess whose model hub cannot be reached: HF_ENDPOINT a local port
    nothing listens on, HF_HUB_OFFLINE unset, an empty hub cache under ``tmp_path/hf``."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{s.getsockname()[1]}"
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf"))
    return env, endpoint
