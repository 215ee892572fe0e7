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

``--random-init NAME`` (:mod:`tpkit.evaluation.random_init`) times a full-size architecture with
random weights (:func:`tpkit.models.registry.architectures`) on a prompt from :func:`random_prompt_batch`.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

from tpkit.evaluation.methods import MethodSpec
from tpkit.models.core.attach import set_pruning
from tpkit.models.core.compile import compile_model, is_compiled
from tpkit.models.families import model_inputs
from tpkit.models.registry import family_of

__all__ = [
    "LMShape",
    "speed_table",
    "torch_threads",
    "random_prompt_batch",
    "time_calls",
    "summarize_times",
    "layer_flops",
    "prefill_flops",
    "prefill_call",
    "generate_call",
    "StepClock",
    "peak_memory_mb",
    "reset_peak_memory",
]


def random_prompt_batch(
    model,
    batch_size: int,
    text_before: int = 35,
    text_after: int = 29,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> dict[str, torch.Tensor]:
    """A random prompt batch shaped like the family's real ones: ``text_before`` tokens (bos +
    system), the visual placeholders of one image (any-res: its crops; Qwen: its merged units),
    ``text_after`` instruction tokens, and the visual inputs. LLaVA-1.5-7B: 35 + 576 + 29 = 640."""
    device = device or next(model.parameters()).device
    return family_of(model).random_prompt(
        model, batch_size, text_before, text_after, seed, torch.device(device)
    )


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
    kwargs = model_inputs(model, batch)
    kwargs.update(extra or {})
    kwargs["use_cache"] = False
    kwargs["logits_to_keep"] = 1  # stock LLaVA and the pruner both take it: no (B, T, V) logits

    @torch.inference_mode()
    def run():
        return model(**kwargs)

    return run


class StepClock(StoppingCriteria):
    """A stopping criterion that stops nothing and notes the time: ``generate`` calls it once per new
    token, so the call after the first token ends the time to first token and the call after the last
    one ends the decoding. Synchronizes the device at those two calls only."""

    def __init__(self, device: torch.device, new_tokens: int):
        self.device, self.new_tokens = torch.device(device), new_tokens
        self.start = 0.0
        self.marks: list[float] = []
        self.runs: list[tuple[float, float]] = []  # per generate call: (ttft ms, decode ms)
        self._calls = 0

    def begin(self) -> None:
        _sync(self.device)
        self._calls, self.marks, self.start = 0, [], time.perf_counter()

    def end(self) -> None:
        if len(self.marks) == 2:
            first, last = self.marks
            self.runs.append(((first - self.start) * 1e3, (last - first) * 1e3))

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        self._calls += 1
        if self._calls in (1, self.new_tokens):
            _sync(self.device)
            self.marks.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def generate_call(
    model,
    batch: dict,
    new_tokens: int,
    extra: dict | None = None,
    static: bool = False,
    clock: StepClock | None = None,
) -> Callable[[], object]:
    """Greedy ``generate`` of exactly ``new_tokens`` tokens: no eos (the model's generation config
    loses its eos while the call runs), so every method decodes the same number of steps. ``static``:
    transformers' static cache (the dense path of a compiled model; the pruned path makes its own).
    ``clock`` (a :class:`StepClock` for ``new_tokens``) records each call's time to first token and
    decoding time."""
    kwargs = model_inputs(model, batch)
    kwargs.update(extra or {})
    if static:  # fixed shapes for the compiled language model; tpkit compiled it, generate must not again
        kwargs.update(cache_implementation="static", disable_compile=True)
    if clock is not None:
        kwargs["stopping_criteria"] = StoppingCriteriaList([clock])

    @torch.inference_mode()
    def run():
        gc = model.generation_config
        saved = gc.eos_token_id
        gc.eos_token_id = None
        if clock is not None:
            clock.begin()
        try:
            return model.generate(**kwargs, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None)
        finally:
            gc.eos_token_id = saved
            if clock is not None:
                clock.end()

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


def speed_table(
    model,
    specs: list[MethodSpec],
    batch: dict,
    index: torch.Tensor,
    device: torch.device,
    warmup: int,
    repeats: int,
    decode_tokens: int = 16,
    generation: list[str] | None = None,
    progress: bool = True,
    compile: str = "none",
) -> dict[str, dict]:
    """Per spec: prefill median/p90 ms, samples/s, optional time to first token and decode tok/s,
    peak memory; ``prefill_speedup``, ``ttft_speedup`` and ``decode_speedup`` relative to the spec
    named ``dense``. ``compile`` (a ``torch.compile`` mode, or "none") compiles the model's dense and
    pruned paths alike first (:func:`tpkit.models.core.compile.compile_model`); the warm-up rounds
    then include the compilation.

    All timed calls are interleaved round by round (dense, ours, ..., dense, ours, ...), each one
    switching the pruner's config first (an attribute assignment), so that load from other processes
    and clock changes hit every method alike. ``generation`` names the specs whose ``generate`` is
    timed too; peak memory comes from one separate prefill + generate per spec (CUDA only).
    """
    bsz = batch["input_ids"].shape[0]
    compiled = compile != "none"
    if compiled and not is_compiled(model):
        compile_model(model, compile)

    def with_cfg(spec: MethodSpec, fn):
        def run():
            set_pruning(model, spec.pruning)
            return fn()

        return run

    fns = {}
    clocks: dict[str, StepClock] = {}
    for spec in specs:
        extra = spec.forced(index, device)
        fns[(spec.name, "prefill")] = with_cfg(spec, prefill_call(model, batch, extra))
        if generation is not None and spec.name in generation:
            static = compiled and not spec.pruning.enabled
            clocks[spec.name] = StepClock(device, 1 + decode_tokens)
            fns[(spec.name, "generate")] = with_cfg(
                spec, generate_call(model, batch, 1 + decode_tokens, extra, static, clocks[spec.name])
            )
    times = time_calls(fns, device, repeats, warmup, progress)
    out: dict[str, dict] = {}
    for spec in specs:
        r: dict[str, Any] = {"batch_size": bsz, "prefill": summarize_times(times[(spec.name, "prefill")])}
        r["samples_per_s"] = 1e3 * bsz / r["prefill"]["median_ms"]
        if spec.name in clocks:  # the timed rounds' (time to first token, decoding time)
            ttft, decode = zip(*clocks[spec.name].runs[-repeats:])
            r["ttft_ms"] = statistics.median(ttft)
            r["decode_ms"] = statistics.median(decode)
            r["ttft_p90_ms"] = summarize_times(ttft)["p90_ms"]
            r["decode_p90_ms"] = summarize_times(decode)["p90_ms"]
            r["decode_tokens_per_s"] = 1e3 * bsz * decode_tokens / r["decode_ms"]
        if device.type == "cuda":
            reset_peak_memory(device)
            fns[(spec.name, "prefill")]()
            if (spec.name, "generate") in fns:
                fns[(spec.name, "generate")]()
        r["peak_memory_mb"] = peak_memory_mb(device)
        out[spec.name] = r
    if "dense" in out:
        base = out["dense"]["prefill"]["median_ms"]
        for r in out.values():
            r["prefill_speedup"] = base / r["prefill"]["median_ms"]
            if "ttft_ms" in r and "ttft_ms" in out["dense"]:
                r["ttft_speedup"] = out["dense"]["ttft_ms"] / r["ttft_ms"]
            dense_tps, tps = out["dense"].get("decode_tokens_per_s"), r.get("decode_tokens_per_s")
            if dense_tps and tps:
                r["decode_speedup"] = tps / dense_tps
    return out
