"""Speed measurement: prefill latency, time to first token, decode throughput, memory, FLOPs.

Timing uses CUDA events on a GPU and ``time.perf_counter`` on a CPU, reports the median and p90
over ``repeats`` after ``warmup`` untimed runs, and interleaves the methods being compared (dense,
ours, dense, ours, ...) so that clock drift and thermal state hit them alike.

FLOPs estimate (FastV-style, the language model's prefill only): a decoder layer that sees ``n``
tokens costs

    4 * n * d**2  +  2 * n**2 * d  +  2 * n * d * m

(Q/K/V/O projections, attention scores and weighted sum, the FFN), ``d`` the hidden size and ``m``
the FFN size. Summed over layers with ``n`` the tokens at that layer (``n1`` before the stage-2
layer, ``k2`` after) and averaged over samples. It ignores the vision tower (identical for every
method), GQA savings and the third SwiGLU matrix, like FastV's own formula.

``--random-init NAME`` builds a full-size architecture (:data:`ARCHITECTURES`) with random weights
directly on the target device and dtype (no CPU init), for speed-only runs.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "ARCHITECTURES",
    "build_random_init",
    "random_prompt_batch",
    "time_calls",
    "summarize_times",
    "layer_flops",
    "prefill_flops",
    "prefill_call",
    "generate_call",
    "peak_memory_mb",
    "reset_peak_memory",
]

# name -> kwargs of tpkit.models.tiny.tiny_llava_config (the same builder, full-size numbers)
ARCHITECTURES: dict[str, dict] = {
    # CLIP ViT-L/14-336 (24 layers, 1024-d, 576 patches) + Vicuna-7B (Llama, 4096-d, 32 layers)
    "llava-1.5-7b": dict(
        text_backbone="llama",
        vocab_size=32064,
        image_token_id=32000,
        pad_token_id=32001,
        image_size=336,
        patch_size=14,
        vision_hidden=1024,
        vision_layers=24,
        vision_heads=16,
        hidden_size=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=32,
        intermediate_size=11008,
        max_position_embeddings=4096,
    ),
    # same tower + Vicuna-13B (5120-d, 40 layers)
    "llava-1.5-13b": dict(
        text_backbone="llama",
        vocab_size=32064,
        image_token_id=32000,
        pad_token_id=32001,
        image_size=336,
        patch_size=14,
        vision_hidden=1024,
        vision_layers=24,
        vision_heads=16,
        hidden_size=5120,
        num_layers=40,
        num_heads=40,
        num_kv_heads=40,
        intermediate_size=13824,
        max_position_embeddings=4096,
    ),
    # benchmarks/prefill_speed.py: LLaVA-1.5's token counts (576 patches) with a small tower and an
    # LM large enough (512-d, 8 layers, batch 8) that compute, not overhead, dominates on a CPU
    "cpu-bench": dict(
        text_backbone="llama",
        vocab_size=1024,
        image_token_id=3,
        pad_token_id=0,
        image_size=336,
        patch_size=14,
        vision_hidden=64,
        vision_layers=2,
        vision_heads=2,
        hidden_size=512,
        num_layers=8,
        num_heads=8,
        num_kv_heads=8,
        intermediate_size=1376,
        max_position_embeddings=2048,
    ),
}

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def architecture_kwargs(name: str, scale_down: int = 1) -> dict:
    """Config kwargs of a named architecture; ``scale_down`` divides widths (not depths, not token
    counts) so a CPU can run the same code path in seconds."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(sorted(ARCHITECTURES))}")
    kw = dict(ARCHITECTURES[name])
    if scale_down < 1:
        raise ValueError(f"scale_down = {scale_down} must be >= 1")
    if scale_down > 1:
        for k in ("vision_hidden", "vision_heads", "hidden_size", "num_heads", "num_kv_heads"):
            kw[k] = max(1, kw[k] // scale_down)
        kw["intermediate_size"] = max(8, kw["intermediate_size"] // scale_down)
    return kw


def build_random_init(
    name: str,
    device: str | torch.device = "cuda",
    dtype: str | torch.dtype = "bfloat16",
    attn_implementation: str = "sdpa",
    scale_down: int = 1,
    seed: int = 0,
):
    """A ``LlavaForConditionalGeneration`` of architecture ``name`` with random weights, in eval mode.

    Parameters are allocated and initialised on ``device`` in ``dtype`` (default-dtype switch plus a
    ``torch.device`` context), so a 7B model appears in seconds on a GPU instead of minutes of CPU
    init followed by a copy.
    """
    from transformers import LlavaForConditionalGeneration

    from tpkit.models.tiny import tiny_llava_config

    dtype = _DTYPES[dtype] if isinstance(dtype, str) else dtype
    kw = architecture_kwargs(name, scale_down)
    backbone = kw.pop("text_backbone")
    cfg = tiny_llava_config(backbone, attn_implementation=attn_implementation, **kw)
    torch.manual_seed(seed)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlavaForConditionalGeneration(cfg)
    finally:
        torch.set_default_dtype(prev)
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(attn_implementation)
    return model.eval()


def random_prompt_batch(
    model,
    batch_size: int,
    text_before: int = 35,
    text_after: int = 29,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> dict[str, torch.Tensor]:
    """A LLaVA-shaped prompt batch: ``text_before`` tokens (bos + system), the image placeholder
    run, ``text_after`` instruction tokens. LLaVA-1.5-7B: 35 + 576 + 29 = 640 tokens."""
    cfg = model.config
    vcfg = cfg.vision_config
    n_vis = (vcfg.image_size // vcfg.patch_size) ** 2
    device = device or next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    g = torch.Generator().manual_seed(seed)
    vocab = cfg.text_config.vocab_size
    image_id = cfg.image_token_id
    specials = {0, 1, 2, image_id, getattr(cfg, "pad_token_id", None)}
    low = 4
    high = min(vocab, image_id) if image_id >= low + 16 else vocab

    def text(n: int) -> torch.Tensor:  # (B, n)
        ids = torch.randint(low, high, (batch_size, n), generator=g)
        for s in specials:
            if s is not None:
                ids[ids == s] = low
        return ids

    bos = torch.full((batch_size, 1), 1, dtype=torch.long)
    image = torch.full((batch_size, n_vis), image_id, dtype=torch.long)
    input_ids = torch.cat([bos, text(text_before - 1), image, text(text_after)], dim=1)  # (B, T)
    pixel_values = torch.randn(batch_size, 3, vcfg.image_size, vcfg.image_size, generator=g)
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": torch.ones_like(input_ids).to(device),
        "pixel_values": pixel_values.to(device=device, dtype=dtype),
    }


# --------------------------------------------------------------------------------------------
# timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(
    fns: dict, device: torch.device | str, repeats: int, warmup: int, progress: bool = False
) -> dict[object, list[float]]:
    """Run each callable ``warmup`` times, then ``repeats`` rounds, interleaved; -> key -> [ms]."""
    device = torch.device(device)
    rounds = range(warmup + repeats)
    if progress:
        from tqdm.auto import tqdm

        rounds = tqdm(rounds, desc=f"timing {len(fns)} calls ({warmup} warm-up rounds)", leave=False)
    it = iter(rounds)
    for _ in range(warmup):
        next(it)
        for fn in fns.values():
            fn()
    _sync(device)
    times: dict[object, list[float]] = {k: [] for k in fns}
    for _ in it:
        for name, fn in fns.items():
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize(device)
                times[name].append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def summarize_times(ms: Sequence[float]) -> dict:
    """Median, p90, mean and min of a list of milliseconds."""
    s = sorted(ms)
    p90 = s[min(len(s) - 1, max(0, round(0.9 * (len(s) - 1))))]
    return {"median_ms": statistics.median(s), "p90_ms": p90, "mean_ms": statistics.fmean(s), "min_ms": s[0]}


def reset_peak_memory(device: torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float | None:
    """Peak allocated GPU memory since the last reset (MiB); None on CPU (no allocator stats)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return None


# --------------------------------------------------------------------------------------------
# calls that the timers run


def prefill_call(model, batch: dict, extra: dict | None = None) -> Callable[[], object]:
    """One prefill forward (vision tower + projector + LM over the prompt) without a cache;
    only the last position's logits are computed."""
    kwargs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    kwargs.update(extra or {})
    kwargs["use_cache"] = False
    kwargs["logits_to_keep"] = 1  # stock LLaVA and the pruner both take it: no (B, T, V) logits

    @torch.inference_mode()
    def run():
        return model(**kwargs)

    return run


def generate_call(model, batch: dict, new_tokens: int, extra: dict | None = None) -> Callable[[], object]:
    """Greedy ``generate`` of exactly ``new_tokens`` tokens: no eos (the model's generation config
    loses its eos while the call runs), so every method decodes the same number of steps."""
    kwargs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    kwargs.update(extra or {})

    @torch.inference_mode()
    def run():
        gc = model.generation_config
        saved = gc.eos_token_id
        gc.eos_token_id = None
        try:
            return model.generate(**kwargs, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None)
        finally:
            gc.eos_token_id = saved

    return run


# --------------------------------------------------------------------------------------------
# FLOPs


def layer_flops(n: torch.Tensor | float, hidden: int, ffn: int) -> torch.Tensor:
    """FastV-style FLOPs of one decoder layer over ``n`` tokens: 4nd^2 + 2n^2d + 2ndm."""
    n = torch.as_tensor(n, dtype=torch.float64)
    return 4 * n * hidden**2 + 2 * n**2 * hidden + 2 * n * hidden * ffn


def prefill_flops(
    n1: torch.Tensor, k2: torch.Tensor | None, num_layers: int, layer: int, hidden: int, ffn: int
) -> torch.Tensor:
    """Per-sample LM prefill FLOPs (B,): layers < ``layer`` see ``n1`` tokens, the rest ``k2``
    (``k2=None``: no stage 2, every layer sees ``n1``)."""
    n1 = torch.as_tensor(n1, dtype=torch.float64)
    if k2 is None:
        return num_layers * layer_flops(n1, hidden, ffn)
    k2 = torch.as_tensor(k2, dtype=torch.float64)
    return layer * layer_flops(n1, hidden, ffn) + (num_layers - layer) * layer_flops(k2, hidden, ffn)


@dataclass
class LMShape:
    """The language model numbers the FLOPs formula needs."""

    num_layers: int
    hidden: int
    ffn: int

    @classmethod
    def of(cls, model) -> LMShape:
        t = model.config.text_config
        return cls(t.num_hidden_layers, t.hidden_size, t.intermediate_size)


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Temporarily set torch's intra-op thread count (None = leave it)."""
    if not n:
        yield
        return
    prev = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)
