"""``--model tpkit``: a pruned (or dense) model of any family tpkit prunes (LLaVA-1.5, LLaVA-NeXT,
LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL, InternVL) answering lmms-eval's requests.

Requests become LLaVA-JSON-style records (one ``<image>`` per image, one ``<video>`` per video, then
the task's text, as the user turn) and go through :class:`tpkit.data.collator.LlavaCollator`, so the
prompt is the one ``tpkit evaluate`` builds for the same question: the model's chat template, left
padding, the processor's placeholder runs. Batches are ragged: every sample keeps its own k1 and k2
in one forward.

What a request may carry is the family's to say (``Family.harness``, a
:class:`tpkit.models.core.family.HarnessSupport`): several images (any-res models), videos (lmms-eval
hands a file path; :func:`tpkit.data.video.load_video` samples up to ``max_frames`` frames, which the
processor encodes: OneVision's ``pixel_values_videos``, Qwen's patches and ``video_grid_thw``), or
none (a text-only request: the stock forward answers it, in batches of text-only requests, and its
accounting says so: no visual tokens, fraction 1). A request the family does not take fails before
any model runs, naming the task, the document, the family and what it takes.

* ``generate_until``: greedy (or sampled, when a task asks) ``generate`` with the pruner in it; the
  ``until`` strings cut the text afterwards. Each answer carries a :class:`PrunedTokenCounts`, which
  lmms-eval writes to the logged samples (``token_counts``).
* ``loglikelihood``: one forward over prompt + continuation with the continuation as answer tokens:
  the pruner scores the context with the instruction's queries (causal: the continuation never
  changes which context tokens stay) and never drops a continuation token nor the token before it.
  Returns lmms-eval's convention, which ``multiple_choice`` takes the argmin of: the mean negative
  log-likelihood per continuation token, and whether greedy decoding would produce the continuation.
* ``generate_until_multi_round``: each round's context (a string, or a JSON conversation whose
  earlier turns become chat history) answered as above, until the task's ``doc_to_text`` ends it.

Token accounting of every answered request is summarised when lmms-eval calls :meth:`TpkitLMM.clean`
(after the last request, before scoring) into its throughput metrics (``results["throughput"]``:
``avg_tpkit_<count>_<mean|p5|p95>``), gathered over ranks.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import torch
import torch.nn.functional as F
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from lmms_eval.models.model_utils.gen_metrics import log_metrics
from lmms_eval.utils import simple_parse_args_string
from tqdm.auto import tqdm

from tpkit.config import ConfigError, from_dict
from tpkit.data.collator import LlavaCollator
from tpkit.data.labels import IGNORE_INDEX, next_token_targets
from tpkit.evaluation.config import EvalConfig
from tpkit.evaluation.harness.config import (
    apply_pruning_overrides,
    parse_method,
    parse_model_args,
    read_pruning_yaml,
)
from tpkit.evaluation.methods import METHODS, MethodSpec, OursStats, method_spec, sweep_spec
from tpkit.evaluation.runner import EvalError, load_model_and_processor, prefill_stats
from tpkit.models.config import ModelConfig
from tpkit.models.core.attach import set_pruning
from tpkit.models.families import device_inputs
from tpkit.models.registry import family_of
from tpkit.pruning.config import PruningConfig

__all__ = ["PrunedTokenCounts", "TpkitLMM", "summarise_counts"]

# per-sample counts of the token accounting, as last_stats names them
COUNTS = ("n_dense", "n_visual", "k1", "n_prompt", "k2", "token_layer_fraction")
# what a request carried, per sample: images, videos, frames sampled from its videos
VISUALS = ("n_images", "n_videos", "n_frames")
# request kinds the run summary breaks the accounting down by
KINDS = ("text", "image", "images", "video")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def request_kind(n_images: int, n_videos: int) -> str:
    """A request's kind (:data:`KINDS`): no visual, one image, several images, or any video."""
    if n_videos:
        return "video"
    return "text" if n_images == 0 else "image" if n_images == 1 else "images"


