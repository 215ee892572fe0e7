"""Stage 1 inside Qwen's vision tower (``pruning.stage1.in_tower_block``).

Qwen2.5-VL's ViT costs more than its LM's prefill on a large image, and pruning after the tower saves
none of it. With ``in_tower_block: K`` the tower runs as stock up to block K, stage 1 scores the merged
units there (``cosine_mean``: the units' mean states after block K; ``attn_received``: the attention
they receive in block K), cuts, and the blocks after K and the merger run on the kept units only: all
``merge**2`` patches of a kept unit, with their own rotary angles, each full-attention block over the
kept patches of each frame, each window block over the kept patches of each window (a window left
empty drops out). Dropping a unit from a segment is masking it out as a key there, so the kept units
come out as the stock tower would give them with the dropped patches masked out from block K + 1 on;
with every unit kept, the output is stock's, bit for bit.

This module runs the tower with its own modules (patch embedding, rotary embedding, blocks, merger)
in its own loop: the stock forward has no point to stop at.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tpkit.models.qwen2_vl.tower import TowerRun, window_order, window_units

__all__ = ["TowerHead", "patch_positions", "tower_head", "tower_tail", "unit_layout"]


def unit_layout(grid_thw: torch.Tensor, merge: int, win: int | None) -> tuple[torch.Tensor, ...]:
    """(order, frame, window): ``order`` (U,) the unit at each position of the tower's sequence (window
    order; identity without windows); ``frame`` and ``window`` (U,) the global frame and window id of
    each unit, in unit order (``window`` = ``frame`` without windows)."""
    frames, windows = [], []
    frame_base = window_base = 0
    for t, h, w in grid_thw.tolist():
        gh, gw = h // merge, w // merge
        f = torch.arange(t)[:, None, None]
        frames.append((f + frame_base).expand(t, gh, gw).flatten())
        if win is not None:
            nwh, nww = -(-gh // win), -(-gw // win)
            r = torch.arange(gh)[None, :, None]
            c = torch.arange(gw)[None, None, :]
            windows.append(((f * nwh + r // win) * nww + c // win + window_base).flatten())
            window_base += t * nwh * nww
        frame_base += t
    device = grid_thw.device
    frame = torch.cat(frames).to(device)
    if win is None:
        return torch.arange(frame.numel(), device=device), frame, frame
    order = window_order(grid_thw, merge, win)[0]
    return order, frame, torch.cat(windows).to(device)


def patch_positions(grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
    """(P, 2) (row, col) of every patch in the processor's block-major order (merge x merge blocks
    row-major, patches row-major within a block), frame after frame: the tower's rotary positions."""
    out = []
    for t, h, w in grid_thw.tolist():
        r = torch.arange(h)[:, None].expand(h, w)
        c = torch.arange(w)[None, :].expand(h, w)
        block = (h // merge, merge, w // merge, merge)
        rc = torch.stack(
            [r.reshape(block).transpose(1, 2).flatten(), c.reshape(block).transpose(1, 2).flatten()], -1
        )
        out.append(rc.repeat(t, 1))
    return torch.cat(out).to(grid_thw.device)


def _cu(segment_of_row: torch.Tensor, n_segments: int, unit: int) -> torch.Tensor:
    """Cumulative patch counts of the non-empty segments (int32, leading 0), as the tower's blocks take
    them; ``segment_of_row`` (K,) holds each kept window position's segment id (non-decreasing)."""
    counts = torch.bincount(segment_of_row, minlength=n_segments)
    counts = counts[counts > 0] * unit
    return F.pad(counts.cumsum(0, dtype=torch.int32), (1, 0))


def _max_len(tower: nn.Module, cu: torch.Tensor) -> int | None:
    """The longest segment, for flash attention kernels (None otherwise, as stock passes it)."""
    if "flash" not in str(getattr(tower.config, "_attn_implementation", "")):
        return None
    return int((cu[1:] - cu[:-1]).max())


@dataclass
class TowerHead:
    """The tower run up to and including block ``upto``, and what its later blocks need."""

    run: TowerRun  # states = block ``upto``'s output (window order); its inputs when asked for
    hidden: torch.Tensor  # (P, D_vis) that output
    rotary: tuple[torch.Tensor, torch.Tensor]  # (P, d) cos, sin in the tower's order
    frame_of_row: torch.Tensor  # (U,) global frame id of each window position
    window_of_row: torch.Tensor  # (U,) global window id of each window position (frame id: no windows)
    upto: int


def _full(tower: nn.Module, i: int) -> bool:
    return window_units(tower) is None or i in tower.fullatt_block_indexes


def _run_blocks(tower, hidden, rotary, start, stop, cu_full, cu_win, record=None):
    inputs = None
    for i in range(start, stop):
        cu = cu_full if _full(tower, i) else cu_win
        if i == record:
            inputs = {"hidden": hidden, "cu_seqlens": cu, "rotary": rotary}
        hidden = tower.blocks[i](
            hidden, cu_seqlens=cu, max_seqlen=_max_len(tower, cu), position_embeddings=rotary
        )
    return hidden, inputs


def tower_head(
    model: nn.Module, pixels: torch.Tensor, grid_thw: torch.Tensor, upto: int, block_inputs: bool
) -> TowerHead:
    """Patch embedding, the window permutation and blocks ``0..upto`` of the tower, as stock runs them;
    ``block_inputs``: keep block ``upto``'s inputs (``attn_received`` scores its attention)."""
    tower = model.model.visual
    merge = tower.spatial_merge_size
    unit = merge**2
    order, frame, window = unit_layout(grid_thw, merge, window_units(tower))
    hidden = tower.patch_embed(pixels.type(tower.dtype))
    p = hidden.shape[0]
    rotary = tower.rotary_pos_emb(hidden, patch_positions(grid_thw, merge))
    if window_units(tower) is not None:  # units into window order, their patches together
        hidden = hidden.reshape(p // unit, unit, -1)[order].reshape(p, -1)
        rotary = tuple(x.reshape(p // unit, unit, -1)[order].reshape(p, -1) for x in rotary)
    frame_of_row, window_of_row = frame[order], window[order]
    n_frames, n_windows = int(frame.max()) + 1, int(window.max()) + 1
    cu_full = _cu(frame_of_row, n_frames, unit)
    cu_win = _cu(window_of_row, n_windows, unit)
    hidden, inputs = _run_blocks(
        tower, hidden, rotary, 0, upto + 1, cu_full, cu_win, record=upto if block_inputs else None
    )
    run = TowerRun(None, hidden, order, tower.blocks[upto], inputs)
    return TowerHead(run, hidden, rotary, frame_of_row, window_of_row, upto)


def tower_tail(model: nn.Module, head: TowerHead, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The blocks after ``head.upto`` and the merger on the kept units only. ``keep`` (U,) bool in unit
    order. Returns (units (K,) their ids, embeds (K, D_lm)), in the tower's order."""
    tower = model.model.visual
    unit = tower.spatial_merge_size**2
    keep_row = keep[head.run.unit_of_row]  # (U,) kept window positions
    rows = keep_row.repeat_interleave(unit)  # (P,) their patches
    hidden = head.hidden[rows]
    rotary = tuple(x[rows] for x in head.rotary)
    n_frames = int(head.frame_of_row.max()) + 1
    n_windows = int(head.window_of_row.max()) + 1
    cu_full = _cu(head.frame_of_row[keep_row], n_frames, unit)
    cu_win = _cu(head.window_of_row[keep_row], n_windows, unit)
    hidden, _ = _run_blocks(tower, hidden, rotary, head.upto + 1, len(tower.blocks), cu_full, cu_win)
    return head.run.unit_of_row[keep_row], tower.merger(hidden)
