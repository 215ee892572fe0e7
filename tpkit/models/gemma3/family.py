"""Gemma 3 (``Gemma3ForConditionalGeneration``) on the shared core.

* **Tokens.** Each image (and each pan-and-scan crop, which the processor sends as an image of its
  own: ``"Here is the original image <boi>...<eoi> and here are some crops ..."``) is one run of
  ``mm_tokens_per_image`` placeholders (256) between ``<start_of_image>`` / ``<end_of_image>``
  markers: the SigLIP tower's patch grid (64 x 64 at 896 px) average-pooled by the projector to 16 x
  16 units, each one placeholder. Images are packed across the batch (``pixel_values`` rows are
  images), a sample holds any number of them. The markers are text.
* **Stage 1** runs the tower as stock does (``get_image_features``: the projector's own pooling,
  norm and projection, so kept units carry stock's bits) and scores what is pooled: each patch's
  score (``mean_distance`` or ``cosine_mean`` on the features the projector pools, the tower's last
  output; or ``attn_received`` from its last layer's q/k) averaged over the patches of its unit by the
  projector's own ``avg_pool`` on the score map, as llava_next runs scores through its packing. No
  CLS: CLS scores are refused. One knee per image (crops are images).
* **Layers** (:mod:`tpkit.models.core.layers`): the config's ``layer_types`` (5 sliding-window layers
  of 1,024 per global one) with their own rotary tables (local base 10k, global 1M with linear
  scaling), and every attention layer honours bidirectional image blocks: the stock model's blocks
  from ``token_type_ids`` (each run of image tokens), gathered with the kept tokens, applied only when
  ``token_type_ids`` is given (as stock; its processor always returns it). The window is measured in
  original positions, so a pruned forward equals the unpruned model with the dropped tokens masked out
  as keys, layer by layer under each layer's own rule.
* **Stage 2** scores with layer K's own q/k after its q/k norms, at its ``query_pre_attn_scalar``
  scale (and its logit softcap if the config sets one), over every prompt token: the window of a
  sliding layer K is not applied to the scores, since the tokens dropped there leave every later
  (global) layer too. The embeddings are the stock ``embed_tokens`` (scaled by sqrt(hidden)).
"""

from __future__ import annotations

import math
import sys
from typing import Any

import torch
from torch import nn

from tpkit.models.core.family import Family, HarnessSupport, first_missing, random_text
from tpkit.models.core.layers import LayerRule, rules_from_config
from tpkit.models.core.visual import VisualTokens, select_visual
from tpkit.models.gemma3.tiny import ARCHITECTURES, tiny_gemma3_config
from tpkit.pruning.stage1 import encoder_attention, patch_scores

__all__ = ["FAMILIES", "Gemma3Family", "pool_like_projector", "token_type_ids"]