@dataclass
class PrunedTokenCounts(TokenCounts):
    """lmms-eval's per-request token counts plus the pruner's: ``input_tokens`` is the dense prompt
    (image and video tokens included), ``k1`` the visual tokens stage 1 kept of ``n_visual``,
    ``n_prompt`` the prompt after stage 1, ``k2`` the prompt after stage 2, ``token_layer_fraction``
    the share of the dense token-layers the prefill ran (1.0 for dense and for text-only requests);
    ``n_images``, ``n_videos``, ``n_frames`` what the request carried (frames as sampled)."""

    n_visual: int | None = None
    k1: int | None = None
    n_prompt: int | None = None
    k2: int | None = None
    token_layer_fraction: float | None = None
    n_images: int | None = None
    n_videos: int | None = None
    n_frames: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = super().to_dict()
        for name in ("n_visual", "k1", "n_prompt", "k2", "token_layer_fraction", *VISUALS):
            if getattr(self, name) is not None:
                d[name] = getattr(self, name)
        return d


def summarise_counts(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """``{"tpkit_<count>_<mean|p5|p95>": value}`` over per-sample rows of :data:`COUNTS`; rows that
    name their request ``kind`` (:data:`KINDS`) add, per kind present, ``tpkit_<kind>_samples`` and
    the means ``tpkit_<kind>_<n_visual|k1|k2|token_layer_fraction>_mean`` (text-only requests would
    otherwise pull the run's fraction towards 1)."""
    out: dict[str, float] = {"tpkit_samples": float(len(rows))}
    if not rows:
        return out
    for name in COUNTS:
        v = torch.tensor([float(r[name]) for r in rows], dtype=torch.float64)
        q = torch.quantile(v, torch.tensor([0.05, 0.95], dtype=torch.float64))
        out[f"tpkit_{name}_mean"] = float(v.mean())
        out[f"tpkit_{name}_p5"] = float(q[0])
        out[f"tpkit_{name}_p95"] = float(q[1])
    for kind in KINDS:
        of_kind = [r for r in rows if r.get("kind") == kind]
        if not of_kind:
            continue
        out[f"tpkit_{kind}_samples"] = float(len(of_kind))
        for name in ("n_visual", "k1", "k2", "token_layer_fraction"):
            out[f"tpkit_{kind}_{name}_mean"] = sum(float(r[name]) for r in of_kind) / len(of_kind)
    return out


def _cut(text: str, until: Sequence[str]) -> str:
    """``text`` up to the first stop string."""
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text


class TpkitLMM(lmms):
    """lmms-eval model ``tpkit`` (see the module docstring; arguments: :class:`HarnessConfig`)."""

    is_simple = True

    def __init__(self, **model_args: Any) -> None:
        super().__init__()
        cfg, overrides = parse_model_args(model_args)
        self.cfg = cfg
        self.method, self.budget = parse_method(cfg.method)
        # ranks: lmms-eval shards the requests itself; each process holds the model on its own device
        self._rank = int(os.environ.get("RANK", 0))
        self._world_size = int(os.environ.get("WORLD_SIZE", 1))
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        device = cfg.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and self._world_size > 1:
            device = f"cuda:{local_rank}"
        self._device = torch.device(device)
        pruning = PruningConfig()
        if cfg.pruning is not None:
            pruning = from_dict(PruningConfig, read_pruning_yaml(cfg.pruning), source=cfg.pruning)
        # the overrides before the model loads, which checks the pruning against it (Qwen3.5's stage 2
        # must sit on an attention layer: pruning.stage2.layer=3 has to replace the default 2 first)
        pruning = apply_pruning_overrides(pruning, overrides)
        ecfg = EvalConfig(
            model=ModelConfig(
                path=cfg.pretrained,
                processor_path=cfg.processor,
                dtype=cfg.dtype,
                attn_implementation=cfg.attn_implementation,
                revision=cfg.revision,
            ),
            adapter=cfg.adapter,
            pruning=pruning,
        )
        if cfg.adapter is not None and cfg.pruning is not None:
            raise ConfigError(
                "--model_args: pass adapter or pruning, not both (an adapter brings the pruning it was "
                "trained with; change it with pruning.<key> overrides)"
            )
        model, processor, ours = load_model_and_processor(ecfg, self._device)
        self._model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.ours = apply_pruning_overrides(ours, overrides)
        set_pruning(model, copy.deepcopy(self.ours))  # checks the overrides against this model
        self.family = family_of(model)
        self.support = self.family.harness  # what a request may carry
        self.num_layers = self.family.language_model(model).config.num_hidden_layers
        self._collators = {
            m: LlavaCollator(
                processor,
                max_length=cfg.max_length,
                mode=m,
                max_frames=cfg.max_frames,
                video_fps=cfg.video_fps,
            )
            for m in ("eval", "score")
        }
        self._rows: list[dict[str, float]] = []  # token accounting of every answered request
        self._gen_tokens = 0
        self._seconds = 0.0

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> TpkitLMM:
        """``--model_args`` plus lmms-eval's ``--batch_size``/``--device`` (which it always passes:
        ``--batch_size`` defaults to 1), a key given in ``--model_args`` winning.

        Under the ``lmms-eval`` command, a mistake in the arguments (an unknown key, a bad value, a
        pruning YAML or an adapter that cannot be read) ends the command with its message as the
        last line and exit status 2: lmms-eval itself would print a traceback and exit 0."""
        args = simple_parse_args_string(arg_string)
        extra = additional_config or {}
        for key, value in extra.items():
            if value is not None and key not in args:
                args[key] = value
        try:
            model = cls(**args)
        except (ConfigError, EvalError, FileNotFoundError) as e:
            if not _under_lmms_eval_command():
                raise
            print(f"\nerror: --model tpkit: {e}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        given = extra.get("batch_size")
        if given is not None and str(given) != str(model.batch_size) and model.rank == 0:
            # lmms-eval's header prints its own --batch_size, whatever the model uses
            print(
                f"--model tpkit: {model.batch_size} requests per forward (--model_args batch_size); lmms-eval's "
                f"header shows its --batch_size {given}: give --batch_size {model.batch_size} instead and both "
                "agree (results.json: config.batch_sizes is what the model used)",
                file=sys.stderr,
            )
        return model

    # ---- what lmms-eval reads ---------------------------------------------------------------
    @property
    def model(self) -> torch.nn.Module:
        return self._model

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def batch_size(self) -> int:
        return self.cfg.batch_size

    @property
    def batch_sizes(self) -> dict[str, int]:
        """lmms-eval writes these values to results.json (config.batch_sizes): the batch size used."""
        return {"tpkit": self.cfg.batch_size}

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    # ---- requests -> records ----------------------------------------------------------------
    def _doc(self, task: str, split: str, doc_id: int) -> dict:
        return self.task_dict[task][split][doc_id]

    def _visuals(self, visuals: Any, where: str) -> tuple[list, list[str]]:
        """(images, video paths) of a request, checked against what the family takes: lmms-eval hands
        images as PIL images (or image file paths) and videos as file paths."""
        from PIL import Image

        images: list = []
        videos: list[str] = []
        for v in visuals or []:
            if v is None:
                continue
            if isinstance(v, Image.Image):
                images.append(v)
            elif isinstance(v, (str, os.PathLike)):
                (images if str(v).lower().endswith(IMAGE_SUFFIXES) else videos).append(str(v))
            else:
                raise ValueError(
                    f"{where}: --model tpkit takes images (PIL images or image files) and video files; "
                    f"this request has a visual of type {type(v).__name__}"
                )
        if not self.support.takes(len(images), len(videos)):
            _refuse(
                f"{where}: this request has {len(images)} image(s) and {len(videos)} video(s), but "
                f"--model tpkit on {type(self._model).__name__} (family {self.family.name}) takes "
                f"{self.support}: evaluate this task with a model of a family that takes such requests "
                "(docs/lmms-eval.md lists them)"
            )
        return images, videos

    def _record(
        self, context: str, images: list, videos: list[str], where: str, answer: str | None = None
    ) -> dict:
        """A LLaVA-JSON record: one placeholder per image (video) first, unless the context already
        holds exactly one per image (video); the context as the user turn, or as a conversation when
        it is a JSON list of turns."""
        turns = _json_turns(context)
        if turns is None:
            turns = [{"from": "human", "value": context}]
        prefix = ""
        for token, items in (
            (self.processor.image_token, images),
            (getattr(self.processor, "video_token", None), videos),
        ):
            if not items:
                continue
            n = sum(t["value"].count(token) for t in turns)
            if n == 0:
                prefix += f"{token}\n" * len(items)
            elif n != len(items):
                raise ValueError(
                    f"{where}: the context holds {n} {token} placeholder(s) for {len(items)} visual(s): "
                    "give one per visual, or none (tpkit then puts them before the text)"
                )
        if prefix:
            turns[0] = {"from": "human", "value": prefix + turns[0]["value"]}
        if answer is not None:
            turns.append({"from": "gpt", "value": answer})
        return {"id": where, "image": images, "video": videos, "conversations": turns}

    def _frames(self, record: dict) -> int:
        """Frames the collator will sample from the record's videos (read from the containers)."""
        coll = self._collators["eval"]
        return sum(len(coll._video_plan(record, v)[0]) for v in record["video"])

    def _order(self, records: list[dict], keys: Sequence[str] | None = None) -> Iterator[list[int]]:
        """Batches of record indices: grouped by ``keys`` (generation settings) and by what the records
        carry (:meth:`_batch_kind`), longest prompts first."""
        lengths = self._collators["eval"].sequence_lengths(records)
        keys = keys or [""] * len(records)
        group = [(keys[i], self._batch_kind(r)) for i, r in enumerate(records)]
        order = sorted(range(len(records)), key=lambda i: (group[i], -lengths[i], i))
        batch: list[int] = []
        for i in order:
            if batch and (len(batch) == self.batch_size or group[batch[0]] != group[i]):
                yield batch
                batch = []
            batch.append(i)
        if batch:
            yield batch

    def _batch_kind(self, record: dict) -> tuple[int, ...]:
        """Records that may share a batch: text-only ones apart (the stock forward answers them, as it
        would alone), and videos with their frame count (a batch's frames are stacked)."""
        if not record["image"] and not record["video"]:
            return (0,)
        return (1, self._frames(record)) if record["video"] else (1, 0)

    def _inputs(self, batch: dict) -> dict[str, torch.Tensor]:
        return device_inputs(self._model, batch, self._device)

    def _progress(self, total: int, desc: str):
        return tqdm(total=total, desc=desc, disable=not self.cfg.progress or self._rank != 0, leave=False)

    # ---- methods ----------------------------------------------------------------------------
    def _spec(self, records: list[dict]) -> tuple[MethodSpec, list[int]]:
        """The run of ``method`` over the records with visual input, and each record's row in it (-1:
        text-only, answered by the stock forward). Matched baselines and budgets get ours' per-sample
        counts from a prefill-only pass of ours over the same records (evaluate.py's matching); text-only
        records take no part (they would pull topk-cls' one K towards 0)."""
        visual = [i for i, r in enumerate(records) if r["image"] or r["video"]]
        rows = [-1] * len(records)
        for k, i in enumerate(visual):
            rows[i] = k
        records = [records[i] for i in visual]
        stats = None
        if records and (self.budget is not None or METHODS[self.method].needs_ours):
            stats = self._ours_stats(records)
        if stats is not None and self.budget is not None:
            spec = sweep_spec(
                self.method,
                self.budget,
                self.ours,
                stats,
                self.num_layers,
                self.cfg.fastv_layer,
                self.cfg.sweep_stage1_factor,
            )
        elif stats is not None or not METHODS[self.method].needs_ours:
            spec = method_spec(self.method, self.ours, stats, self.num_layers, self.cfg.fastv_layer)
        else:  # text-only requests alone: nothing to match, the stock forward answers them
            spec = method_spec("dense", self.ours, None, self.num_layers, self.cfg.fastv_layer)
        n = len(records)
        if self.cfg.k1 is not None:
            spec.stage1_keep = torch.full((n,), self.cfg.k1, dtype=torch.long)
        if self.cfg.k2 is not None:
            spec.stage2_keep = torch.full((n,), self.cfg.k2, dtype=torch.long)
        return spec, rows

    def _ours_stats(self, records: list[dict]) -> OursStats:
        set_pruning(self._model, copy.deepcopy(self.ours))
        cols: dict[str, torch.Tensor] = {k: torch.zeros(len(records), dtype=torch.float64) for k in COUNTS}
        for idx in self._order(records):
            inputs = self._inputs(self._collators["eval"]([records[i] for i in idx]))
            with torch.inference_mode():
                self._model(**inputs, use_cache=False, logits_to_keep=1)
            st = prefill_stats(self._model, inputs, True)
            for k in COUNTS:
                cols[k][idx] = st[k].double()
        c = {k: v.long() for k, v in cols.items() if k != "token_layer_fraction"}
        return OursStats(
            c["n_dense"], c["n_visual"], c["k1"], c["n_prompt"], c["k2"], cols["token_layer_fraction"]
        )

    def _forced(self, spec: MethodSpec, rows: list[int], idx: list[int]) -> dict[str, torch.Tensor]:
        """The batch's forced per-sample counts (none for a batch of text-only records)."""
        if rows[idx[0]] < 0:
            return {}
        return spec.forced(torch.tensor([rows[i] for i in idx]), self._device)

    def _account(
        self,
        st: dict[str, torch.Tensor],
        j: int,
        record: dict,
        request: str,
        output_tokens: int | None = None,
    ) -> PrunedTokenCounts:
        """Sample ``j``'s token accounting (logged for the run summary) as lmms-eval's token counts."""
        row: dict[str, Any] = {k: float(st[k][j]) for k in COUNTS}
        n_images, n_videos = len(record["image"]), len(record["video"])
        n_frames = self._frames(record) if n_videos else 0
        kind = request_kind(n_images, n_videos)
        self._rows.append({**row, "request": request, "kind": kind})
        return PrunedTokenCounts(
            input_tokens=int(row["n_dense"]),
            output_tokens=output_tokens,
            n_visual=int(row["n_visual"]),
            k1=int(row["k1"]),
            n_prompt=int(row["n_prompt"]),
            k2=int(row["k2"]),
            token_layer_fraction=row["token_layer_fraction"],
            n_images=n_images,
            n_videos=n_videos,
            n_frames=n_frames,
        )

    # ---- generate_until ---------------------------------------------------------------------
    def _generate(self, records: list[dict], settings: list[dict]) -> list[GenerationResult]:
        """Answers to ``records``, each with its generation ``settings`` (lmms-eval's gen_kwargs)."""
        spec, rows = self._spec(records)
        set_pruning(self._model, spec.pruning)
        keys = [json.dumps(s, sort_keys=True, default=str) for s in settings]
        out: list[GenerationResult | None] = [None] * len(records)
        tok = self.tokenizer
        eos = tok.eos_token_id
        pad = tok.pad_token_id if tok.pad_token_id is not None else eos
        bar = self._progress(len(records), "tpkit generate")
        for idx in self._order(records, keys):
            gen, until = self._generation_kwargs(settings[idx[0]])
            inputs = self._inputs(self._collators["eval"]([records[i] for i in idx]))
            start = time.perf_counter()
            with torch.inference_mode():
                ids = self._model.generate(
                    **inputs, **self._forced(spec, rows, idx), **gen, eos_token_id=eos, pad_token_id=pad
                )
            self._seconds += time.perf_counter() - start
            new = ids[:, inputs["input_ids"].shape[1] :].cpu()  # (B, new)
            ended = new == eos
            # tokens up to the first eos (all of them when none ended)
            n_new = torch.where(ended.any(dim=1), ended.long().argmax(dim=1), new.shape[1])
            self._gen_tokens += int(n_new.sum())
            st = prefill_stats(self._model, inputs, spec.pruning.enabled and rows[idx[0]] >= 0)
            texts = tok.batch_decode(new, skip_special_tokens=True)
            for j, i in enumerate(idx):
                counts = self._account(st, j, records[i], "generate_until", int(n_new[j]))
                out[i] = GenerationResult(text=_cut(texts[j], until), token_counts=counts)
            bar.update(len(idx))
        bar.close()
        return out  # type: ignore[return-value]

    def _generation_kwargs(self, settings: dict) -> tuple[dict[str, Any], list[str]]:
        """(generate kwargs, stop strings) from a task's gen_kwargs. Only the arguments tpkit's pruned
        generate takes: greedy unless the task samples; beams are not supported."""
        s = dict(settings or {})
        until = s.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        if int(s.get("num_beams", 1) or 1) != 1:
            raise ValueError(f"--model tpkit decodes greedily or by sampling: num_beams = {s['num_beams']}")
        temperature = float(s.get("temperature", 0.0) or 0.0)
        do_sample = bool(s.get("do_sample", False)) or temperature > 0
        gen: dict[str, Any] = {
            "max_new_tokens": int(s.get("max_new_tokens") or self.cfg.max_new_tokens),
            "do_sample": do_sample,
        }
        if do_sample:
            gen["temperature"] = temperature if temperature > 0 else 1.0
            if s.get("top_p") is not None:
                gen["top_p"] = float(s["top_p"])
            if s.get("top_k") is not None:
                gen["top_k"] = int(s["top_k"])
        return gen, until

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        records, settings = [], []
        for r in requests:
            context, gen_kwargs, doc_to_visual, doc_id, task, split = r.args
            where = f"{task}/{split}/{doc_id}"
            images, videos = self._visuals(doc_to_visual(self._doc(task, split, doc_id)), where)
            records.append(self._record(context, images, videos, where))
            settings.append(gen_kwargs)
        return self._generate(records, settings) if records else []

    # ---- loglikelihood ----------------------------------------------------------------------
    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        """(mean NLL per continuation token, is_greedy) per request, wrapped in a GenerationResult
        whose ``text`` is that pair: lmms-eval 0.7.3 turns a bare tuple into its string (its
        unwrap_generation_output keeps only strings, lists of strings and GenerationResult.text),
        which its multiple_choice scoring cannot read; the wrapper also carries the token counts."""
        records = []
        for r in requests:
            context, target, doc_to_visual, doc_id, task, split = r.args[:6]
            doc = self._doc(task, split, doc_id)
            where = f"{task}/{split}/{doc_id}"
            continuation = target if isinstance(target, str) else str(target(doc))
            images, videos = self._visuals(doc_to_visual(doc), where)
            records.append(self._record(context, images, videos, where, continuation))
        if not records:
            return []
        # counts are chosen on the prompts alone, as generation would prune them
        prompts = [{**r, "conversations": r["conversations"][:-1]} for r in records]
        spec, rows = self._spec(prompts)
        set_pruning(self._model, spec.pruning)
        out: list[GenerationResult | None] = [None] * len(records)
        bar = self._progress(len(records), "tpkit loglikelihood")
        for idx in self._order(prompts):
            batch = self._collators["score"]([records[i] for i in idx])
            inputs = self._inputs(batch)
            labels = batch["labels"].to(self._device)  # (B, T): continuation ids, else IGNORE_INDEX
            answer = batch["answer_mask"].to(self._device)  # (B, T) bool
            n_keep = int(answer.sum(dim=1).max()) + 1  # the continuation and the token before it
            start = time.perf_counter()
            with torch.inference_mode():
                res = self._model(
                    **inputs,
                    answer_mask=answer,
                    use_cache=False,
                    logits_to_keep=n_keep,
                    **self._forced(spec, rows, idx),
                )
            self._seconds += time.perf_counter() - start
            nll, greedy = _continuation_scores(res, inputs["attention_mask"], labels, answer, n_keep)
            st = prefill_stats(self._model, inputs, spec.pruning.enabled and rows[idx[0]] >= 0)
            for j, i in enumerate(idx):
                counts = self._account(st, j, records[i], "loglikelihood")
                out[i] = GenerationResult(text=(float(nll[j]), bool(greedy[j])), token_counts=counts)  # type: ignore[arg-type]
            bar.update(len(idx))
        bar.close()
        return out  # type: ignore[return-value]

    # ---- multi-round ------------------------------------------------------------------------
    def generate_until_multi_round(self, requests: list[Instance]) -> list[list[str]]:
        """Per request, the answers of every round: round 0 answers the request's context; each later
        round's (visuals, context, terminal, outputs, info) comes from the task's ``doc_to_text``."""
        states = []
        for r in requests:
            context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split = r.args
            doc = self._doc(task, split, doc_id)
            states.append(
                {
                    "where": f"{task}/{split}/{doc_id}",
                    "doc": doc,
                    "next": doc_to_text,
                    "context": context,
                    "visuals": doc_to_visual(doc),
                    "settings": {k: v for k, v in (gen_kwargs or {}).items() if k != "until"},
                    "outputs": [],
                    "info": None,
                    "done": False,
                }
            )
        round_idx = 0
        while True:
            if round_idx > 0:
                for s in states:
                    if s["done"]:
                        continue
                    payload = s["next"](
                        s["doc"],
                        previous_output=s["outputs"],
                        round_idx=round_idx,
                        previous_round_info=s["info"],
                    )
                    if isinstance(payload, tuple) and len(payload) == 5:
                        visuals, context, terminal, outputs, s["info"] = payload
                        if outputs is not None:
                            s["outputs"] = list(outputs)
                        s["done"] = bool(terminal)
                        s["visuals"] = visuals if visuals is not None else s["visuals"]
                        s["context"] = context if context is not None else s["context"]
                    elif isinstance(payload, str):
                        s["context"] = payload
                    else:
                        s["done"] = True
            active = [s for s in states if not s["done"]]
            if not active:
                break
            records = [
                self._record(
                    s["context"], *self._visuals(s["visuals"], f"{s['where']} round {round_idx}"), s["where"]
                )
                for s in active
            ]
            answers = self._generate(records, [s["settings"] for s in active])
            for s, a in zip(active, answers):
                s["outputs"].append(a.text)
            round_idx += 1
        return [list(s["outputs"]) for s in states]

    # ---- end of the run ---------------------------------------------------------------------
    def token_summary(self) -> dict[str, float]:
        """:func:`summarise_counts` over every request answered so far (all ranks when distributed)."""
        rows = self._rows
        if self._world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[list[dict] | None] = [None] * self._world_size
            torch.distributed.all_gather_object(gathered, rows)
            rows = [r for part in gathered for r in (part or [])]
        return summarise_counts(rows)

    def clean(self) -> None:
        """lmms-eval calls this once the model has answered every request: the token accounting
        goes into its throughput metrics (``results["throughput"]``), then the model is freed."""
        summary = self.token_summary()
        speed = self._gen_tokens / self._seconds if self._seconds > 0 else 0.0
        log_metrics(self._seconds, self._gen_tokens, speed, additional_metrics=summary)
        super().clean()


def _refuse(message: str) -> NoReturn:
    """A request this model cannot answer: a ValueError for Python callers; under the ``lmms-eval``
    command (which would print a traceback and exit 0) the message as the last line and exit 2."""
    if _under_lmms_eval_command():
        print(f"\nerror: --model tpkit: {message}", file=sys.stderr, flush=True)
        raise SystemExit(2)
    raise ValueError(message)


def _under_lmms_eval_command() -> bool:
    """Whether this process is the ``lmms-eval`` command (or ``python -m lmms_eval``), not a program
    that calls lmms-eval's Python API (which gets the exception)."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return "lmms_eval.__main__" in sys.modules or getattr(spec, "name", None) == "lmms_eval.__main__"


def _json_turns(context: str) -> list[dict[str, str]] | None:
    """A context that is a JSON list of turns (``{"value": ...}``, alternating user/assistant) ->
    LLaVA-JSON turns; any other context -> None."""
    if not context.lstrip().startswith("["):
        return None
    try:
        items = json.loads(context)
    except json.JSONDecodeError:
        return None
    if (
        not isinstance(items, list)
        or not items
        or not all(isinstance(t, dict) and "value" in t for t in items)
    ):
        return None
    return [{"from": "human" if k % 2 == 0 else "gpt", "value": str(t["value"])} for k, t in enumerate(items)]


def _continuation_scores(
    res: Any, attention_mask: torch.Tensor, labels: torch.Tensor, answer: torch.Tensor, n_keep: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean NLL per continuation token (B,), greedy (B,) bool) from a forward that kept the logits of
    the last ``n_keep`` positions; ``res.kept_index`` maps them to input positions (pruned or not)."""
    logits = res.logits.float()  # (B, n_keep, V)
    kept = getattr(res, "kept_index", None)
    if kept is None or kept.shape[1] < n_keep:  # a stock forward with logits_to_keep: every position
        b, t = attention_mask.shape
        kept = torch.arange(t, device=logits.device).expand(b, t).masked_fill(attention_mask == 0, -1)
    target = next_token_targets(labels, kept[:, -n_keep:])  # (B, n_keep): the token each position predicts
    valid = target != IGNORE_INDEX
    n = valid.sum(dim=1)
    if not torch.equal(n, answer.sum(dim=1)):
        raise RuntimeError(f"continuation tokens scored {n.tolist()} != given {answer.sum(dim=1).tolist()}")
    logp = F.log_softmax(logits, dim=-1).gather(-1, target.clamp(min=0)[..., None])[..., 0]  # (B, n_keep)
    nll = -(logp * valid).sum(dim=1) / n.clamp(min=1)
    greedy = ((logits.argmax(dim=-1) == target) | ~valid).all(dim=1)
    return nll.cpu(), greedy.cpu()
