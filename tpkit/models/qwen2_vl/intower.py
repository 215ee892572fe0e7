"""Stage 1 inside Qwen's vision tower (``pruning.stage1.in_tower_block``).

Qwen2.5-VL's ViT costs more than its LM's prefill on a large image, and pruning after the tower saves
none of it. With ``in_tower_block: K`` the tower runs as stock up to block K, stage 1 scores the merged
units there (``mean_distance``, ``cosine_mean``: the units' mean states after block K;
``attn_received``: the attention they receive in block K), cuts, and the blocks after K and the merger
run on the kept units only: all ``merge**2`` patches of a kept unit, with their own rotary angles, each
full-attention block over the kept patches of each frame, each window block over the kept patches of
each window (a window left empty drops out). Dropping a unit from a segment is masking it out as a
key there, so the kept units come out as the stock tower would give them with the dropped patches
masked out from block K + 1 on; with every unit kept, the output is stock's, bit for bit. A tower with
DeepStack (Qwen3-VL) gives each level's merger rows too: of every unit from a block up to K (the kept
ones' taken), of the kept units alone from a block after K.

The stock forward has no point to stop at: tpkit takes what it hands its first block (the patch
embedding, Qwen3-VL's resampled position embedding, Qwen2.5-VL's window order, the rotary angles)
from the stock forward itself, stopped there by a hook, and runs the blocks, the DeepStack mergers and
the merger in its own loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tpkit.models.qwen2_vl.tower import TowerRun, window_order, window_units

__all__ = ["TowerHead", "first_block_input", "tower_head", "tower_tail", "unit_layout"]


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


class _Stop(Exception):
    """Ends a stock tower forward once its first block's input is known (:func:`first_block_input`)."""


def first_block_input(
    tower: nn.Module, pixels: torch.Tensor, grid_thw: torch.Tensor
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """(hidden (P, D_vis), (cos, sin) (P, d)): what the stock tower hands its first block for
    ``pixels``, in the tower's order (window order on Qwen2.5-VL), read off the stock forward, which a
    hook on block 0 ends there. The class's forward is called, not the instance's (a training step may
    wrap that one to share whole tower runs)."""
    seen = {}

    def grab(module, args, kwargs):
        seen["hidden"] = args[0] if args else kwargs["hidden_states"]
        seen["rotary"] = kwargs["position_embeddings"]
        raise _Stop

    handle = tower.blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        type(tower).forward(tower, pixels.type(tower.dtype), grid_thw=grid_thw)
    except _Stop:
        pass
    finally:
        handle.remove()
    return seen["hidden"], tuple(seen["rotary"])


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
    # DeepStack levels whose block is upto or before: level -> (U, D_lm) rows of every unit, tower order
    deepstack: dict[int, torch.Tensor]


def _full(tower: nn.Module, i: int) -> bool:
    return window_units(tower) is None or i in tower.fullatt_block_indexes


def _deepstack_levels(tower: nn.Module) -> dict[int, int]:
    """Block index -> DeepStack level (Qwen3-VL's ``deepstack_visual_indexes``; none on other towers)."""
    return {int(b): level for level, b in enumerate(getattr(tower, "deepstack_visual_indexes", None) or ())}


def _run_blocks(tower, hidden, rotary, start, stop, cu_full, cu_win, record=None):
    """Blocks ``start..stop-1`` over ``hidden``; returns it, block ``record``'s inputs (or None) and
    {DeepStack level: its merger's rows} of the blocks run here that feed one."""
    inputs, deepstack = None, {}
    levels = _deepstack_levels(tower)
    for i in range(start, stop):
        cu = cu_full if _full(tower, i) else cu_win
        if i == record:
            inputs = {"hidden": hidden, "cu_seqlens": cu, "rotary": rotary}
        hidden = tower.blocks[i](
            hidden, cu_seqlens=cu, max_seqlen=_max_len(tower, cu), position_embeddings=rotary
        )
        if i in levels:
            deepstack[levels[i]] = tower.deepstack_merger_list[levels[i]](hidden)
    return hidden, inputs, deepstack


def tower_head(
    model: nn.Module, pixels: torch.Tensor, grid_thw: torch.Tensor, upto: int, block_inputs: bool
) -> TowerHead:
    """Blocks ``0..upto`` of the tower on what stock hands its first block (:func:`first_block_input`), as
    stock runs them; ``block_inputs``: keep block ``upto``'s inputs (``attn_received`` scores its
    attention)."""
    tower = model.model.visual
    merge = tower.spatial_merge_size
    unit = merge**2
    order, frame, window = unit_layout(grid_thw, merge, window_units(tower))
    hidden, rotary = first_block_input(tower, pixels, grid_thw)
    frame_of_row, window_of_row = frame[order], window[order]
    n_frames, n_windows = int(frame.max()) + 1, int(window.max()) + 1
    cu_full = _cu(frame_of_row, n_frames, unit)
    cu_win = _cu(window_of_row, n_windows, unit)
    hidden, inputs, deepstack = _run_blocks(
        tower, hidden, rotary, 0, upto + 1, cu_full, cu_win, record=upto if block_inputs else None
    )
    run = TowerRun(None, hidden, order, tower.blocks[upto], inputs)
    return TowerHead(run, hidden, rotary, frame_of_row, window_of_row, upto, deepstack)


def tower_tail(
    model: nn.Module, head: TowerHead, keep: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor] | None]:
    """The blocks after ``head.upto`` and the merger on the kept units only. ``keep`` (U,) bool in unit
    order. Returns (units (K,) their ids, embeds (K, D_lm), and with DeepStack each level's rows
    (K, D_lm), else None), in the tower's order."""
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
    hidden, _, later = _run_blocks(tower, hidden, rotary, head.upto + 1, len(tower.blocks), cu_full, cu_win)
    levels = {**{level: every[keep_row] for level, every in head.deepstack.items()}, **later}
    deepstack = [levels[level] for level in sorted(levels)] if levels else None
    return head.run.unit_of_row[keep_row], tower.merger(hidden), deepstack
