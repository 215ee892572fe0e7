"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``) and LLaVA-OneVision
(``LlavaOnevisionForConditionalGeneration``): any-resolution images (a base view plus high-resolution
crops packed on one canvas, unpadded to the image's aspect ratio, an ``image_newline`` token closing
each canvas row), several images per sample, OneVision's video frames; 1-D positions.

Every placeholder's LM embedding is what stock computes (the tower over all crops, the projector, the
model's own ``pack_image_features``), so keep-all is the stock forward. To know what each packed
token is, the same packing runs once more on a few channels per patch instead of its features: its
stage-1 score, its crop, its canvas row and column, and a content flag (the newline vector is all
zeros). Whatever the packing does to the features (unpadding, OneVision's bilinear downsampling of
large canvases, video pooling), it does to these channels: a downsampled token's score is the
interpolation of its patches' scores.

Stage 1 (:func:`tpkit.models.core.visual.select_visual`): one knee per image over all its views
(``stage1.groups: image``) or one per view (``view``: the base view and each crop; video: each frame).
Newline tokens are structure: one stays exactly when its canvas row keeps a patch. CLIP towers (NeXT)
score against CLS; SigLIP towers (OneVision) have none and default to ``mean_distance``.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from tpkit.models.core.family import Family, HarnessSupport, first_missing, random_text
from tpkit.models.core.sharded import with_gathered
from tpkit.models.core.visual import VisualTokens, select_visual
from tpkit.models.llava_next.tiny import ARCHITECTURES, tiny_next_config, tiny_onevision_config
from tpkit.pruning.stage1 import encoder_attention, patch_scores

__all__ = ["FAMILIES", "LlavaNextFamily", "LlavaOnevisionFamily"]

_CHANNELS = 5  # score, crop (0 = base view), canvas row, canvas column, content flag


def _tower_layers(tower: nn.Module) -> nn.ModuleList:
    for root in (tower, getattr(tower, "vision_model", None)):
        enc = getattr(root, "encoder", None) if root is not None else None
        if enc is not None and hasattr(enc, "layers"):
            return enc.layers
    raise ValueError(f"cannot find the encoder layers of {type(tower).__name__}")


