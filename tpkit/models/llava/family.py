"""LLaVA-1.5 (``LlavaForConditionalGeneration``): one image per sample, one contiguous placeholder run,
a CLIP tower with a CLS token, a 2-layer MLP projector, 1-D positions.

Stage 1 scores each patch by cos(CLS, patch) at ``vision_feature_layer`` (or the CLS row of the last
encoder attention, ``cls_attn``), keeps the knee's head per image and projects only the kept patches
(the projector is per token, so projecting a subset equals projecting all and dropping).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from tpkit.models.core.family import Family, HarnessSupport, Visual, first_missing, random_text
from tpkit.models.core.sharded import with_gathered
from tpkit.models.llava.tiny import ARCHITECTURES, tiny_llava_config
from tpkit.pruning.stage1 import context_merge, encoder_attention, merge_into, patch_scores, select_patches

__all__ = ["FAMILIES", "LlavaFamily", "image_token_count", "tower_states"]


def image_token_count(model: nn.Module) -> tuple[int, int]:
    """(placeholders per image, patches per image): a leading CLS placeholder with strategy "full"."""
    vc = model.config.vision_config
    n_patches = (vc.image_size // vc.patch_size) ** 2
    full = getattr(model.config, "vision_feature_select_strategy", "default") == "full"
    return n_patches + int(full), n_patches


def _tower_layers(tower: nn.Module) -> nn.ModuleList:
    """Encoder layers of a CLIP/SigLIP tower (flat in transformers 5, nested under vision_model before)."""
    for root in (tower, getattr(tower, "vision_model", None)):
        enc = getattr(root, "encoder", None) if root is not None else None
        if enc is not None and hasattr(enc, "layers"):
            return enc.layers
    raise ValueError(f"stage1.score='cls_attn': cannot find the encoder layers of {type(tower).__name__}")


def tower_states(model: nn.Module, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """All hidden states of the vision tower (one run, as stock LLaVA does)."""
    tower = model.model.vision_tower
    dtype = next(tower.parameters()).dtype
    out = tower(pixel_values.to(dtype), output_hidden_states=True, return_dict=True)
    if out.hidden_states is None:
        raise ValueError("the vision tower returned no hidden_states")
    return out.hidden_states


def _hs(hs: tuple, i: int) -> torch.Tensor:
    """hidden_states[i], or a clear error when a caching wrapper replayed an ``output_hidden_states=<int>`` call."""
    if hs[i] is None:
        raise ValueError(f"the vision tower returned no hidden_states[{i}] (needed by stage 1)")
    return hs[i]


class LlavaFamily(Family):
    name = "llava"
    classes = ("LlavaForConditionalGeneration",)
    builders = {"llava": (tiny_llava_config, "LlavaForConditionalGeneration")}
    architectures = ARCHITECTURES
    harness = HarnessSupport(images=1)
    fixed_patch_grid = True

    def check(self, model: nn.Module) -> None:
        name = type(model).__name__
        needed = [
            "model",
            "lm_head",
            "config",
            "model.vision_tower",
            "model.multi_modal_projector",
            "model.language_model",
            "model.language_model.layers",
            "model.language_model.embed_tokens",
            "model.language_model.norm",
            "model.language_model.rotary_emb",
            "config.image_token_id",
            "config.vision_config",
            "config.text_config",
        ]
        path = first_missing(model, needed)
        if path is not None:
            raise ValueError(
                f"{name} is not LLaVA-like: it has no '{path}' (expected a LlavaForConditionalGeneration "
                "with vision_tower, multi_modal_projector, language_model and lm_head)"
            )
        layer = model.model.language_model.layers[0]
        for part in ("input_layernorm", "self_attn"):
            if not hasattr(layer, part):
                raise ValueError(f"{name} is not LLaVA-like: decoder layers have no '{part}'")
        for part in ("q_proj", "k_proj"):
            if not hasattr(layer.self_attn, part):
                raise ValueError(f"{name} is not LLaVA-like: attention has no '{part}'")

    def language_model(self, model: nn.Module) -> nn.Module:
        return model.model.language_model

    def _run_start(
        self, model: nn.Module, input_ids: torch.Tensor, pixel_values: torch.Tensor
    ) -> torch.Tensor:
        """Checks placeholders and pixel sizes; returns each sample's run start (B,)."""
        vc = model.config.vision_config
        b = input_ids.shape[0]
        if pixel_values.dim() != 4 or pixel_values.shape[0] != b:
            raise ValueError(
                f"pixel_values must be (B={b}, C, H, W) with one image per sample, got {tuple(pixel_values.shape)}"
            )
        if tuple(pixel_values.shape[-2:]) != (vc.image_size, vc.image_size):
            raise ValueError(
                f"pixel_values are {pixel_values.shape[-2]}x{pixel_values.shape[-1]} but the vision tower expects "
                f"{vc.image_size}x{vc.image_size} (vision_config.image_size)"
            )
        n_tokens, _ = image_token_count(model)
        tok = model.config.image_token_id
        img = input_ids == tok  # (B, T)
        start = img.long().argmax(dim=1)  # (B,)
        span = torch.arange(input_ids.shape[1], device=img.device)[None, :] - start[:, None]
        contiguous = (img == ((span >= 0) & (span < n_tokens))).all(dim=1)  # (B,)
        counts, contiguous = torch.stack([img.sum(dim=1), contiguous.long()]).tolist()  # one sync
        for i, c in enumerate(counts):
            if c == 0:
                raise ValueError(
                    f"sample {i} has no image placeholder (image_token_id={tok}); the prompt must contain "
                    f"{n_tokens} image tokens (the processor expands '<image>')"
                )
            if c != n_tokens:
                raise ValueError(
                    f"sample {i} has {c} image placeholders (image_token_id={tok}) but one image gives {n_tokens} "
                    "features; one image per sample is supported"
                )
        if not all(contiguous):
            raise ValueError("image placeholders must form one contiguous run per sample")
        return start

    def scores(self, model: nn.Module, hs: tuple, s1: Any) -> torch.Tensor:
        """Stage-1 scores (B, P) per patch from the tower's hidden states (:func:`tower_states`)."""
        layer = model.config.vision_feature_layer
        score_hidden = _hs(hs, layer if isinstance(layer, int) else layer[-1])
        last = _tower_layers(model.model.vision_tower)[-1]
        attention = with_gathered(last, encoder_attention(_hs(hs, -2), last, cls=True))
        return patch_scores(
            self.score_kind(model, s1), score_hidden, cls=True, attention=attention, seed=s1.seed
        )

    def stage1_scores(self, model: nn.Module, visual: dict[str, Any], stage1: Any) -> torch.Tensor:
        with torch.no_grad():
            return self.scores(model, tower_states(model, visual["pixel_values"]), stage1)

    def encode(
        self,
        model: nn.Module,
        input_ids: torch.Tensor,
        visual: dict[str, Any],
        stage1: Any,
        stage1_keep: torch.Tensor | None = None,
    ) -> Visual:
        pixel_values = visual["pixel_values"]
        start = self._run_start(model, input_ids, pixel_values)  # (B,)
        mcfg = model.config
        hs = tower_states(model, pixel_values)
        layer = mcfg.vision_feature_layer
        strategy = getattr(mcfg, "vision_feature_select_strategy", "default")
        feats = _hs(hs, layer) if isinstance(layer, int) else torch.cat([_hs(hs, i) for i in layer], dim=-1)
        if strategy == "default":
            feats = feats[:, 1:]
        b, n = feats.shape[:2]
        n_tokens, n_patches = image_token_count(model)
        slot = torch.arange(n_tokens, device=input_ids.device)
        cell = slot - (n_tokens - n_patches)  # the CLS placeholder (strategy "full") is no patch
        side = math.isqrt(n_patches)
        coords = torch.stack(
            [torch.where(cell >= 0, 0, -1), cell.clamp(min=0) // side, cell.clamp(min=0) % side], -1
        ).expand(b, n_tokens, 3)
        scores = None
        if stage1.enabled:
            scores = self.scores(model, hs, stage1)  # (B, P)
            full = scores
            if strategy == "full":  # the CLS feature is an image token too: always keep it
                full = torch.cat([torch.full_like(scores[:, :1], float("inf")), scores], dim=1)
            keep, k1 = select_patches(full, stage1, stage1_keep, features=feats, coords=coords)
            if stage1.context_tokens:  # dropped patches merged into context slots (tower features)
                keep, into = context_merge(keep, full, feats, stage1.context_tokens)
                feats = merge_into(feats, into)
        else:
            keep = torch.ones(b, n, dtype=torch.bool, device=feats.device)
            k1 = torch.full((b,), n, dtype=torch.long, device=feats.device)
        n_kept = int(keep.sum())  # the one host sync of stage 1
        projector = model.model.multi_modal_projector
        if n_kept == keep.numel():
            projected = projector(feats).flatten(0, 1)  # same call as stock
        else:  # feats[keep] without a second sync: kept (row-major) positions lead a stable sort
            rows = torch.sort((~keep.flatten()).to(torch.uint8), stable=True).indices[:n_kept]  # (sum k1,)
            projected = projector(feats.flatten(0, 1).index_select(0, rows))  # (sum k1, D)
        return Visual(
            slots=start[:, None] + slot[None, :],
            keep=keep,
            k1=k1,
            projected=projected,
            scores=scores,
            coords=coords,
        )

    def random_prompt(self, model, batch_size, text_before, text_after, seed, device):
        vcfg = model.config.vision_config
        n_tokens, _ = image_token_count(model)
        g = torch.Generator().manual_seed(seed)
        bos = torch.full((batch_size, 1), 1, dtype=torch.long)
        image = torch.full((batch_size, n_tokens), model.config.image_token_id, dtype=torch.long)
        before = random_text(model, batch_size, text_before - 1, g)
        input_ids = torch.cat([bos, before, image, random_text(model, batch_size, text_after, g)], dim=1)
        pixel_values = torch.randn(batch_size, 3, vcfg.image_size, vcfg.image_size, generator=g)
        return {
            "input_ids": input_ids.to(device),
            "attention_mask": torch.ones_like(input_ids).to(device),
            "pixel_values": pixel_values.to(device=device, dtype=next(model.parameters()).dtype),
        }


FAMILIES = (LlavaFamily(),)
