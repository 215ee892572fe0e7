"""The seam between the shared pruning core and one model family.

The core (:mod:`tpkit.models.core.prefill`) owns everything that is the same for every
``*ForConditionalGeneration`` with a decoder-only language model: compaction of the kept tokens,
masks, the decoder-layer loop, stage 2 at layer K, token accounting and generation. A family says
only what differs between model families:

* which forward arguments carry its visual inputs (``visual_keys``: pixel values, image sizes, grids);
* where its visual placeholders are in ``input_ids`` and which of them stage 1 keeps, after running
  its vision tower, scoring the patches (:func:`tpkit.pruning.stage1.patch_scores`) and projecting the
  kept ones (:meth:`Family.encode`);
* its position ids (1-D, or 3-D M-RoPE) and how its rotary embedding rotates queries and keys
  (stage 2 scores with the layer's own q/k);
* how each decoder layer is called (:meth:`Family.layer_rules`: mask kind, sliding window,
  bidirectional blocks, rotary table; read from the config's ``layer_types`` unless the family says
  more), which input tokens form bidirectional blocks (:meth:`Family.token_blocks`), and what the
  visual inputs add after some layers (:attr:`Visual.after_layer`): :mod:`tpkit.models.core.layers`;
* where its language model, its LM head and its image token are;
* and, for the workflow around the model: config builders for tiny and ``--random-init`` models
  (``builders``, ``architectures``), LoRA defaults (``lora_target``, ``projector_modules``,
  ``tower_pattern``), sharding units (:meth:`Family.fsdp_blocks`) and what lmms-eval requests it
  takes (``harness``).

**A family is one folder** ``tpkit/models/<name>/`` whose ``family.py`` defines its :class:`Family`
subclass(es) and a module-level ``FAMILIES = (...)`` tuple of instances; :mod:`tpkit.models.registry`
finds every such folder, so adding a family touches nothing outside it. Its ``tiny.py`` holds the
config builders (size keywords in, a stock config out) and the named full-size shapes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tpkit.models.core.layers import ATTENTION, LayerRule, rules_from_config
from tpkit.models.core.masks import gather_rows
from tpkit.pruning.config import CLS_SCORES
from tpkit.pruning.stage2 import apply_rope

__all__ = [
    "DEFAULT_LORA_TARGET",
    "Family",
    "HarnessSupport",
    "Visual",
    "first_missing",
    "llama_rotate",
    "no_split_classes",
    "random_text",
]

# LoRA on the language model's linear layers (peft full-match on module names): every family in
# transformers 5 keeps its decoder under ``model.language_model``, its vision tower elsewhere
DEFAULT_LORA_TARGET = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def no_split_classes(model: nn.Module) -> set[type]:
    """The repeated blocks among the module classes that ``model`` and its sub-models name in
    ``_no_split_modules`` (transformers' own list of modules that must stay whole on one device):
    the decoder layers and the vision tower's blocks, the elements of a ``ModuleList`` (the
    embeddings it also names are one-off modules, not blocks)."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    return {
        type(block)
        for module in model.modules()
        if isinstance(module, nn.ModuleList)
        for block in module
        if type(block).__name__ in names
    }


@dataclass(frozen=True)
class HarnessSupport:
    """What lmms-eval requests a family answers (:mod:`tpkit.evaluation.harness`): how many images one
    request may carry, whether it may carry videos (as frames its processor samples and encodes), and
    whether a request with neither is answered (by the stock forward: nothing to prune)."""

    images: int | None = 1  # images per request at most (None: any number)
    videos: bool = False  # requests with videos (any number, beside images when ``images`` allows)
    text_only: bool = True  # requests with no visual input (the stock forward answers them)

    def takes(self, images: int, videos: int) -> bool:
        """Whether a request with ``images`` images and ``videos`` videos is answered."""
        if images == 0 and videos == 0:
            return self.text_only
        return (self.images is None or images <= self.images) and (videos == 0 or self.videos)

    def __str__(self) -> str:
        images = "any number of images" if self.images is None else f"at most {self.images} image(s)"
        videos = "videos" if self.videos else "no videos"
        text = "text-only requests" if self.text_only else "no text-only requests"
        return f"{images} per request, {videos}, {text}"