def token_type_ids(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) long: 1 on image placeholders, 0 elsewhere (what Gemma's processor returns)."""
    return (input_ids == model.config.image_token_id).long()


def pool_like_projector(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Per-patch channels (N, P, C) -> per-unit (N, U, C), reshaped and average-pooled exactly as
    ``Gemma3MultiModalProjector`` pools the tower's features (its own ``avg_pool``)."""
    proj = model.model.multi_modal_projector
    n, _, c = x.shape
    grid = x.transpose(1, 2).reshape(n, c, proj.patches_per_image, proj.patches_per_image)
    return proj.avg_pool(grid.contiguous()).flatten(2).transpose(1, 2)


class Gemma3Family(Family):
    name = "gemma3"
    classes = ("Gemma3ForConditionalGeneration",)
    visual_keys = ("pixel_values", "token_type_ids")
    packed_visual_keys = ("pixel_values",)  # rows are images: a sample's images expand together
    harness = HarnessSupport(images=None)  # several images per request; Gemma 3 takes no video
    builders = {"gemma3": (tiny_gemma3_config, "Gemma3ForConditionalGeneration")}
    architectures = ARCHITECTURES

    def check(self, model: nn.Module) -> None:
        name = type(model).__name__
        needed = [
            "model.vision_tower",
            "model.multi_modal_projector.avg_pool",
            "model.language_model.layers",
            "model.language_model.embed_tokens",
            "model.language_model.norm",
            "model.language_model.rotary_emb",
            "lm_head",
            "config.image_token_id",
            "config.mm_tokens_per_image",
            "config.vision_config",
        ]
        path = first_missing(model, needed)
        if path is not None:
            raise ValueError(f"{name} has no '{path}': expected a stock {self.classes[0]}")
        if getattr(model.config.text_config, "use_bidirectional_attention", False):
            raise ValueError(
                f"{name}: text_config.use_bidirectional_attention = True (an embedding model, every text token "
                "sees every other) is not a causal decoder: tpkit prunes causal Gemma 3 models only"
            )

    def has_cls(self, model: nn.Module) -> bool:
        return False

    def language_model(self, model: nn.Module) -> nn.Module:
        return model.model.language_model

    def layer_rules(self, model: nn.Module) -> tuple[LayerRule, ...]:
        """The config's sliding / global layers and their rotary tables, each with image blocks."""
        return rules_from_config(self.language_model(model), blocks=True)

    def token_blocks(
        self, model: nn.Module, input_ids: torch.Tensor, visual: dict[str, Any]
    ) -> torch.Tensor | None:
        """Stock's block ids (each run of image tokens one block) from ``token_type_ids``; None
        without them (stock then masks causally too)."""
        types = visual.get("token_type_ids")
        if types is None:
            return None
        module = sys.modules[type(model.model).__module__]
        return module.get_block_sequence_ids_for_mask(types.to(input_ids.device))

    def tower_call_key(self, pixel_values: torch.Tensor, args: tuple, kwargs: dict[str, Any]) -> tuple | None:
        """Stock's ``get_image_features`` call and stage 1's are the same call unless stage 1 asks for
        the hidden states (``attn_received``): keyed by the pixels' shape and that flag."""
        return (tuple(pixel_values.shape), pixel_values.device, bool(kwargs.get("output_hidden_states")))

    # ------------------------------------------------------------------------------------------
    # stage 1

    def _units(self, model: nn.Module) -> tuple[int, int]:
        """(placeholders per image, units a side)."""
        n = int(model.config.mm_tokens_per_image)
        return n, math.isqrt(n)

    def _pixels(self, model: nn.Module, visual: dict[str, Any]) -> torch.Tensor:
        pv = visual["pixel_values"]
        side = model.config.vision_config.image_size
        if pv.dim() != 4 or tuple(pv.shape[-2:]) != (side, side):
            raise ValueError(
                f"pixel_values of shape {tuple(pv.shape)}: {type(model).__name__} takes (images, 3, {side}, {side}) "
                "(vision_config.image_size), every image and pan-and-scan crop one row"
            )
        return pv

    def _tower(self, model: nn.Module, pixels: torch.Tensor, hidden_states: bool):
        """Stock's image features: the tower and the projector in one call, as the stock forward."""
        tower = self.vision_tower(model)
        kw = {"output_hidden_states": True} if hidden_states else {}
        return model.model.get_image_features(
            pixels.to(next(tower.parameters()).dtype), return_dict=True, **kw
        )

    def _scores(self, model: nn.Module, out, stage1: Any) -> torch.Tensor:
        """(images, U) unit scores: the patches' scores (the one stage-1 dispatch, on the features the
        projector pools: the tower's last output) pooled as the projector pools the patches."""
        attention = None
        if out.hidden_states is not None:  # attn_received: the last encoder layer's q/k on its input
            attention = encoder_attention(
                out.hidden_states[-2], self.vision_tower(model).encoder.layers[-1], cls=False
            )
        s = patch_scores(
            self.score_kind(model, stage1),
            out.last_hidden_state,
            cls=False,
            attention=attention,
            seed=stage1.seed,
        )
        return pool_like_projector(model, s.float()[..., None])[..., 0]

    def _image_tokens(self, model: nn.Module, visual: dict[str, Any], stage1: Any) -> VisualTokens:
        pixels = self._pixels(model, visual)
        kind = self.score_kind(model, stage1)
        out = self._tower(model, pixels, stage1.enabled and kind == "attn_received")
        embeds = out.pooler_output  # (images, U, D)
        n_img, n_units = embeds.shape[:2]
        device = embeds.device
        if stage1.enabled:
            scores = self._scores(model, out, stage1)
        else:
            scores = torch.zeros(n_img, n_units, device=device)
        _, per_side = self._units(model)
        image = torch.arange(n_img, device=device).repeat_interleave(n_units)
        cell = torch.arange(n_units, device=device).repeat(n_img)
        return VisualTokens(
            token_id=int(model.config.image_token_id),
            embeds=embeds.flatten(0, 1),
            scores=scores.flatten(),
            group=image,  # one knee per image (a pan-and-scan crop is an image)
            content=torch.ones_like(image, dtype=torch.bool),
            row=torch.full_like(image, -1),
            coords=torch.stack([image, cell // per_side, cell % per_side], dim=-1),
        )

    def encode(self, model, input_ids, visual, stage1, stage1_keep=None):
        return select_visual(input_ids, [self._image_tokens(model, visual, stage1)], stage1, stage1_keep)

    def stage1_scores(self, model: nn.Module, visual: dict[str, Any], stage1: Any) -> torch.Tensor:
        """(images, U) the score of every pooled unit, row-major over each image's 16 x 16 grid."""
        pixels = self._pixels(model, visual)
        with torch.no_grad():
            out = self._tower(model, pixels, self.score_kind(model, stage1) == "attn_received")
            return self._scores(model, out, stage1)

    def premise_view(self, model: nn.Module, side: int) -> tuple[int, int]:
        """The tower's fixed input, and the pooled unit (patch x pooling kernel) as the scored unit."""
        vc = model.config.vision_config
        return int(vc.image_size), int(vc.image_size) // self._units(model)[1]

    def expand_packed(
        self, model: nn.Module, input_ids: torch.Tensor, packed: dict[str, torch.Tensor], expand_size: int
    ) -> dict[str, torch.Tensor]:
        """Each sample's images repeated ``expand_size`` times in a row (a sample's images: its
        placeholders / ``mm_tokens_per_image``)."""
        pv = packed["pixel_values"]
        n, _ = self._units(model)
        per_sample = ((input_ids == model.config.image_token_id).sum(dim=1) // n).tolist()
        if sum(per_sample) != pv.shape[0]:
            raise ValueError(
                f"the prompts hold {sum(per_sample)} images ({n} placeholders each) but pixel_values has "
                f"{pv.shape[0]} rows"
            )
        items = torch.arange(pv.shape[0]).split(per_sample)
        order = (
            torch.cat([i.repeat(expand_size) for i in items]) if items else torch.zeros(0, dtype=torch.long)
        )
        return {"pixel_values": pv[order.to(pv.device)]}

    # ------------------------------------------------------------------------------------------
    # speed runs

    def random_prompt(self, model, batch_size, text_before, text_after, seed, device):
        """``[bos]``, ``text_before - 1`` random tokens, ``<start_of_image>``, one image's placeholders,
        ``<end_of_image>``, ``text_after`` tokens; ``token_type_ids`` as the processor marks them and
        random pixels at the tower's size."""
        cfg = model.config
        n, _ = self._units(model)
        side = cfg.vision_config.image_size
        g = torch.Generator().manual_seed(seed)
        bos = torch.full((batch_size, 1), cfg.text_config.bos_token_id, dtype=torch.long)
        boi = torch.full((batch_size, 1), cfg.boi_token_id, dtype=torch.long)
        eoi = torch.full((batch_size, 1), cfg.eoi_token_id, dtype=torch.long)
        image = torch.full((batch_size, n), cfg.image_token_id, dtype=torch.long)
        before = random_text(model, batch_size, text_before - 1, g)
        after = random_text(model, batch_size, text_after, g)
        input_ids = torch.cat([bos, before, boi, image, eoi, after], dim=1)
        pixel_values = torch.randn(batch_size, 3, side, side, generator=g)
        return {
            "input_ids": input_ids.to(device),
            "attention_mask": torch.ones_like(input_ids).to(device),
            "token_type_ids": token_type_ids(model, input_ids).to(device),
            "pixel_values": pixel_values.to(device=device, dtype=next(model.parameters()).dtype),
        }


FAMILIES = (Gemma3Family(),)