class LlavaNextFamily(Family):
    name = "llava_next"
    classes = ("LlavaNextForConditionalGeneration",)
    visual_keys = ("pixel_values", "image_sizes")
    builders = {"llava_next": (tiny_next_config, "LlavaNextForConditionalGeneration")}
    architectures = {n: kw for n, kw in ARCHITECTURES.items() if kw["builder"] == "llava_next"}
    harness = HarnessSupport(images=None)
    prompt_image = (672, 672)  # random_prompt's image: 2 x 2 crops + the base view at 336 px

    # ---- structure ------------------------------------------------------------------------------
    def check(self, model: nn.Module) -> None:
        name = type(model).__name__
        path = first_missing(model, ["model.vision_tower", "model.multi_modal_projector", "model.language_model",
                                     "model.image_newline", "lm_head", "config.image_grid_pinpoints"])  # fmt: skip
        if path is not None:
            raise ValueError(f"{name} has no '{path}': expected a stock {self.classes[0]}")

    def language_model(self, model: nn.Module) -> nn.Module:
        return model.model.language_model

    def has_cls(self, model: nn.Module) -> bool:
        return model.config.vision_config.model_type == "clip_vision_model"

    def has_visual(self, visual: dict[str, Any]) -> bool:
        return visual.get("pixel_values") is not None

    def _module(self, model: nn.Module):
        """The transformers modeling module of this model (its any-res helpers)."""
        return sys.modules[type(model.model).__module__]

    def _pack(self, model: nn.Module, feats: list[torch.Tensor], sizes, newline: torch.Tensor) -> list:
        return model.model.pack_image_features(
            feats,
            sizes,
            vision_feature_select_strategy=model.config.vision_feature_select_strategy,
            image_newline=newline,
        )[0]

    def _crops(self, model: nn.Module, visual: dict[str, Any]) -> list[int]:
        """Views (base + crops) of each image, as stock derives them from ``image_sizes``."""
        mod = self._module(model)
        return [
            mod.image_size_to_num_patches(
                image_size=size,
                grid_pinpoints=model.config.image_grid_pinpoints,
                patch_size=model.config.vision_config.image_size,
            )
            for size in visual["image_sizes"]
        ]

    # ---- the tower ------------------------------------------------------------------------------
    def _tower(self, model: nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        tower = model.model.vision_tower
        out = tower(pixels.to(next(tower.parameters()).dtype), output_hidden_states=True, return_dict=True)
        return out.hidden_states

    def _features(self, model: nn.Module, hs: tuple) -> torch.Tensor:
        """(views, S, Dv) tower features as stock selects them (layer(s), CLS dropped by "default")."""
        layer = model.config.vision_feature_layer
        feats = hs[layer] if isinstance(layer, int) else torch.cat([hs[i] for i in layer], dim=-1)
        if model.config.vision_feature_select_strategy == "default":
            feats = feats[:, 1:]
        return feats

    def _scores(self, model: nn.Module, hs: tuple, stage1: Any) -> torch.Tensor:
        """(views, S) stage-1 score of every feature token :meth:`_features` returns."""
        layer = model.config.vision_feature_layer
        h = hs[layer if isinstance(layer, int) else layer[-1]]
        cls = self.has_cls(model)
        last = _tower_layers(model.model.vision_tower)[-1]
        attention = with_gathered(last, encoder_attention(hs[-2], last, cls=cls))
        s = patch_scores(self.score_kind(model, stage1), h, cls=cls, attention=attention, seed=stage1.seed)
        strategy = model.config.vision_feature_select_strategy
        if cls and strategy == "full":  # the CLS feature is a token too: never dropped
            s = torch.cat([torch.full_like(s[:, :1], float("inf")), s], dim=1)
        elif not cls and strategy == "default":  # stock drops the first patch as if it were CLS
            s = s[:, 1:]
        return s

    def _side(self, model: nn.Module, n: int) -> int:
        vc = model.config.vision_config
        side = vc.image_size // vc.patch_size
        if side * side != n:
            raise ValueError(
                f"{type(model).__name__}: {n} feature tokens per view, not a {side}x{side} patch grid "
                f"(vision_feature_select_strategy={model.config.vision_feature_select_strategy!r} with a "
                f"{'CLS' if self.has_cls(model) else 'CLS-less'} tower): tpkit prunes patch grids only"
            )
        return side

    # ---- images ---------------------------------------------------------------------------------
    def _pixels(self, model: nn.Module, visual: dict[str, Any], crops: list[int]) -> torch.Tensor:
        pv = visual["pixel_values"]
        if pv.dim() == 5:
            if pv.shape[0] != len(crops):
                raise ValueError(
                    f"pixel_values holds {pv.shape[0]} images but image_sizes {len(crops)}: pass one size per image"
                )
            return torch.cat([p[:n] for p, n in zip(pv, crops)], dim=0)
        if pv.dim() != 4 or pv.shape[0] != sum(crops):
            raise ValueError(
                f"pixel_values of shape {tuple(pv.shape)}: expected (images, views, C, H, W) or the views "
                f"stacked ({sum(crops)}, C, H, W) for image_sizes {visual['image_sizes'].tolist()}"
            )
        return pv

    def _image_tokens(self, model: nn.Module, visual: dict[str, Any], stage1: Any) -> VisualTokens:
        if visual.get("image_sizes") is None:
            raise ValueError(
                f"{type(model).__name__} needs image_sizes (the processor returns them with pixel_values)"
            )
        crops = self._crops(model, visual)
        hs = self._tower(model, self._pixels(model, visual, crops))
        feats = self._features(model, hs)  # (views, S, Dv)
        side = self._side(model, feats.shape[1])
        embeds = model.model.multi_modal_projector(feats)
        newline = model.model.image_newline
        packed = self._pack(model, list(embeds.split(crops)), visual["image_sizes"], newline)
        scores = (
            self._scores(model, hs, stage1) if stage1.enabled else feats.new_zeros(feats.shape[:2]).float()
        )
        info = self._info(model, scores, crops, visual["image_sizes"], side)
        info_newline = torch.zeros(_CHANNELS, dtype=info.dtype, device=info.device)
        packed_info = self._pack(model, list(info.split(crops)), visual["image_sizes"], info_newline)
        return self._tokens(
            model.config.image_token_id, torch.cat(packed), packed_info, [n > 1 for n in crops], "image"
        )

    def _info(
        self, model: nn.Module, scores: torch.Tensor, crops: list[int], sizes, side: int
    ) -> torch.Tensor:
        """(views, S, 5) channels per feature token: score, crop index, canvas row and column, 1."""
        mod = self._module(model)
        vc = model.config.vision_config
        dev = scores.device
        cell = torch.arange(side * side, device=dev)
        r, c = cell // side, cell % side
        rows = []
        for n, size in zip(crops, sizes):
            if n > 1:
                _, npw = mod.get_anyres_image_grid_shape(
                    size, model.config.image_grid_pinpoints, vc.image_size
                )
            for j in range(n):
                gi, gj = ((j - 1) // npw, (j - 1) % npw) if j > 0 else (0, 0)
                rows.append(torch.stack([
                    torch.full_like(r, j), gi * side + r, gj * side + c, torch.ones_like(r)
                ], dim=-1))  # fmt: skip
        geo = torch.stack(rows).float()  # (views, S, 4)
        return torch.cat([scores.float().to(dev)[..., None], geo], dim=-1)

    def _tokens(self, token_id: int, embeds, packed_info: list, multi: list[bool], what: str) -> VisualTokens:
        """VisualTokens from the packed channels of each image (or video)."""
        groups, rows, coords, content, scores = [], [], [], [], []
        row_base = 0
        for i, (info, has_canvas) in enumerate(zip(packed_info, multi)):
            is_content = info[:, 4] > 0.5
            crop = info[:, 1].round().long()
            nl = (~is_content).long()
            local = nl.cumsum(0) - nl  # newlines before each token: its canvas row
            row = local + row_base
            if has_canvas:  # the base view has no newlines: its patches link to none
                row = torch.where(is_content & (crop == 0), -1, row)
            row_base += int(nl.sum()) + 1
            groups.append(torch.stack([torch.full_like(crop, i), crop.clamp(min=0)], -1))
            rows.append(row)
            view = torch.where(crop > 0, 2 * i + 1, 2 * i) if has_canvas else torch.full_like(crop, 2 * i)
            xy = info[:, 2:4].round().long()
            coords.append(torch.cat([torch.where(is_content, view, -1)[:, None], xy], dim=-1))
            content.append(is_content)
            scores.append(info[:, 0])
        g = torch.cat(groups)
        return VisualTokens(
            token_id=token_id,
            embeds=embeds,
            scores=torch.cat(scores),
            group=g,  # (image, crop) pairs; select_visual's caller picks the grouping
            content=torch.cat(content),
            row=torch.cat(rows),
            coords=torch.cat(coords),
            what=what,
        )

    def _kinds(self, model: nn.Module, visual: dict[str, Any], stage1: Any) -> list[VisualTokens]:
        return [self._image_tokens(model, visual, stage1)] if visual.get("pixel_values") is not None else []

    def encode(self, model, input_ids, visual, stage1, stage1_keep=None):
        kinds = self._kinds(model, visual, stage1)
        for kind in kinds:
            pair = kind.group  # (M, 2): (image or video, view)
            if stage1.groups == "view":
                kind.group = pair[:, 0] * (int(pair[:, 1].max()) + 1) + pair[:, 1]
            else:
                kind.group = pair[:, 0]
        return select_visual(input_ids, kinds, stage1, stage1_keep)

    def stage1_scores(self, model: nn.Module, visual: dict[str, Any], stage1: Any) -> torch.Tensor:
        """(views, S): the score of every patch of every view (base view first, then the crops of
        each image), before packing."""
        crops = self._crops(model, visual)
        with torch.no_grad():
            return self._scores(model, self._tower(model, self._pixels(model, visual, crops)), stage1)

    def view_scores(self, model: nn.Module, pixel_values: torch.Tensor, stage1: Any) -> torch.Tensor:
        with torch.no_grad():
            s = self._scores(model, self._tower(model, pixel_values), stage1)
        return (
            s[:, 1:] if self.has_cls(model) and model.config.vision_feature_select_strategy == "full" else s
        )

    # ---- speed runs -----------------------------------------------------------------------------
    def image_token_count(self, model: nn.Module, size: tuple[int, int], base_only: bool = False) -> int:
        """Placeholders one image of ``size`` (height, width) takes (the packing run on one channel);
        ``base_only``: its base view alone (OneVision's images in a multi-image sample)."""
        vc = model.config.vision_config
        sizes = torch.tensor([size])
        crops = [1] if base_only else self._crops(model, {"image_sizes": sizes})
        side = vc.image_size // vc.patch_size
        zeros = torch.zeros(crops[0], side * side, 1)
        return int(self._pack(model, [zeros], sizes, torch.zeros(1))[0].shape[0])

    def random_prompt(self, model, batch_size, text_before, text_after, seed, device):
        vc = model.config.vision_config
        n = self.image_token_count(model, self.prompt_image)
        crops = self._crops(model, {"image_sizes": torch.tensor([self.prompt_image])})[0]
        g = torch.Generator().manual_seed(seed)
        bos = torch.full((batch_size, 1), 1, dtype=torch.long)
        image = torch.full((batch_size, n), model.config.image_token_id, dtype=torch.long)
        before = random_text(model, batch_size, text_before - 1, g)
        input_ids = torch.cat([bos, before, image, random_text(model, batch_size, text_after, g)], dim=1)
        pixels = torch.randn(batch_size, crops, 3, vc.image_size, vc.image_size, generator=g)
        return {
            "input_ids": input_ids.to(device),
            "attention_mask": torch.ones_like(input_ids).to(device),
            "pixel_values": pixels.to(device=device, dtype=next(model.parameters()).dtype),
            "image_sizes": torch.tensor([self.prompt_image] * batch_size, device=device),
        }


class LlavaOnevisionFamily(LlavaNextFamily):
    name = "llava_onevision"
    classes = ("LlavaOnevisionForConditionalGeneration",)
    builders = {"llava_onevision": (tiny_onevision_config, "LlavaOnevisionForConditionalGeneration")}
    architectures = {n: kw for n, kw in ARCHITECTURES.items() if kw["builder"] == "llava_onevision"}
    harness = HarnessSupport(images=None, videos=True)
    visual_keys = ("pixel_values", "image_sizes", "pixel_values_videos", "batch_num_images")
    prompt_image = (768, 768)  # 2 x 2 crops + the base view at 384 px

    def placeholder_ids(self, model: nn.Module) -> tuple[int, ...]:
        return (int(model.config.image_token_id), int(model.config.video_token_id))

    def has_visual(self, visual: dict[str, Any]) -> bool:
        return visual.get("pixel_values") is not None or visual.get("pixel_values_videos") is not None

    def _pack(self, model: nn.Module, feats: list[torch.Tensor], sizes, newline: torch.Tensor) -> list:
        return model.model.pack_image_features(
            feats, sizes, image_newline=newline, vision_aspect_ratio=model.config.vision_aspect_ratio
        )[0]

    def _crops(self, model: nn.Module, visual: dict[str, Any]) -> list[int]:
        crops = super()._crops(model, visual)
        per_sample = visual.get("batch_num_images")
        if per_sample is None:
            return crops
        # stock: images of a multi-image sample are encoded as their base view only
        single = [int(n) == 1 for n in per_sample for _ in range(int(n))]
        if len(single) != len(crops):
            raise ValueError(
                f"batch_num_images {list(map(int, per_sample))} counts {len(single)} images but image_sizes has "
                f"{len(crops)}"
            )
        return [c if s else 1 for c, s in zip(crops, single)]

    def _kinds(self, model: nn.Module, visual: dict[str, Any], stage1: Any) -> list[VisualTokens]:
        kinds = super()._kinds(model, visual, stage1)
        if visual.get("pixel_values_videos") is not None:
            kinds.append(self._video_tokens(model, visual["pixel_values_videos"], stage1))
        return kinds

    def _video_tokens(self, model: nn.Module, videos: torch.Tensor, stage1: Any) -> VisualTokens:
        """Frames through the tower, 2x2 pooling, one newline closing each video (as stock)."""
        if videos.dim() != 5:
            raise ValueError(
                f"pixel_values_videos must be (videos, frames, C, H, W), got {tuple(videos.shape)}"
            )
        b, f = videos.shape[:2]
        hs = self._tower(model, videos.flatten(0, 1))
        feats = self._features(model, hs)  # (B*F, S, Dv)
        side = self._side(model, feats.shape[1])
        pooled = model.model.apply_pooling(model.model.multi_modal_projector(feats))  # (B*F, S', D)
        embeds = pooled.reshape(b, -1, pooled.shape[-1])
        newline = model.model.image_newline.to(embeds.dtype)
        embeds = torch.cat([embeds, newline[None, None].expand(b, 1, -1)], dim=1)  # (B, F*S' + 1, D)
        scores = (
            self._scores(model, hs, stage1) if stage1.enabled else feats.new_zeros(feats.shape[:2]).float()
        )
        cell = torch.arange(side * side, device=feats.device)
        frame = torch.arange(b * f, device=feats.device) % f
        info = torch.stack(
            [
                scores.float(),
                frame[:, None].expand(-1, side * side).float(),
                (cell // side).float().expand(b * f, -1),
                (cell % side).float().expand(b * f, -1),
                torch.ones(b * f, side * side, device=feats.device),
            ],
            dim=-1,
        )  # (B*F, S, 5)
        info = model.model.apply_pooling(info).reshape(b, -1, _CHANNELS)
        info = torch.cat([info, info.new_zeros(b, 1, _CHANNELS)], dim=1)
        tokens = self._tokens(
            int(model.config.video_token_id), embeds.flatten(0, 1), list(info), [False] * b, "video"
        )
        tokens.row = torch.where(tokens.content, tokens.row, -1)  # the closing newline always stays
        crop = tokens.group[:, 1]  # here: the frame
        tokens.coords[:, 0] = torch.where(tokens.content, tokens.group[:, 0] * f + crop, -1)
        return tokens


FAMILIES = (LlavaNextFamily(), LlavaOnevisionFamily())