def first_missing(model: nn.Module, paths: list[str]) -> str | None:
    """The first dotted attribute path (``"model.language_model.norm"``) that ``model`` lacks or holds
    None at; None when it has them all (what a family's :meth:`Family.check` names in its error)."""
    for path in paths:
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                return path
    return None


def random_text(model: nn.Module, batch_size: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """(B, n) random ordinary token ids: none of the config's special ids (placeholders, pad, bos/eos)."""
    cfg = model.config
    text = getattr(cfg, "text_config", cfg)
    specials = {0, 1, 2}
    for key in ("image_token_id", "video_token_id", "image_token_index", "vision_start_token_id",
                "vision_end_token_id", "boi_token_index", "eoi_token_index", "pad_token_id", "bos_token_id",
                "eos_token_id"):  # fmt: skip
        for c in (cfg, text):
            v = getattr(c, key, None)
            if isinstance(v, int):
                specials.add(v)
    low, high = 4, text.vocab_size
    lowest = min(v for v in specials if v >= low) if any(v >= low for v in specials) else high
    if lowest >= low + 16:  # ordinary ids below the first special one (LLaVA: 4..31999)
        high = lowest
    ids = torch.randint(low, high, (batch_size, n), generator=generator)
    for v in specials:
        ids[ids == v] = low
    return ids


def llama_rotate(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, qpos: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of q (B, H, Q, d) at the query positions ``qpos`` (B, Q) and of k
    (B, Hk, T, d), with the decoder's cos/sin (B, T, d): the Llama/Mistral/Qwen2 convention."""
    return apply_rope(q, gather_rows(cos, qpos), gather_rows(sin, qpos)), apply_rope(k, cos, sin)


@dataclass
class Visual:
    """What a family hands the core for one batch, stage 1 done. N = the most placeholders of any
    sample; a sample with fewer has padding slots (slot -1, never kept)."""

    slots: torch.Tensor  # (B, N) long: input position of each visual placeholder, in order; -1 = padding
    keep: torch.Tensor  # (B, N) bool: placeholders kept by stage 1 (False on padding slots)
    k1: torch.Tensor  # (B,) long: kept placeholders per sample
    projected: (
        torch.Tensor | None
    )  # (sum k1, D) LM input embeddings of the kept placeholders, row-major (set by
    # the time Family.encode returns; None only inside it, see VisualTokens.embeds)
    scores: (
        torch.Tensor | None
    )  # the stage-1 scores (family-shaped; for stats and overlays); None: stage 1 off
    coords: torch.Tensor  # (B, N, 3) long: (view, row, col) of each placeholder's patch; view -1: no patch
    # (sum k1,) long, the kept placeholders in prompt order: each one's token index in the family's own
    # numbering (select_visual: its kinds' tokens concatenated); None when a family does not number them
    kept_token: torch.Tensor | None = None
    # {decoder layer i: (sum k1, D)} features added to the kept placeholders' hidden states after layer i
    # (Qwen3-VL's DeepStack), rows as ``projected``; the core drops them with their tokens (LayerAdds)
    after_layer: dict[int, torch.Tensor] | None = None


class Family:
    """One model family, as the pruning core sees it (see the module docstring)."""

    name = "family"
    classes: tuple[str, ...] = ()  # model class names this family handles
    visual_keys: tuple[str, ...] = ("pixel_values",)  # forward arguments that carry the visual inputs
    # visual inputs packed across the batch (rows are patches or images, not samples): a pruned
    # generate expands them for beams / num_return_sequences with expand_packed, not a per-row repeat
    packed_visual_keys: tuple[str, ...] = ()
    in_tower = False  # whether stage 1 can cut inside the vision tower (stage1.in_tower_block)
    # stage 2 never drops the token just before or just after a run of visual placeholders (the
    # markers a processor writes around each image, InternVL's <img> and </img>)
    protect_run_edges = False
    # one image = one fixed patch grid (vision_config image_size / patch_size), placeholder i = patch i:
    # kept placeholders map straight to image cells (retention numbers, overlays)
    fixed_patch_grid = False

    # ---- the workflow around the model (collected by tpkit.models.registry) ----
    # builder key -> (config from size keywords, model class name): tiny models and --random-init shapes
    builders: dict[str, tuple[Callable[..., Any], str]] = {}
    # --random-init name -> {"builder": key, **the builder's keywords at full size}
    architectures: dict[str, dict[str, Any]] = {}
    lora_target: str = DEFAULT_LORA_TARGET  # lora.target_modules when the config leaves it null
    projector_modules: tuple[str, ...] = ("multi_modal_projector",)  # trained in full by lora.train_projector
    tower_pattern: str = r"(^|\.)vision_tower\."  # the vision tower's module names (LoRA refuses them)
    harness: HarnessSupport = HarnessSupport()

    def fsdp_blocks(self, model: nn.Module) -> set[type]:
        """The module classes FSDP wraps one unit each: the model's ``_no_split_modules`` (decoder
        layers and vision blocks), so a family gets sharding from transformers' own list."""
        return no_split_classes(model)

    def matches(self, model: nn.Module) -> bool:
        return type(model).__name__ in self.classes

    def check(self, model: nn.Module) -> None:
        """ValueError naming what a model of this family lacks (called once, by ``attach_pruner``)."""

    def check_config(self, model: nn.Module, config: Any) -> None:
        """ValueError for pruning settings this family cannot honour (called by ``attach_pruner`` and
        ``set_pruning``). Here: a CLS-based stage-1 score on a tower without a CLS token, an in-tower
        stage 1 on a family without one, an in-tower stage 1 with options that need every unit's
        embedding, and stage 2 at a recurrent layer of a hybrid decoder (it scores with a
        softmax-attention layer's own q/k)."""
        score = config.stage1.score
        if getattr(config.stage1, "in_tower_block", None) is not None and not self.in_tower:
            raise ValueError(
                f"pruning.stage1.in_tower_block = {config.stage1.in_tower_block}: {type(model).__name__}'s "
                "stage 1 runs after its vision tower only; set it to null"
            )
        s1 = config.stage1
        if getattr(s1, "in_tower_block", None) is not None and (
            s1.context_tokens or (s1.diversity > 0 and s1.diversity_by == "features")
        ):
            raise ValueError(
                f"pruning.stage1.in_tower_block = {s1.in_tower_block} computes the embeddings of the kept units "
                "only, which context_tokens and diversity_by 'features' need for every unit: set context_tokens: 0 "
                "and diversity_by: grid (or in_tower_block: null)"
            )
        if config.stage1.enabled and score in CLS_SCORES and not self.has_cls(model):
            raise ValueError(
                f"pruning.stage1.score = {score!r} compares patches with the CLS token, but "
                f"{type(model).__name__}'s vision tower has none: use 'mean_distance', 'cosine_mean' or "
                "'attn_received' (or null for the family's default, mean_distance)"
            )
        rules = self.layer_rules(model) if config.stage2.enabled else ()
        if config.stage2.layer < len(rules) and rules[config.stage2.layer].kind != ATTENTION:
            attention = [str(i) for i, r in enumerate(rules) if r.kind == ATTENTION]
            raise ValueError(
                f"pruning.stage2.layer = {config.stage2.layer} is a recurrent (linear-attention) layer of "
                f"{type(model).__name__}, which has no keys to score: stage 2 scores tokens with a softmax-"
                f"attention layer's own q/k; use one of its attention layers ({', '.join(attention[:6])}"
                f"{', ...' if len(attention) > 6 else ''})"
            )

    def has_cls(self, model: nn.Module) -> bool:
        """Whether the vision tower's sequence starts with a CLS token (CLIP) or is patches only."""
        return True

    def score_kind(self, model: nn.Module, stage1: Any) -> str:
        """The stage-1 score in use: the config's, or the family's default (``cosine`` with a CLS
        token, else ``mean_distance``: the patches least like the image's mean patch, the unusual ones)."""
        if stage1.score is not None:
            return stage1.score
        return "cosine" if self.has_cls(model) else "mean_distance"

    def language_model(self, model: nn.Module) -> nn.Module:
        """The decoder stack: ``layers``, ``embed_tokens``, ``norm``, ``rotary_emb``, ``config``."""
        raise NotImplementedError

    def vision_tower(self, model: nn.Module) -> nn.Module:
        """The vision encoder (frozen in training; its output is shared by student and teacher)."""
        return model.model.vision_tower

    def tower_call_key(self, pixel_values: torch.Tensor, args: tuple, kwargs: dict[str, Any]) -> tuple | None:
        """The key under which one call of :meth:`vision_tower` is shared by the student and the teacher
        of a training step (``tpkit.training.module.reuse_tower_output``): calls with equal keys in one
        step give the same output. None: the call runs. Here: the calls that ask for hidden states (stock
        LLaVA-style models and the pruner), keyed by the pixels' shape (the tower casts their dtype)."""
        if not kwargs.get("output_hidden_states"):
            return None
        return (tuple(pixel_values.shape), pixel_values.device)

    def lm_head(self, model: nn.Module) -> nn.Module:
        return model.lm_head

    def image_token_id(self, model: nn.Module) -> int:
        return int(model.config.image_token_id)

    def placeholder_ids(self, model: nn.Module) -> tuple[int, ...]:
        """Token ids of the visual placeholders in ``input_ids`` (images, video frames)."""
        return (self.image_token_id(model),)

    def has_visual(self, visual: dict[str, Any]) -> bool:
        return visual.get(self.visual_keys[0]) is not None

    def encode(
        self,
        model: nn.Module,
        input_ids: torch.Tensor,
        visual: dict[str, Any],
        stage1: Any,
        stage1_keep: torch.Tensor | None = None,
    ) -> Visual:
        """Check the inputs, run the tower once, select with ``stage1`` (a ``Stage1Config``; all kept
        when it is disabled) or the forced per-sample counts ``stage1_keep`` (B,), project the kept."""
        raise NotImplementedError

    def stage1_scores(self, model: nn.Module, visual: dict[str, Any], stage1: Any) -> torch.Tensor:
        """The stage-1 score of every patch, as :meth:`encode` computes it."""
        raise NotImplementedError

    def view_scores(self, model: nn.Module, pixel_values: torch.Tensor, stage1: Any) -> torch.Tensor:
        """Stage-1 scores (B, P) of one square view per image, pixel_values (B, 3, S, S) at the
        :meth:`premise_view` size: the premise report's input (a row-major grid of scored units)."""
        return self.stage1_scores(model, {"pixel_values": pixel_values}, stage1)

    def premise_view(self, model: nn.Module, side: int) -> tuple[int, int]:
        """(S, u): the side in pixels of the square view the premise report scores and the side of
        one scored unit in it, for images ``side`` pixels wide. Here: the tower's fixed input size
        and its patch."""
        vc = model.config.vision_config
        return int(vc.image_size), int(vc.patch_size)

    def position_ids(
        self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, visual: dict[str, Any]
    ) -> torch.Tensor:
        """The unpruned prompt's position ids: (B, T) here, as stock ``generate`` builds them from the
        attention mask; a family with multi-dimensional positions returns (R, B, T)."""
        return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)

    def decode_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """Position ids of decoded tokens from their 1-D positions (B, q) (text: every axis the same)."""
        return positions

    def layer_rules(self, model: nn.Module) -> tuple[LayerRule, ...]:
        """How the shared loop calls each decoder layer (:class:`tpkit.models.core.layers.LayerRule`):
        here, read from the language model's config (``layer_types``, ``sliding_window``, a per-type
        rotary), without bidirectional blocks."""
        return rules_from_config(self.language_model(model))

    def token_blocks(
        self, model: nn.Module, input_ids: torch.Tensor, visual: dict[str, Any]
    ) -> torch.Tensor | None:
        """(B, T) long block id of every input token (-1: none) for the layers whose rule has
        ``blocks``: tokens of one block see each other both ways (Gemma 3: each image's
        placeholders). None: no blocks in this input (here: never)."""
        return None

    def expand_packed(
        self, model: nn.Module, input_ids: torch.Tensor, packed: dict[str, torch.Tensor], expand_size: int
    ) -> dict[str, torch.Tensor]:
        """``packed`` (the ``packed_visual_keys`` given) for ``input_ids`` (B, T) repeated ``expand_size``
        times per sample (``repeat_interleave`` order: sample 0's copies first)."""
        raise NotImplementedError

    def random_prompt(
        self,
        model: nn.Module,
        batch_size: int,
        text_before: int,
        text_after: int,
        seed: int,
        device: torch.device,
    ) -> dict[str, torch.Tensor]:
        """A random prompt batch for speed runs (``--random-init``): ``text_before`` tokens (bos +
        system), one image's placeholders at its full-size shape, ``text_after`` tokens, and the visual
        inputs (random pixels), as the family's processor would lay them out."""
        raise NotImplementedError

    # how the decoder's rotary embedding rotates q and k (stage 2 scores with the layer's own q/k)
    rotate = staticmethod(llama_rotate)
