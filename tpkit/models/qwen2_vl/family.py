"""Qwen2-VL and Qwen2.5-VL (``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration``):
images and videos at their own resolution, a ViT without CLS whose merger turns each 2x2 block of
patches into one LM token (a merged unit), and 3-D M-RoPE positions (temporal, height, width).

* **Tokens**: every ``<|image_pad|>`` / ``<|video_pad|>`` placeholder is one merged unit; an image's
  units run row-major over its merged grid, a video's frame after frame.
* **Stage 1** runs the tower once, as stock does (``get_image_features`` / ``get_video_features``),
  scores every unit (:mod:`tpkit.models.qwen2_vl.tower`; default ``mean_distance``) and cuts each image
  or video at its knee (``stage1.groups: view``: each video frame apart) with
  :func:`tpkit.models.core.visual.select_visual`; the kept units' embeddings are stock's, unchanged.
* **Positions**: stock's M-RoPE ids of the unpruned prompt (``get_rope_index``), (3, B, T); every kept
  token keeps its (t, h, w) ids through both stages, and decoding continues from the prompt's largest
  id + 1 on all three axes, as stock's ``rope_deltas`` make it.
* **Rotary**: the text model's ``rotary_emb`` returns cos/sin with the three sections already merged
  (B, T, d), which the decoder layers apply as Llama does; stage 2 rotates its q/k the same way.
* **In-tower stage 1** (``stage1.in_tower_block``): the scores come from a block inside the tower and
  the later blocks run on the kept units only (:mod:`tpkit.models.qwen2_vl.intower`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tpkit.models.core.family import Family, HarnessSupport, Visual, first_missing, llama_rotate, random_text
from tpkit.models.core.visual import VisualTokens, select_visual
from tpkit.models.qwen2_vl.intower import TowerHead, tower_head, tower_tail
from tpkit.models.qwen2_vl.tiny import (
    ARCHITECTURES,
    IMAGE_SIZE_ATTR,
    tiny_qwen2_5_vl_config,
    tiny_qwen2_vl_config,
)
from tpkit.models.qwen2_vl.tower import pack_views, run_tower, unit_scores

__all__ = ["FAMILIES", "Qwen2VLFamily", "DEFAULT_IMAGE_SIZE", "token_type_ids"]

# random_prompt's image side without a tpkit config attribute: 1036 = 74 patches of 14 -> 37 x 37 units
DEFAULT_IMAGE_SIZE = 1036


@dataclass(frozen=True)
class Kind:
    """One kind of visual input, as the processor and the model name its parts."""

    what: str  # "image" | "video"
    pix_key: str  # forward argument of its patch rows
    grid_key: str  # forward argument of its (n, 3) grids
    tok_key: str  # config attribute of its placeholder id
    token_type: int  # its code in mm_token_type_ids


KINDS = (
    Kind("image", "pixel_values", "image_grid_thw", "image_token_id", 1),
    Kind("video", "pixel_values_videos", "video_grid_thw", "video_token_id", 2),
)


@dataclass
class KindRun:
    """One kind's placeholders as stage 1 sees them (:meth:`Qwen2VLFamily._all_kinds`)."""

    kind: Kind
    tokens: VisualTokens  # embeds None: in-tower, filled in once the cut is known
    scores: torch.Tensor  # (U,) per merged unit, unit order
    head: TowerHead | None  # in-tower: the tower run up to the scoring block
    deepstack: list[torch.Tensor] | None = None  # Qwen3-VL: per DeepStack level (U, D) unit embeddings


