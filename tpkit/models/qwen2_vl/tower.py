"""Qwen2-VL / Qwen2.5-VL's vision tower as stage 1 sees it: one stock run, the merged units it yields,
and a score per unit.

The tower takes the patches of every image (or video) of a batch packed into one sequence, in the
processor's block-major order (each run of ``merge**2`` consecutive patches is one merged unit), and
its merger turns each unit's patches into one LM token. Qwen2.5-VL permutes the units into window
order before its blocks (so that each attention window is contiguous) and back after the merger;
:func:`window_order` rebuilds that permutation so the scores read in unit order.

Scores, one per merged unit (the unit's ``merge**2`` patches averaged):

* ``cosine_mean``: cosine between the unit's mean merger-input state (the last block's output) and
  the mean of those over its image (or video); ``mean_distance``: 1 - that (the default);
* ``attn_received``: the attention the unit's patches receive in the tower's last block, from the
  block's own q/k with the tower's rotary embedding, within the block's attention segments;
* ``random``: seeded uniform.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tpkit.models.core.sharded import gathered
from tpkit.pruning.stage1 import attention_received, patch_scores

__all__ = [
    "TowerRun",
    "attn_received_rows",
    "pack_views",
    "run_tower",
    "to_units",
    "unit_of_row",
    "unit_scores",
    "vision_rotate",
    "window_order",
    "window_units",
]


def window_units(tower: nn.Module) -> int | None:
    """Side of Qwen2.5-VL's attention window in merged units; None for a tower without windows."""
    window = getattr(tower, "window_size", None)
    if window is None:
        return None
    return max(1, window // tower.spatial_merge_size // tower.patch_size)


def window_order(grid_thw: torch.Tensor, merge: int, win: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2.5-VL's window order of the merged units of a packed batch.

    grid_thw (n, 3) in patches. Each frame's unit grid (h/merge x w/merge) is cut into ``win`` x ``win``
    windows (the last row and column of windows may be smaller), windows row-major, units row-major
    within a window. Returns ``(order (U,), window_lengths (W,))``: ``order[j]`` is the unit (in the
    packed unit order) at window position ``j``; ``window_lengths`` counts units per window.
    """
    orders, lengths = [], []
    base = 0
    for t, h, w in grid_thw.tolist():
        gh, gw = h // merge, w // merge
        nwh, nww = -(-gh // win), -(-gw // win)
        f = torch.arange(t)[:, None, None]
        r = torch.arange(gh)[None, :, None]
        c = torch.arange(gw)[None, None, :]
        window = (f * nwh + r // win) * nww + c // win  # (t, gh, gw) window id
        key = window * win * win + (r % win) * win + c % win
        orders.append(torch.argsort(key.flatten()) + base)
        counts = torch.bincount(window.flatten(), minlength=t * nwh * nww)
        lengths.append(counts[counts > 0])
        base += t * gh * gw
    device = grid_thw.device
    return torch.cat(orders).to(device), torch.cat(lengths).to(device)


def vision_rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The tower's rotary embedding: x (N, H, d), cos/sin (N, d), in fp32 as the tower computes it."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rot = torch.cat((-x2, x1), dim=-1)
    return (xf * cos[:, None].float() + rot * sin[:, None].float()).to(x.dtype)


@dataclass
class TowerRun:
    """What a run of the tower over a packed batch gives stage 1: the states it scores and, after the
    whole tower, the unit embeddings."""

    embeds: torch.Tensor | None  # (U, D_lm) merged-unit embeddings, unit order (what stock scatters)
    states: torch.Tensor  # (P, D_vis) the scored block's output (merger input), the tower's (window) order
    unit_of_row: torch.Tensor  # (U,) the unit at each group of merge**2 rows of ``states`` (window order)
    block: nn.Module  # the scored block (attn_received reads its attention)
    block_inputs: dict[str, Any] | None  # that block's input, cu_seqlens and rotary (attn_received)
    # Qwen3-VL's DeepStack: per level, (U, D_lm) the unit embeddings of its merger, unit order; None
    # for a tower without (Qwen2-VL, Qwen2.5-VL, Qwen3.5)
    deepstack: list[torch.Tensor] | None = None


@contextlib.contextmanager
def _last_block_inputs(tower: nn.Module) -> Iterator[dict[str, Any]]:
    """Records the last block's input, cu_seqlens and rotary (``attn_received`` scores its attention)."""
    seen: dict[str, Any] = {}

    def block_in(module, args, kwargs):
        seen["block"] = {
            "hidden": args[0] if args else kwargs["hidden_states"],
            "cu_seqlens": kwargs["cu_seqlens"],
            "rotary": kwargs["position_embeddings"],
        }

    handle = tower.blocks[-1].register_forward_pre_hook(block_in, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


def unit_of_row(tower: nn.Module, grid_thw: torch.Tensor) -> torch.Tensor:
    """(U,) the merged unit at each window position of the tower's sequence (identity without windows)."""
    win = window_units(tower)
    if win is None:
        n = int((grid_thw.prod(dim=-1) // tower.spatial_merge_size**2).sum())
        return torch.arange(n, device=grid_thw.device)
    return window_order(grid_thw, tower.spatial_merge_size, win)[0]


def run_tower(
    model: nn.Module, pixels: torch.Tensor, grid_thw: torch.Tensor, video: bool, last_block: bool
) -> TowerRun:
    """The stock ``get_image_features`` / ``get_video_features`` call (one tower run): its merger's input
    is the output's ``last_hidden_state``; ``last_block``: the last block's inputs recorded on the way
    (a call served from a run shared with the teacher, ``reuse_tower_output``, runs the stock tower
    once more for them)."""
    tower = model.model.visual
    get = model.model.get_video_features if video else model.model.get_image_features
    with _last_block_inputs(tower) if last_block else contextlib.nullcontext({}) as seen:
        out = get(pixels, grid_thw, return_dict=True)
        if last_block and "block" not in seen:
            type(tower).forward(tower, pixels.type(tower.dtype), grid_thw=grid_thw)
    embeds = _flat(out.pooler_output)
    levels = getattr(out, "deepstack_features", None)  # Qwen3-VL: one per DeepStack level
    deepstack = [_flat(x) for x in levels] if levels else None
    return TowerRun(
        embeds,
        out.last_hidden_state,
        unit_of_row(tower, grid_thw),
        tower.blocks[-1],
        seen.get("block"),
        deepstack,
    )


def _flat(x: torch.Tensor | list | tuple) -> torch.Tensor:
    """Unit rows (U, D) of a tower output given whole or split per image (transformers 5.2x splits the
    pooled output and the DeepStack features per image, 5.17 the pooled output only)."""
    return torch.cat(list(x), dim=0) if isinstance(x, (list, tuple)) else x


def pack_views(pixel_values: torch.Tensor, tower_config: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Square images (B, C, S, S), already normalised, as the processor hands them to the tower: each
    image a frame repeated ``temporal_patch_size`` times, cut into patches, in block-major order (each
    run of ``merge**2`` rows one merged unit, units row-major). Returns ``(pixels (B*h*w, C*t*p*p),
    grid_thw (B, 3))`` with ``h = w = S / patch_size``."""
    b, c, side, width = pixel_values.shape
    p, t, m = tower_config.patch_size, tower_config.temporal_patch_size, tower_config.spatial_merge_size
    if side != width or side % (p * m):
        raise ValueError(
            f"views are {side}x{width}: they must be square with a side that is a multiple of "
            f"patch_size x spatial_merge_size = {p * m}"
        )
    g = side // p
    x = pixel_values[:, None].expand(b, t, c, side, side)
    x = x.reshape(b, t, c, g // m, m, p, g // m, m, p)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # (B, h/m, w/m, m, m, C, t, p, p)
    grid = torch.tensor([[1, g, g]] * b, device=pixel_values.device)
    return x.reshape(b * g * g, c * t * p * p), grid


def to_units(per_row: torch.Tensor, run: TowerRun, unit: int) -> torch.Tensor:
    """(P, ...) per patch row in the tower's order -> (U, ...) per merged unit (mean of its patches),
    in unit order."""
    grouped = per_row.reshape(-1, unit, *per_row.shape[1:]).float().mean(dim=1)  # window order
    out = torch.empty_like(grouped)
    out[run.unit_of_row] = grouped
    return out


def attn_received_rows(block: nn.Module, inputs: dict[str, Any], chunk: int = 512) -> torch.Tensor:
    """(P,) attention each patch row receives in ``block`` (all its queries, heads averaged), within the
    block's attention segments (``cu_seqlens``: an image or frame, or a window)."""
    attn = block.attn
    x = block.norm1(inputs["hidden"])
    n = x.shape[0]
    heads = attn.num_heads
    q, k, _ = attn.qkv(x).reshape(n, 3, heads, -1).unbind(1)  # (P, H, d) each
    cos, sin = inputs["rotary"]
    q, k = vision_rotate(q, cos, sin), vision_rotate(k, cos, sin)
    scale = getattr(attn, "scaling", q.shape[-1] ** -0.5)
    cu = inputs["cu_seqlens"].tolist()
    out = []
    for a, b in zip(cu[:-1], cu[1:]):
        if b > a:
            qs = q[a:b].transpose(0, 1)[None]  # (1, H, n, d)
            ks = k[a:b].transpose(0, 1)[None]
            out.append(attention_received(qs, ks, scale, chunk=chunk)[0])
    return torch.cat(out)


def unit_scores(
    model: nn.Module, run: TowerRun, grid_thw: torch.Tensor, kind: str, seed: int
) -> torch.Tensor:
    """(U,) stage-1 score of every merged unit, in unit order (see the module docstring)."""
    tower = model.model.visual
    unit = tower.spatial_merge_size**2
    sizes = (grid_thw.prod(dim=-1) // unit).tolist()  # units per image / video
    feats = to_units(run.states, run, unit)  # (U, D)
    padded = torch.nn.utils.rnn.pad_sequence(list(feats.split(sizes)), batch_first=True)  # (items, U_max, D)
    valid = torch.nn.utils.rnn.pad_sequence(
        [torch.ones(s, dtype=torch.bool, device=feats.device) for s in sizes], batch_first=True
    )

    def attention(_: str) -> torch.Tensor:  # attn_received, the only attention score of a CLS-less tower
        if run.block_inputs is None:
            raise ValueError("attn_received needs the scored block's inputs (run_tower(last_block=True))")
        with gathered(run.block):  # the block ran already: a sharded one is whole again for its q/k
            rows = attn_received_rows(run.block, run.block_inputs)
        out = torch.full(valid.shape, float("nan"), device=rows.device)
        return out.masked_scatter(valid, to_units(rows[:, None], run, unit)[:, 0])

    return patch_scores(kind, padded, cls=False, attention=attention, valid=valid, seed=seed)[valid]
