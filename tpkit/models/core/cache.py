"""The KV cache of a pruned prefill: two layer groups that hold different lengths.

Layers before stage 2's layer K cache the stage-1 sequence (T1 keys per sample), layers from K on
the stage-2 sequence (T2 <= T1 keys). Both are left-padded by construction (compaction right-aligns
the kept tokens), so each group's key mask at any later step is ``key index >= that row's padding``:
built with one ``arange`` per step, never concatenated. Decoding positions continue from each row's
last prompt position (``next_position``), which under ``stage1.positions: original`` is what stock
``generate`` computes from the attention mask.

It is a ``DynamicCache`` for everything transformers' ``generate`` does with a cache; beam search
reorders the padding and positions with the keys and values. With ``static_extra``, the prefill's
keys and values move into preallocated buffers with that many free slots per layer, filled at a
device-side length: every decoding step then has the same shapes and no host sync, which is what
graph capture (``torch.compile(mode="reduce-overhead")``) needs.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from tpkit.models.core.masks import FLASH, attn_mask

__all__ = ["PrunedCache"]


class _StaticLayer(DynamicLayer):
    """One layer's keys and values in a preallocated buffer (B, H, T + extra, D) whose first ``length``
    slots are filled; ``length`` lives on the device, so updates need no host sync."""

    is_compileable = True

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, extra: int) -> None:
        super().__init__()
        b, h, t, _ = keys.shape
        self.device = keys.device
        self.keys = keys.new_zeros(b, h, t + extra, keys.shape[-1])
        self.values = values.new_zeros(b, h, t + extra, values.shape[-1])
        self.keys[:, :, :t] = keys
        self.values[:, :, :t] = values
        self.length = torch.tensor(t, device=keys.device)  # filled slots
        self.is_initialized = True
        for buf in (self.keys, self.values, self.length):  # fixed addresses: CUDA graphs replay on them
            torch._dynamo.mark_static_address(buf)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        idx = self.length + torch.arange(key_states.shape[-2], device=self.device)
        self.keys.index_copy_(2, idx, key_states)
        self.values.index_copy_(2, idx, value_states)
        self.length.add_(key_states.shape[-2])
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.keys.shape[-2]  # the buffer; the filled part is ``length`` (on the device)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.keys.shape[-2], 0

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError("a static pruned cache cannot be cropped")


class PrunedCache(DynamicCache):
    """``DynamicCache`` + the layout of a pruned prefill (see the module docstring)."""

    def __init__(self, *args, static_extra: int | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.static_extra = static_extra  # free slots per layer after the prefill (None: grow as needed)
        self.split: int | None = None  # layers < split hold group a (T1 keys), the rest group b
        self.pads: torch.Tensor | None = None  # (2, B) long: left padding of groups a and b
        self.padded: tuple[bool, bool] = (False, False)  # known on the host: may a row be padded?
        self.next_position: torch.Tensor | None = None  # (B,) long: position id of the next token

    @property
    def prefilled(self) -> bool:
        return self.split is not None

    def start(
        self,
        split: int,
        valid_a: torch.Tensor,
        valid_b: torch.Tensor,
        next_position: torch.Tensor,
        padded: tuple[bool, bool],
    ) -> None:
        """Record the prefill's layout: key-valid masks (B, T1), (B, T2) (left-padded), the next position
        (B,) and, from the host, whether either group has padding at all."""
        self.split = split
        self.pads = torch.stack([(~valid_a).sum(dim=1), (~valid_b).sum(dim=1)])  # (2, B)
        self.padded = padded
        self.next_position = next_position
        if self.static_extra is not None:
            self.layers = [_StaticLayer(layer.keys, layer.values, self.static_extra) for layer in self.layers]
            torch._dynamo.mark_static_address(self.next_position)

    def masks(
        self, q_len: int, impl: str, dtype: torch.dtype
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Attention masks of groups a and b for ``q_len`` new tokens (not in the cache yet)."""
        if self.static_extra is not None:
            return self._static_mask(0, q_len, impl, dtype), self._static_mask(1, q_len, impl, dtype)
        out = []
        for group, layer in ((0, 0), (1, self.split)):
            keys = self.get_seq_length(layer) + q_len
            if not self.padded[group] and q_len == 1:
                out.append(None)  # one query, every key valid: no mask, as stock decoding
                continue
            valid = (
                torch.arange(keys, device=self.pads.device)[None, :] >= self.pads[group][:, None]
            )  # (B, L)
            out.append(attn_mask(valid, q_len, impl, dtype, no_padding=not self.padded[group]))
        return out[0], out[1]

    def _static_mask(self, group: int, q_len: int, impl: str, dtype: torch.dtype) -> torch.Tensor:
        """The mask over a group's whole buffer: padding, unfilled slots and (q_len > 1) later queries
        masked, from device-side lengths."""
        layer = self.layers[0 if group == 0 else min(self.split, len(self.layers) - 1)]
        slots = torch.arange(layer.keys.shape[2], device=layer.keys.device)  # (L,)
        query = layer.length + torch.arange(q_len, device=slots.device)  # (q,) slots of the new tokens
        allowed = (slots[None, None, :] >= self.pads[group][:, None, None]) & (
            slots[None, None, :] <= query[None, :, None]
        )  # (B, q, L)
        if impl in FLASH:
            return allowed[:, -1].to(torch.int32)
        allowed = allowed[:, None]  # (B, 1, q, L)
        if impl == "sdpa":
            return allowed
        return torch.zeros(allowed.shape, dtype=dtype, device=slots.device).masked_fill(
            ~allowed, torch.finfo(dtype).min
        )

    def advance(self, n: int) -> None:
        self.next_position.add_(n)  # in place: a captured graph keeps reading the same buffer

    def _select(self, index: torch.Tensor) -> None:
        if self.prefilled:
            self.pads = self.pads.index_select(1, index.to(self.pads.device))
            self.next_position = self.next_position.index_select(0, index.to(self.next_position.device))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._select(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._select(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.prefilled:
            self.pads = self.pads.repeat_interleave(repeats, dim=1)
            self.next_position = self.next_position.repeat_interleave(repeats, dim=0)

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError(
            "a pruned cache cannot be cropped (assisted or speculative decoding): generate inside "
            "`with pruning_disabled(model):`"
        )