def token_type_ids(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) int: 0 text, 1 image placeholder, 2 video placeholder (what the processor returns as
    ``mm_token_type_ids``)."""
    out = torch.zeros_like(input_ids, dtype=torch.int32)
    for kind in KINDS:
        out = out.masked_fill(input_ids == getattr(model.config, kind.tok_key), kind.token_type)
    return out


def qwen_rotate(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, qpos: torch.Tensor):
    """Stage 2's rotary for Qwen's M-RoPE: the text model's ``rotary_emb`` gives (B, T, d) cos/sin with
    the (t, h, w) sections merged, applied as Llama's. Raises on per-axis (3, B, T, d) tables."""
    if cos.dim() != 3:
        raise ValueError(
            f"Qwen2-VL stage 2 expects rotary cos/sin of shape (B, T, d) with the M-RoPE sections merged, "
            f"got {tuple(cos.shape)}: this transformers version lays them out differently"
        )
    return llama_rotate(q, k, cos, sin, qpos)


class Qwen2VLFamily(Family):
    name = "qwen2_vl"
    classes = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
    visual_keys = (
        "pixel_values",
        "image_grid_thw",
        "pixel_values_videos",
        "video_grid_thw",
        "second_per_grid_ts",  # Qwen2.5-VL videos: seconds per temporal patch (temporal position ids)
        "mm_token_type_ids",  # stock's M-RoPE needs it; derived from input_ids when absent
    )
    packed_visual_keys = (
        "pixel_values",
        "image_grid_thw",
        "pixel_values_videos",
        "video_grid_thw",
        "second_per_grid_ts",
    )
    rotate = staticmethod(qwen_rotate)
    in_tower = True
    builders = {
        "qwen2_vl": (tiny_qwen2_vl_config, "Qwen2VLForConditionalGeneration"),
        "qwen2_5_vl": (tiny_qwen2_5_vl_config, "Qwen2_5_VLForConditionalGeneration"),
    }
    architectures = ARCHITECTURES
    projector_modules = ("visual.merger",)  # the merger turns each 2x2 unit into an LM token
    tower_pattern = r"(^|\.)visual\."
    harness = HarnessSupport(images=None, videos=True)

    # what check() asks of a model of this family, and how its error names the family
    required = (
        "model.visual",
        "model.visual.merger",
        "model.visual.blocks",
        "model.language_model.layers",
        "model.language_model.embed_tokens",
        "model.language_model.norm",
        "model.language_model.rotary_emb",
        "model.get_rope_index",
        "model.get_image_features",
        "model.get_video_features",
        "lm_head",
        "config.image_token_id",
        "config.video_token_id",
        "config.vision_config",
    )
    like = "Qwen2-VL"
    default_image_size = DEFAULT_IMAGE_SIZE  # random_prompt's image side when the config names none

    def check(self, model: nn.Module) -> None:
        name = type(model).__name__
        path = first_missing(model, list(self.required))
        if path is not None:
            raise ValueError(
                f"{name} is not {self.like}-like: it has no '{path}' (expected a {self.like} model with "
                "model.visual, model.language_model and lm_head)"
            )
        lm = model.model.language_model
        attn = next((layer.self_attn for layer in lm.layers if hasattr(layer, "self_attn")), None)
        for part in ("q_proj", "k_proj"):
            if not hasattr(attn, part):
                raise ValueError(f"{name} is not {self.like}-like: decoder attention has no '{part}'")

    def has_cls(self, model: nn.Module) -> bool:
        return False

    def language_model(self, model: nn.Module) -> nn.Module:
        return model.model.language_model

    def vision_tower(self, model: nn.Module) -> nn.Module:
        return model.model.visual

    def tower_call_key(self, pixel_values: torch.Tensor, args: tuple, kwargs: dict[str, Any]) -> tuple | None:
        """Stock ``get_image_features`` / ``get_video_features`` calls (the student's after-tower stage 1
        and the teacher make the same one), keyed by the pixels' shape and the grids; the in-tower stage 1
        runs the tower's blocks in its own loop and never calls it."""
        grid = kwargs.get("grid_thw", args[0] if args else None)
        if grid is None or kwargs.get("return_dict") is False:
            return None
        return (tuple(pixel_values.shape), pixel_values.device, tuple(grid.flatten().tolist()))

    def placeholder_ids(self, model: nn.Module) -> tuple[int, ...]:
        return (int(model.config.image_token_id), int(model.config.video_token_id))

    def has_visual(self, visual: dict[str, Any]) -> bool:
        return visual.get("pixel_values") is not None or visual.get("pixel_values_videos") is not None

    # ------------------------------------------------------------------------------------------
    # stage 1

    def _grid(self, model: nn.Module, visual: dict[str, Any], pix_key: str, grid_key: str) -> torch.Tensor:
        """The (n, 3) grid of a kind, checked against its pixel rows and the merge size."""
        grid = visual.get(grid_key)
        pixels = visual[pix_key]
        if grid is None:
            raise ValueError(
                f"{pix_key} is given but {grid_key} is not: pass the processor's {grid_key} (n, 3) with it"
            )
        grid = torch.as_tensor(grid)
        if grid.dim() != 2 or grid.shape[1] != 3:
            raise ValueError(f"{grid_key} must be (n, 3) rows of (t, h, w) patches, got {tuple(grid.shape)}")
        vc = model.config.vision_config
        merge = vc.spatial_merge_size
        rows = grid.tolist()
        bad = [r for r in rows if r[1] % merge or r[2] % merge or min(r) < 1]
        if bad:
            raise ValueError(
                f"{grid_key} row {bad[0]}: h and w must be positive multiples of spatial_merge_size = {merge}"
            )
        n_patches = sum(t * h * w for t, h, w in rows)
        width = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
        if pixels.dim() != 2 or pixels.shape[0] != n_patches or pixels.shape[1] != width:
            raise ValueError(
                f"{pix_key} is {tuple(pixels.shape)} but {grid_key} gives {n_patches} patches of "
                f"{width} values (channels x temporal_patch_size x patch_size^2): pass the processor's "
                "flattened patches with their grid"
            )
        return grid

    def _kind_tokens(
        self,
        model: nn.Module,
        visual: dict[str, Any],
        stage1: Any,
        kind: Kind,
        frame_base: int = 0,
    ) -> KindRun:
        """One kind's placeholders (images or videos) as stage 1 sees them; ``frame_base`` offsets their
        frame (view) ids past the other kind's. In-tower stage 1: the tower runs up to the scoring block
        only (the run's head), and the tokens carry no embeddings (``embeds`` None) until the cut is
        known. A tower with DeepStack (Qwen3-VL) gives each level's unit rows too."""
        what, pix_key = kind.what, kind.pix_key
        grid = self._grid(model, visual, pix_key, kind.grid_key).to(visual[pix_key].device)
        score = self.score_kind(model, stage1)
        head = deepstack = None
        if stage1.enabled and stage1.in_tower_block is not None:
            head = tower_head(model, visual[pix_key], grid, stage1.in_tower_block, score == "attn_received")
            run = head.run
            embeds = None
            device, n_units = run.states.device, run.unit_of_row.numel()
        else:
            run = run_tower(
                model, visual[pix_key], grid, what == "video", stage1.enabled and score == "attn_received"
            )
            embeds, deepstack = run.embeds, run.deepstack
            device, n_units = embeds.device, embeds.shape[0]
        merge = model.config.vision_config.spatial_merge_size
        seed_offset = 0 if what == "image" else 1
        if stage1.enabled:
            scores = unit_scores(model, run, grid, score, stage1.seed + seed_offset)
        else:
            scores = torch.zeros(n_units, device=device)
        items, frames, rows, cols = [], [], [], []
        for i, (t, h, w) in enumerate(grid.tolist()):
            gh, gw = h // merge, w // merge
            f = torch.arange(t, device=device).repeat_interleave(gh * gw)
            rc = torch.arange(gh * gw, device=device).repeat(t)
            items.append(torch.full_like(f, i))
            frames.append(f + frame_base)
            rows.append(rc // gw)
            cols.append(rc % gw)
            frame_base += t
        item, frame = torch.cat(items), torch.cat(frames)
        group = frame if stage1.groups == "view" else item
        tokens = VisualTokens(
            token_id=int(getattr(model.config, kind.tok_key)),
            embeds=embeds,
            scores=scores,
            group=group,
            content=torch.ones_like(item, dtype=torch.bool),
            row=torch.full_like(item, -1),
            coords=torch.stack([frame, torch.cat(rows), torch.cat(cols)], dim=-1),
            what=what,
        )
        return KindRun(kind, tokens, scores, head, deepstack)

    def _check_placeholders(self, model: nn.Module, input_ids: torch.Tensor, visual: dict[str, Any]) -> None:
        counts = torch.stack([(input_ids == getattr(model.config, k.tok_key)).sum() for k in KINDS]).tolist()
        for k, n in zip(KINDS, counts):
            if n and visual.get(k.pix_key) is None:
                raise ValueError(
                    f"the prompts hold {n} {k.what} placeholders but no {k.pix_key} is given: pass the "
                    f"{k.what} inputs ({k.pix_key} and its grid) that the processor made with input_ids"
                )

    def _all_kinds(self, model: nn.Module, visual: dict[str, Any], stage1: Any) -> list[KindRun]:
        """The images, then the videos, present in ``visual``, as stage 1 sees them."""
        out = []
        frame_base = 0
        for kind in KINDS:
            if visual.get(kind.pix_key) is None:
                continue
            out.append(self._kind_tokens(model, visual, stage1, kind, frame_base))
            frame_base += int(torch.as_tensor(visual[kind.grid_key])[:, 0].sum())
        return out

    def encode(
        self,
        model: nn.Module,
        input_ids: torch.Tensor,
        visual: dict[str, Any],
        stage1: Any,
        stage1_keep: torch.Tensor | None = None,
    ) -> Visual:
        self._check_placeholders(model, input_ids, visual)
        kinds = self._all_kinds(model, visual, stage1)
        vis = select_visual(input_ids, [k.tokens for k in kinds], stage1, stage1_keep)
        if vis.projected is None:  # in-tower: the kept units' embeddings from the tower's tail
            kept = vis.kept_token  # (sum k1,) kept units, numbered across the kinds, in prompt order
            parts, base = [], 0
            for k in kinds:
                keep = torch.zeros(len(k.tokens), dtype=torch.bool, device=kept.device)
                keep[kept[(kept >= base) & (kept < base + len(k.tokens))] - base] = True
                units, embeds, deepstack = tower_tail(model, k.head, keep)
                parts.append((units + base, [embeds, *(deepstack or [])]))
                base += len(k.tokens)
            units = torch.cat([u for u, _ in parts])
            pick = torch.argsort(units)[torch.searchsorted(torch.sort(units).values, kept)]  # prompt order
            columns = [torch.cat(col)[pick] for col in zip(*(rows for _, rows in parts))]
            vis.projected = columns[0]
            if len(columns) > 1:  # DeepStack: each level's rows of the kept units
                vis.after_layer = dict(enumerate(columns[1:]))
        elif kinds and kinds[0].deepstack is not None:  # DeepStack: each level's rows of the kept units
            levels = zip(*(k.deepstack for k in kinds))  # per level, the kinds' (U_k, D) in kinds order
            vis.after_layer = {i: torch.cat(parts)[vis.kept_token] for i, parts in enumerate(levels)}
        return vis

    def stage1_scores(self, model: nn.Module, visual: dict[str, Any], stage1: Any) -> list[torch.Tensor]:
        """The stage-1 score of every merged unit: one (t, h/merge, w/merge) grid per image, then per video."""
        merge = model.config.vision_config.spatial_merge_size
        out = []
        with torch.no_grad():
            for k in self._all_kinds(model, visual, stage1):
                scores = k.scores
                grid = torch.as_tensor(visual[k.kind.grid_key]).tolist()
                sizes = [t * (h // merge) * (w // merge) for t, h, w in grid]
                for s, (t, h, w) in zip(scores.split(sizes), grid):
                    out.append(s.view(t, h // merge, w // merge))
        return out

    def view_scores(self, model: nn.Module, pixel_values: torch.Tensor, stage1: Any) -> torch.Tensor:
        """(B, U) scores of the merged units of square views (B, 3, S, S), units row-major: each view
        packed as the processor packs an image of that size (:func:`pack_views`)."""
        pixels, grid = pack_views(pixel_values, model.config.vision_config)
        scores = self.stage1_scores(model, {"pixel_values": pixels, "image_grid_thw": grid}, stage1)
        return torch.stack([s.flatten() for s in scores])

    def premise_view(self, model: nn.Module, side: int) -> tuple[int, int]:
        """No fixed input size: the image's own side rounded to whole merged units (at least one), as
        the processor's resize does; a unit is ``patch_size * spatial_merge_size`` pixels."""
        vc = model.config.vision_config
        unit = int(vc.patch_size * vc.spatial_merge_size)
        return max(1, round(side / unit)) * unit, unit

    def check_config(self, model: nn.Module, config: Any) -> None:
        """Family checks, plus ``stage1.in_tower_block``: a block of the tower, and on Qwen2.5-VL a
        full-attention one (its scores and its cut see the whole image, not a window)."""
        super().check_config(model, config)
        block = config.stage1.in_tower_block
        if block is None:
            return
        tower = model.model.visual
        depth = len(tower.blocks)
        if not 0 <= block < depth:
            raise ValueError(
                f"pruning.stage1.in_tower_block = {block} is out of range: the vision tower has {depth} blocks "
                f"(valid: 0..{depth - 1})"
            )
        full = list(getattr(tower, "fullatt_block_indexes", range(depth)))
        if block not in full:
            raise ValueError(
                f"pruning.stage1.in_tower_block = {block} is a window-attention block of "
                f"{type(model).__name__}'s tower: use a full-attention block ({', '.join(map(str, full))})"
            )

    def expand_packed(
        self, model: nn.Module, input_ids: torch.Tensor, packed: dict[str, torch.Tensor], expand_size: int
    ) -> dict[str, torch.Tensor]:
        """Each sample's images (and videos) repeated ``expand_size`` times in a row: their patch rows,
        grid rows and (videos) ``second_per_grid_ts``. A sample's items are read off its placeholder
        count, grid row after grid row (Qwen3-VL writes each video frame as a run of its own)."""
        out = dict(packed)
        merge = model.config.vision_config.spatial_merge_size
        for kind in KINDS:
            what, pix_key, grid_key = kind.what, kind.pix_key, kind.grid_key
            if packed.get(grid_key) is None:
                continue
            per_sample = (input_ids == getattr(model.config, kind.tok_key)).sum(dim=1).cpu()  # (B,)
            grid = packed[grid_key]
            units = grid.prod(dim=-1).cpu() // merge**2  # (n,) placeholders of each item
            ends, bounds = per_sample.cumsum(0), units.cumsum(0)  # where each sample's, each item's end
            whole = set(ends.tolist()) <= {0, *bounds.tolist()}  # every sample ends where an item ends
            if not whole or int(ends[-1]) != int(bounds[-1]):
                raise ValueError(
                    f"the prompts hold {per_sample.tolist()} {what} placeholders per sample, which do not "
                    f"split into whole {what}s of {grid_key} ({units.tolist()} placeholders each): pass the "
                    f"{grid_key} rows of the samples' own inputs, in order"
                )
            sample_of = torch.searchsorted(ends, bounds)  # the sample each item ends in
            items = torch.arange(grid.shape[0]).split(torch.bincount(sample_of, minlength=len(ends)).tolist())
            order = (
                torch.cat([i.repeat(expand_size) for i in items])
                if items
                else torch.zeros(0, dtype=torch.long)
            )
            order = order.to(grid.device)
            out[grid_key] = grid[order]
            if what == "video" and packed.get("second_per_grid_ts") is not None:
                out["second_per_grid_ts"] = torch.as_tensor(packed["second_per_grid_ts"])[order.cpu()]
            if packed.get(pix_key) is not None:
                rows = grid.prod(dim=-1)
                start = rows.cumsum(0) - rows
                idx = [torch.arange(int(start[i]), int(start[i] + rows[i])) for i in order.tolist()]
                out[pix_key] = packed[pix_key][torch.cat(idx).to(packed[pix_key].device)]
        return out

    # ------------------------------------------------------------------------------------------
    # positions

    def position_ids(
        self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, visual: dict[str, Any]
    ) -> torch.Tensor:
        """Stock M-RoPE ids (3, B, T) of the unpruned prompt (padding 0), from ``get_rope_index``."""
        types = visual.get("mm_token_type_ids")
        types = token_type_ids(model, input_ids) if types is None else types.to(input_ids.device)
        kw = {"image_grid_thw": visual.get("image_grid_thw"), "video_grid_thw": visual.get("video_grid_thw")}
        if visual.get("second_per_grid_ts") is not None:
            kw["second_per_grid_ts"] = visual["second_per_grid_ts"]
        pos, _ = model.model.get_rope_index(
            input_ids, mm_token_type_ids=types, attention_mask=attention_mask.long(), **kw
        )
        return pos

    def decode_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """(B, q) -> (3, B, q): decoded text tokens share one id on every axis."""
        return positions[None].expand(3, *positions.shape)

    # ------------------------------------------------------------------------------------------
    # speed runs

    def random_prompt(self, model, batch_size, text_before, text_after, seed, device):
        """``text_before`` random tokens, ``<|vision_start|>``, the merged units of one square image,
        ``<|vision_end|>``, ``text_after`` tokens; pixels as the processor flattens them (one row of
        channels x temporal_patch_size x patch^2 values per patch) with ``image_grid_thw``. The image side
        is the config's ``tpkit_image_size`` (tiny configs set it), else :attr:`default_image_size` (1036:
        37 x 37 = 1369 units at patch 14, merge 2)."""
        cfg = model.config
        vc = cfg.vision_config
        side = int(getattr(cfg, IMAGE_SIZE_ATTR, self.default_image_size))
        merge = vc.spatial_merge_size
        if side % (vc.patch_size * merge):
            raise ValueError(
                f"image side {side} is not a multiple of patch_size x spatial_merge_size = {vc.patch_size * merge}"
            )
        n = side // vc.patch_size
        units = (n // merge) ** 2
        g = torch.Generator().manual_seed(seed)
        start = torch.full((batch_size, 1), cfg.vision_start_token_id, dtype=torch.long)
        end = torch.full((batch_size, 1), cfg.vision_end_token_id, dtype=torch.long)
        image = torch.full((batch_size, units), cfg.image_token_id, dtype=torch.long)
        before = random_text(model, batch_size, text_before, g)
        after = random_text(model, batch_size, text_after, g)
        input_ids = torch.cat([before, start, image, end, after], dim=1)
        width = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
        pixel_values = torch.randn(batch_size * n * n, width, generator=g)
        grid = torch.tensor([[1, n, n]] * batch_size, dtype=torch.long)
        dtype = next(model.parameters()).dtype
        return {
            "input_ids": input_ids.to(device),
            "attention_mask": torch.ones_like(input_ids).to(device),
            "mm_token_type_ids": token_type_ids(model, input_ids).to(device),
            "pixel_values": pixel_values.to(device=device, dtype=dtype),
            "image_grid_thw": grid.to(device),
        }


FAMILIES = (Qwen2VLFamily(),)
