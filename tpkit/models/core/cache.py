"""The KV cache of a pruned prefill: two layer groups that hold different lengths.

Layers before stage 2's layer K cache the stage-1 sequence (T1 keys per sample), layers from K on
the stage-2 sequence (T2 <= T1 keys). Both are left-padded by construction (compaction right-aligns
the kept tokens), so each group's key mask at any later step is ``key index >= that row's padding``:
built with one ``arange`` per step, never concatenated. Decoding positions continue from each row's
last prompt position (``next_position``), which under ``stage1.positions: original`` is what stock
``generate`` computes from the attention mask.

Each layer is masked as its rule says (:mod:`tpkit.models.core.layers`), one mask per distinct kind
per group. The cache layers are those the language model's config asks for, except that a sliding
layer keeps every key (a ``DynamicLayer``, not the stock ``DynamicSlidingWindowLayer``) and is masked
by its window: a key's position is its prompt position (recorded at the prefill) or, for a decoded
token, the first decoding position plus its offset, so the window needs no concatenation either.
A recurrent layer (linear attention) keeps the config's own state layer.

It is a ``DynamicCache`` for everything transformers' ``generate`` does with a cache; beam search
reorders the padding and positions with the keys and values. With ``static_extra``, the prefill's
keys and values move into preallocated buffers with that many free slots per layer, filled at a
device-side length: every decoding step then has the same shapes and no host sync, which is what
graph capture (``torch.compile(mode="reduce-overhead")``) needs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from tpkit.models.core.layers import RECURRENT, LayerRule, mask_plan
from tpkit.models.core.masks import FLASH

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
        # a sliding layer keeps every key: its window is a mask in positions (module docstring)
        self.layers = [DynamicLayer() if isinstance(x, DynamicSlidingWindowLayer) else x for x in self.layers]
        self.static_extra = static_extra  # free slots per layer after the prefill (None: grow as needed)
        self.split: int | None = None  # layers < split hold group a (T1 keys), the rest group b
        self.pads: torch.Tensor | None = None  # (2, B) long: left padding of groups a and b
        self.padded: tuple[bool, bool] = (False, False)  # known on the host: may a row be padded?
        self.next_position: torch.Tensor | None = None  # (B,) long: position id of the next token
        self.rules: tuple[LayerRule, ...] = ()  # each layer's rule (empty: every layer plain causal)
        self.key_pos: tuple[torch.Tensor, ...] | None = None  # (B, T1), (B, T2) prompt key positions
        self.first_decoded: torch.Tensor | None = None  # (B,) long: position of the first decoded token
        self.prompt_len: tuple[int, int] = (0, 0)  # prompt keys of groups a and b (host)
        self.span0 = 0  # host bound on how far apart the prompt's positions lie

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
        rules: Sequence[LayerRule] = (),
        positions: tuple[torch.Tensor, torch.Tensor] | None = None,
        span: int = 0,
    ) -> None:
        """Record the prefill's layout: key-valid masks (B, T1), (B, T2) (left-padded), the next position
        (B,) and, from the host, whether either group has padding at all; each layer's rule and, for
        sliding windows, the groups' key positions (B, T1), (B, T2) and a host bound ``span`` on how
        far apart the prompt's positions lie."""
        self.split = split
        self.pads = torch.stack([(~valid_a).sum(dim=1), (~valid_b).sum(dim=1)])  # (2, B)
        self.padded = padded
        self.next_position = next_position
        self.rules = tuple(rules)
        self.prompt_len = (valid_a.shape[1], valid_b.shape[1])
        self.span0 = span
        if positions is not None and any(r.window is not None for r in self.rules):
            self.key_pos = tuple(positions)
            self.first_decoded = next_position.clone()
        if self.static_extra is not None:
            self.layers = [
                layer
                if getattr(layer, "keys", None) is None  # a recurrent layer's state has no slots
                else _StaticLayer(layer.keys, layer.values, self.static_extra)
                for layer in self.layers
            ]
            torch._dynamo.mark_static_address(self.next_position)

    def _groups(self) -> list[tuple[int, int, int]]:
        """(group, first layer, end layer) of the non-empty layer groups."""
        n = len(self.rules) or len(self.layers)
        split = min(self.split, n)
        return [(g, a, z) for g, (a, z) in enumerate(((0, split), (split, n))) if z > a]

    def _key_layer(self, start: int, stop: int) -> int:
        """The first layer of a group that caches keys (a recurrent layer keeps a state)."""
        for i in range(start, stop):
            if not self.rules or self.rules[i].kind != RECURRENT:
                return i
        return start

    def _key_positions(self, group: int, length: int) -> torch.Tensor:
        """(B, length): the position of each key slot of a group; prompt slots hold their recorded
        positions, the slots after them the decoded tokens' (first decoding position + offset)."""
        prompt = self.key_pos[group]  # (B, T_g)
        t = prompt.shape[1]
        slots = torch.arange(length, device=prompt.device)
        decoded = self.first_decoded[:, None] + (slots - t)[None, :]
        if length > t:
            prompt = torch.cat([prompt, prompt.new_zeros(prompt.shape[0], length - t)], dim=1)
        return torch.where(slots[None, :] < t, prompt[:, :length], decoded)

    def layer_masks(self, q_len: int, impl: str, dtype: torch.dtype) -> list[torch.Tensor | None]:
        """The attention mask of every layer for ``q_len`` new tokens (not in the cache yet), one per
        distinct kind per group (:func:`tpkit.models.core.layers.mask_plan`)."""
        out: list[torch.Tensor | None] = []
        for group, start, stop in self._groups():
            rules = self.rules[start:stop] or (LayerRule(),) * (stop - start)
            layer = self._key_layer(start, stop)
            if self.static_extra is not None:
                built: dict = {}
                for rule in rules:
                    key = (rule.kind, rule.window)
                    if key not in built:
                        built[key] = (
                            None
                            if rule.kind == RECURRENT
                            else self._static_mask(group, layer, q_len, impl, dtype, rule.window)
                        )
                    out.append(built[key])
                continue
            keys = self.get_seq_length(layer) + q_len
            valid = (
                torch.arange(keys, device=self.pads.device)[None, :] >= self.pads[group][:, None]
            )  # (B, L)
            out += mask_plan(
                rules,
                valid,
                q_len,
                impl,
                dtype,
                no_padding=not self.padded[group],
                positions=lambda g=group, n=keys: self._key_positions(g, n),
                span=self.span0 + keys - self.prompt_len[group],  # each decoded token widens it by one
            )
        return out

    def _static_mask(
        self, group: int, layer: int, q_len: int, impl: str, dtype: torch.dtype, window: int | None = None
    ) -> torch.Tensor:
        """The mask over a group's whole buffer: padding, unfilled slots and (q_len > 1) later queries
        masked, from device-side lengths; with ``window``, the keys outside the queries' window too."""
        buf = self.layers[layer]
        slots = torch.arange(buf.keys.shape[2], device=buf.keys.device)  # (L,)
        query = buf.length + torch.arange(q_len, device=slots.device)  # (q,) slots of the new tokens
        allowed = (slots[None, None, :] >= self.pads[group][:, None, None]) & (
            slots[None, None, :] <= query[None, :, None]
        )  # (B, q, L)
        if window is not None:
            qpos = self.next_position[:, None] + torch.arange(q_len, device=slots.device)[None, :]  # (B, q)
            kpos = self._key_positions(group, slots.shape[0])  # (B, L)
            allowed = allowed & (kpos[:, None, :] > qpos[:, :, None] - window)
        if impl in FLASH:
            if window is not None:
                raise ValueError(
                    f"attn_implementation {impl!r} takes a 2D key mask only: it cannot apply a sliding window "
                    "in original positions; use 'sdpa' or 'eager'"
                )
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
            if self.key_pos is not None:
                self.key_pos = tuple(p.index_select(0, index.to(p.device)) for p in self.key_pos)
                self.first_decoded = self.first_decoded.index_select(0, index.to(self.first_decoded.device))

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
            if self.key_pos is not None:
                self.key_pos = tuple(p.repeat_interleave(repeats, dim=0) for p in self.key_pos)
                self.first_decoded = self.first_decoded.repeat_interleave(repeats, dim=0)

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError(
            "a pruned cache cannot be cropped (assisted or speculative decoding): generate inside "
            "`with pruning_disabled(model):`"
        )
