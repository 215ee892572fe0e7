"""InternVL (``InternVLForConditionalGeneration``; InternVL3 / InternVL2.5 as transformers ships them):
each image is cut into tiles (a grid of ``image_size`` crops plus a thumbnail of the whole image,
the thumbnail last), every tile runs through InternViT (a ViT with a CLS token), and the pixel
shuffle turns each 2 x 2 block of patches into one LM token (at ``downsample_ratio`` 0.5). The
processor writes ``<img>``, one ``<IMG_CONTEXT>`` placeholder per token of every tile, ``</img>``;
video frames are tiles of their own, one ``<img>`` ... ``</img>`` run each. 1-D positions.

* **Tokens**: ``pixel_values`` (tiles, 3, S, S) holds the tiles of every image of the batch in
  prompt order; the placeholders, row-major over the batch, take them ``T`` tokens a tile, in the
  order of the shuffle's token grid (row-major over (S/p/2) x (S/p/2)). Each contiguous run of
  placeholders is one image (or frame): ``stage1.groups: image`` cuts one knee over all its tiles and
  its thumbnail, ``view`` one per tile.
* **Scores**: stage 1 scores the tower's patches at ``vision_feature_layer`` (default ``cosine`` to
  CLS; ``cls_attn``, the CLS row of the last encoder layer's attention; or a CLS-less score) and a
  token's score is the mean of its patches' scores, grouped by the model's own ``pixel_shuffle`` run
  on the score (and the patch row and column) as channels: whatever the shuffle does to features, it
  does to these, so a token's score comes from exactly the patches its embedding does.
* **Embeddings**: stock's, from one ``get_image_features`` call; keep-all is the stock forward.
* **Markers**: stage 1 drops placeholders only; stage 2 never drops the token just before or after a
  run (``<img>``, ``</img>``; ``Family.protect_run_edges``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from tpkit.models.core.family import Family, HarnessSupport, Visual, first_missing, random_text
from tpkit.models.core.sharded import with_gathered
from tpkit.models.core.visual import VisualTokens, select_visual
from tpkit.models.internvl.tiny import ARCHITECTURES, MARKERS_ATTR, tiny_internvl_config, tokens_per_tile
from tpkit.pruning.stage1 import encoder_attention, patch_scores

__all__ = ["FAMILIES", "InternVLFamily", "patch_groups", "image_runs"]


def patch_groups(model: nn.Module, per_patch: torch.Tensor) -> torch.Tensor:
    """Per-patch channels (tiles, P, C) -> (tiles, T, g*g, C): each LM token's ``g * g`` patches' channels,
    grouped by the model's own ``pixel_shuffle`` exactly as it groups the features (CLS excluded)."""
    n, p, c = per_patch.shape
    side = math.isqrt(p)
    x = model.model.pixel_shuffle(
        per_patch.reshape(n, side, side, c), scale_factor=model.config.downsample_ratio
    )
    return x.reshape(n, -1, x.shape[-1] // c, c)  # the shuffle concatenates whole patches' channels


def image_runs(input_ids: torch.Tensor, token_id: int, per_tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(run, tile) of every placeholder, flat in row-major order (M,): the contiguous run (image or
    frame) it belongs to and the tile it takes its feature from (``per_tile`` placeholders a tile, the
    batch's tiles in order). ValueError when a run is not a whole number of tiles."""
    b, t = input_ids.shape
    flat = (input_ids == token_id).flatten().nonzero().squeeze(1)  # (M,)
    start = torch.ones_like(flat, dtype=torch.bool)
    start[1:] = (flat[1:] != flat[:-1] + 1) | (flat[1:] % t == 0)
    run = start.long().cumsum(0) - 1
    lengths = torch.bincount(run, minlength=int(run[-1]) + 1 if flat.numel() else 0)
    bad = (lengths % per_tile != 0).nonzero()
    if bad.numel():
        i = int(bad[0])
        first = int(flat[start][i])
        raise ValueError(
            f"sample {first // t}: a run of {int(lengths[i])} image placeholders (token id {token_id}) starting at "
            f"position {first % t} is not a whole number of tiles of {per_tile} tokens: build input_ids with the "
            "model's processor (image_seq_length = tokens per tile)"
        )
    return run, torch.arange(flat.numel(), device=flat.device) // per_tile


class InternVLFamily(Family):
    name = "internvl"
    classes = ("InternVLForConditionalGeneration",)
    visual_keys = ("pixel_values",)
    # tiles of every image of the batch, not one row per sample: beams expand them per sample
    packed_visual_keys = ("pixel_values",)
    protect_run_edges = True
    prompt_tiles = 5  # random_prompt's image: 896 x 896 = 2 x 2 tiles of 448 px + the thumbnail
    builders = {"internvl": (tiny_internvl_config, "InternVLForConditionalGeneration")}
    architectures = ARCHITECTURES
    # projector: multi_modal_projector; tower: model.vision_tower (the defaults). Any number of images per
    # sample (each its own <img> run), videos as the processor lays their frames out
    harness = HarnessSupport(images=None, videos=True)

    # ---- structure ------------------------------------------------------------------------------
    def check(self, model: nn.Module) -> None:
        name = type(model).__name__
        needed = ["model.vision_tower.encoder.layer", "model.vision_tower.embeddings.cls_token",
                  "model.multi_modal_projector", "model.language_model.layers", "model.language_model.embed_tokens",
                  "model.language_model.norm", "model.language_model.rotary_emb", "model.pixel_shuffle",
                  "model.get_image_features", "lm_head", "config.image_token_id", "config.downsample_ratio"]  # fmt: skip
        path = first_missing(model, needed)
        if path is not None:
            raise ValueError(f"{name} has no '{path}': expected a stock {self.classes[0]}")
        attn = model.model.language_model.layers[0].self_attn
        for part in ("q_proj", "k_proj"):
            if not hasattr(attn, part):
                raise ValueError(f"{name}: decoder attention has no '{part}'")
        strategy = model.config.vision_feature_select_strategy
        if strategy != "default":
            raise ValueError(
                f"{name}: vision_feature_select_strategy = {strategy!r}; tpkit prunes InternVL's patch grid with "
                "the CLS feature dropped ('default', as InternVL ships)"
            )

    def language_model(self, model: nn.Module) -> nn.Module:
        return model.model.language_model

    def tower_call_key(self, pixel_values: torch.Tensor, args: tuple, kwargs: dict[str, Any]) -> tuple | None:
        """Every call, keyed by the pixels' shape and whether it asks for all hidden states: stage 1 calls
        ``get_image_features`` as stock does unless its score needs the tower's inner layers
        (``cls_attn``, ``attn_received``, a ``vision_feature_layer`` other than -1), so the student and the
        teacher share one run in the default setting."""
        return (tuple(pixel_values.shape), pixel_values.device, kwargs.get("output_hidden_states") is True)

    # ---- stage 1 --------------------------------------------------------------------------------
    def _tower(self, model: nn.Module, pixel_values: torch.Tensor, stage1: Any):
        """One stock ``get_image_features`` call: (tower output with ``pooler_output`` (tiles, T, D) the
        projected tokens, the hidden states the score reads ((tiles, 1 + P, Dv) at the feature layer,
        the last layer's input))."""
        vc = model.config.vision_config
        size = tuple(vc.image_size)
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[-2:]) != size:
            raise ValueError(
                f"pixel_values of shape {tuple(pixel_values.shape)}: InternVL takes the tiles of every image stacked, "
                f"(tiles, 3, {size[0]}, {size[1]}) (vision_config.image_size)"
            )
        layer = model.config.vision_feature_layer
        kind = self.score_kind(model, stage1)
        inner = layer != -1 or (stage1.enabled and kind in ("cls_attn", "attn_received"))
        out = model.model.get_image_features(
            pixel_values=pixel_values, return_dict=True, **({"output_hidden_states": True} if inner else {})
        )
        if not inner:
            return out, out.last_hidden_state, None
        hs = out.hidden_states
        if hs is None or hs[layer] is None or hs[-2] is None:
            raise ValueError("the vision tower returned no hidden_states (needed by stage 1)")
        return out, out.last_hidden_state if layer == -1 else hs[layer], hs[-2]

    def _patch_scores(
        self, model: nn.Module, feature: torch.Tensor, last_in: torch.Tensor | None, stage1: Any
    ):
        """(tiles, P) stage-1 score of every patch (CLS excluded) at the feature layer; the attention
        scores from the last encoder layer's q/k (its input ``last_in``)."""
        last = model.model.vision_tower.encoder.layer[-1]
        attention = (
            with_gathered(last, encoder_attention(last_in, last, cls=True)) if last_in is not None else None
        )
        kind = self.score_kind(model, stage1)
        return patch_scores(kind, feature, cls=True, attention=attention, seed=stage1.seed)

    def _token_info(self, model: nn.Module, scores: torch.Tensor) -> torch.Tensor:
        """(tiles, T, 3): each token's score (its patches' mean), row and column in the token grid, from
        the patches' scores (tiles, P)."""
        n, p = scores.shape
        side = math.isqrt(p)
        if side * side != p:
            raise ValueError(f"{type(model).__name__}: {p} patches per tile is not a square grid")
        cell = torch.arange(p, device=scores.device)
        info = torch.stack(
            [scores.float(), (cell // side).float().expand(n, p), (cell % side).float().expand(n, p)],
            -1,
        )
        grouped = patch_groups(model, info)  # (tiles, T, g*g, 3)
        g = math.isqrt(grouped.shape[2])
        rc = grouped[..., 1:].amin(dim=2).div(g).floor()  # the block's top-left patch / g
        return torch.cat([grouped[..., :1].mean(dim=2), rc], dim=-1)

    def _tokens(
        self, model: nn.Module, input_ids: torch.Tensor, pixel_values: torch.Tensor, stage1: Any
    ) -> VisualTokens:
        """Every placeholder of the batch as stage 1 sees it (one tower run)."""
        out, feature, last_in = self._tower(model, pixel_values, stage1)
        embeds = out.pooler_output  # (tiles, T, D)
        n, per_tile = embeds.shape[:2]
        if stage1.enabled:
            info = self._token_info(model, self._patch_scores(model, feature, last_in, stage1))
        else:  # no scores needed: the grid only
            info = self._token_info(model, feature.new_zeros(feature.shape[0], feature.shape[1] - 1))
        token_id = int(model.config.image_token_id)
        run, tile = image_runs(input_ids, token_id, per_tile)
        if tile.numel() != n * per_tile:
            raise ValueError(
                f"the prompts hold {tile.numel()} image placeholders (token id {token_id}) but pixel_values gives "
                f"{n} tiles of {per_tile} tokens: build input_ids and pixel_values with the same processor "
                "(its image_seq_length, crop_to_patches, max_patches)"
            )
        info = info.flatten(0, 1)  # (tiles * T, 3), in placeholder order
        coords = torch.cat([tile[:, None], info[:, 1:].long()], dim=-1)  # (tile, row, col)
        return VisualTokens(
            token_id=token_id,
            embeds=embeds.flatten(0, 1),
            scores=info[:, 0],
            group=tile if stage1.groups == "view" else run,
            content=torch.ones(n * per_tile, dtype=torch.bool, device=embeds.device),
            row=torch.full((n * per_tile,), -1, dtype=torch.long, device=embeds.device),
            coords=coords,
        )

    def encode(self, model, input_ids, visual, stage1, stage1_keep=None) -> Visual:
        tokens = self._tokens(model, input_ids, visual["pixel_values"], stage1)
        return select_visual(input_ids, [tokens], stage1, stage1_keep)

    def stage1_scores(self, model: nn.Module, visual: dict[str, Any], stage1: Any) -> torch.Tensor:
        """(tiles, h, w) the score of every LM token of every tile, on its token grid."""
        pixel_values = visual["pixel_values"]
        with torch.no_grad():
            out, feature, last_in = self._tower(model, pixel_values, stage1)
            info = self._token_info(model, self._patch_scores(model, feature, last_in, stage1))
        side = math.isqrt(info.shape[1])
        return info[..., 0].view(-1, side, side)

    def view_scores(self, model: nn.Module, pixel_values: torch.Tensor, stage1: Any) -> torch.Tensor:
        """(B, T) token scores of one tile per image, row-major."""
        return self.stage1_scores(model, {"pixel_values": pixel_values}, stage1).flatten(1)

    def premise_view(self, model: nn.Module, side: int) -> tuple[int, int]:
        """The tile size, and one LM token's side in pixels (a patch times the shuffle's group)."""
        vc = model.config.vision_config
        return int(vc.image_size[0]), int(vc.patch_size[0]) * round(1 / model.config.downsample_ratio)

    def expand_packed(self, model, input_ids, packed, expand_size):
        """Each sample's tiles (its placeholders / tokens per tile, in batch order) repeated
        ``expand_size`` times, sample after sample."""
        tiles = (input_ids == model.config.image_token_id).sum(dim=1) // tokens_per_tile(model.config)
        pixels = packed["pixel_values"]
        if int(tiles.sum()) != pixels.shape[0]:
            raise ValueError(
                f"the prompts hold {int(tiles.sum())} tiles of placeholders but pixel_values has {pixels.shape[0]} tiles"
            )
        per_sample = pixels.split(tiles.tolist())
        return {"pixel_values": torch.cat([p for p in per_sample for _ in range(expand_size)])}

    # ---- speed runs -----------------------------------------------------------------------------
    def random_prompt(self, model, batch_size, text_before, text_after, seed, device):
        """``text_before`` random tokens, one image of :attr:`prompt_tiles` tiles (``<img>``, its
        placeholders, ``</img>`` where the config names the markers), ``text_after`` tokens."""
        cfg = model.config
        vc = cfg.vision_config
        n = self.prompt_tiles * tokens_per_tile(cfg)
        g = torch.Generator().manual_seed(seed)
        markers = getattr(cfg, MARKERS_ATTR, None)
        parts = [random_text(model, batch_size, text_before, g)]
        image = torch.full((batch_size, n), cfg.image_token_id, dtype=torch.long)
        if markers:
            start, end = (torch.full((batch_size, 1), int(i), dtype=torch.long) for i in markers)
            parts += [start, image, end]
        else:
            parts.append(image)
        parts.append(random_text(model, batch_size, text_after, g))
        input_ids = torch.cat(parts, dim=1)
        side = vc.image_size
        pixels = torch.randn(batch_size * self.prompt_tiles, 3, side[0], side[1], generator=g)
        return {
            "input_ids": input_ids.to(device),
            "attention_mask": torch.ones_like(input_ids).to(device),
            "pixel_values": pixels.to(device=device, dtype=next(model.parameters()).dtype),
        }


FAMILIES = (InternVLFamily(),)
