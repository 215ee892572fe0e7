"""The per-layer seam: how the shared layer loop calls each decoder layer.

transformers describes a decoder whose layers differ in its text config: ``layer_types`` (one of
``"full_attention"``, ``"sliding_attention"``, ``"linear_attention"``, ...) and ``sliding_window``.
The stock model builds one mask per layer type (``masking_utils``), one rotary table per type where
its rotary embedding takes the type (Gemma 3's local and global RoPE), and one cache layer per type
(``cache_utils``). tpkit reads the same description into one :class:`LayerRule` per layer
(:func:`rules_from_config`, what :meth:`tpkit.models.core.family.Family.layer_rules` returns unless a
family says more), and the shared loop (:func:`tpkit.models.core.prefill.run_group`, the prefill and
:func:`tpkit.models.core.generate.decode_step`) asks the rule of each layer for:

* **its mask** (:func:`mask_plan`). ``kind="attention"``: causal over the kept keys of its layer
  group, with the rule's sliding ``window`` and bidirectional ``blocks``. The window is measured in
  position ids: with ``stage1.positions: original`` (the default) a query at position p sees the kept
  keys at positions > p - w, exactly the keys the unpruned model's window holds minus the dropped ones
  (a window counted in kept slots would reach further back than the model ever looked). Blocks come
  per input token from :meth:`Family.token_blocks` (Gemma 3: an image's placeholders, from
  ``token_type_ids``) and travel with the kept tokens, so the kept tokens of an image still see each
  other both ways. ``kind="recurrent"`` (a linear-attention or state-space layer: a state, no keys)
  gets the 2D padding mask of its new tokens, or None, as ``create_recurrent_attention_mask`` gives.
  Masks are built once per distinct (kind, live window, live blocks) per layer group, never per
  layer. A window that no query can exceed (the prompt and the decoded tokens fit in it; known on the
  host from lengths, no sync) is no window: such layers share the causal mask, which keeps sdpa's
  ``is_causal`` path when nothing is padded.
* **its rotary embedding** (:func:`rotary_tables`): ``rope=None`` calls ``rotary_emb(h,
  position_ids=pos)``; a string calls ``rotary_emb(h, pos, rope)`` (the stock per-type call);
  each distinct table is computed once.
* **what is added after it** (:class:`LayerAdds`): per-token features that the visual inputs bring
  for some layers (Qwen3-VL's DeepStack adds vision features to the visual tokens after LM layers
  0..n-1), as rows of the kept placeholders (:attr:`tpkit.models.core.family.Visual.after_layer`).
  The rows travel with the tokens: a token stage 1 dropped has none, and after stage 2's cut only the
  tokens kept there receive theirs. Something to add *before* layer i is added after layer i - 1
  (before layer 0: it belongs in the placeholder's embedding).
* **what its cache keeps** (:class:`tpkit.models.core.cache.PrunedCache`): an attention layer the
  keys and values of the tokens it saw (the stage-1 tokens before stage 2's layer K, the stage-2
  tokens from K on). A sliding layer keeps every key and masks by window, unlike the stock sliding
  cache that keeps the last w - 1: one left-padded layout per group, which the static cache and the
  window-in-positions rule need (how many kept keys fall in the window differs per row). A recurrent
  layer keeps its state (the config's own cache layer), which simply never saw the dropped tokens.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from tpkit.models.core.masks import attn_mask, gather_rows

__all__ = [
    "ATTENTION",
    "RECURRENT",
    "LayerAdds",
    "LayerRule",
    "mask_plan",
    "rotary_tables",
    "rules_from_config",
]

ATTENTION, RECURRENT = "attention", "recurrent"
_RECURRENT_TYPES = ("linear_attention", "conv", "mamba")


@dataclass(frozen=True)
class LayerRule:
    """How the shared layer loop calls one decoder layer (see the module docstring)."""

    kind: str = ATTENTION  # "attention": softmax attention over keys; "recurrent": a state, no keys
    window: int | None = None  # sliding window in position ids: keys at positions > p - window
    blocks: bool = False  # tokens of one block (Family.token_blocks) see each other, later ones too
    rope: str | None = None  # None: rotary_emb(h, position_ids=pos); else rotary_emb(h, pos, rope)


def rules_from_config(lm: nn.Module, blocks: bool = False) -> tuple[LayerRule, ...]:
    """One rule per decoder layer of ``lm`` from its config, as transformers reads it: ``layer_types``
    (or, without them, sliding layers where ``sliding_window`` is set), ``sliding_window``, and a
    per-type rotary where ``rotary_emb`` takes a ``layer_type``. ``blocks``: attention layers honour
    bidirectional blocks (the family's)."""
    cfg = lm.config
    n = cfg.num_hidden_layers
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None)
    if types is None:
        types = ["sliding_attention" if window is not None else "full_attention"] * n
    rotary = getattr(lm, "rotary_emb", None)
    per_type = rotary is not None and "layer_type" in inspect.signature(rotary.forward).parameters
    rules = []
    for i, kind in enumerate(types[:n]):
        rope = kind if per_type else None
        if kind == "full_attention":
            rules.append(LayerRule(blocks=blocks, rope=rope))
        elif kind == "sliding_attention":
            if window is None:
                raise ValueError(
                    f"{type(cfg).__name__}.layer_types[{i}] is 'sliding_attention' but sliding_window is None"
                )
            rules.append(LayerRule(window=int(window), blocks=blocks, rope=rope))
        elif kind in _RECURRENT_TYPES:
            rules.append(LayerRule(kind=RECURRENT, rope=rope))
        else:
            raise ValueError(
                f"{type(cfg).__name__}.layer_types[{i}] = {kind!r}: tpkit's layer loop knows full, sliding and "
                f"recurrent ({', '.join(_RECURRENT_TYPES)}) layers; a family with other layers must say how to call "
                "them (Family.layer_rules)"
            )
    return tuple(rules)


def rotary_tables(
    lm: nn.Module,
    h: torch.Tensor,
    pos: torch.Tensor,
    rules: Sequence[LayerRule],
    tables: dict | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(cos, sin) for each layer of ``rules`` at positions ``pos``, one ``rotary_emb`` call per distinct
    table; ``tables`` (a dict) shares them between calls on the same ``h`` and ``pos``."""
    tables = {} if tables is None else tables
    out = []
    for rule in rules:
        if rule.rope not in tables:
            if rule.rope is None:
                tables[None] = lm.rotary_emb(h, position_ids=pos)
            else:
                tables[rule.rope] = lm.rotary_emb(h, pos, rule.rope)
        out.append(tables[rule.rope])
    return out


def mask_plan(
    rules: Sequence[LayerRule],
    key_valid: torch.Tensor,
    q_len: int,
    impl: str,
    dtype: torch.dtype,
    *,
    no_padding: bool,
    positions: torch.Tensor | Callable[[], torch.Tensor] | None = None,
    blocks: torch.Tensor | None = None,
    span: int | None = None,
) -> list[torch.Tensor | None]:
    """The mask of each layer of ``rules`` (one layer group) for ``q_len`` queries, the last of the keys
    ``key_valid`` (B, Lk); one mask per distinct (kind, live window, live blocks).

    ``positions`` (B, Lk) long, or a function returning them (called once, only when a window binds):
    the keys' position ids. ``blocks`` (B, Lk) long block ids (-1: none), or None (no blocks in this
    input). ``span``: a bound, known on the host, on how far a query's position may lie after a key's;
    a window larger than it binds nothing and is dropped (None: every window binds).
    ``no_padding``: no key is padding (known on the host).
    """
    built: dict[tuple, torch.Tensor | None] = {}
    pos_cache: list[torch.Tensor] = []
    out = []
    for rule in rules:
        window = rule.window if rule.window is not None and (span is None or span >= rule.window) else None
        live_blocks = blocks if rule.blocks and blocks is not None else None
        key = (rule.kind, window, live_blocks is not None)
        if key not in built:
            if rule.kind == RECURRENT:  # the new tokens' padding, as create_recurrent_attention_mask
                built[key] = None if no_padding or q_len == 1 else key_valid[:, -q_len:].long()
            elif window is None and live_blocks is None and no_padding and q_len == 1:
                built[key] = None  # one query, every key valid: no mask, as stock decoding
            else:
                kpos = None
                if window is not None:
                    if not pos_cache:
                        pos_cache.append(positions() if callable(positions) else positions)
                    kpos = pos_cache[0]
                    if kpos is None or kpos.dim() != 2:
                        raise ValueError(
                            "a sliding-window layer needs 1-D position ids (B, T) to measure its window; "
                            "multi-axis (M-RoPE) positions with a sliding window are not supported"
                        )
                built[key] = attn_mask(
                    key_valid,
                    q_len,
                    impl,
                    dtype,
                    no_padding,
                    window=window,
                    positions=kpos,
                    blocks=live_blocks,
                )
        out.append(built[key])
    return out


@dataclass
class LayerAdds:
    """Per-token features added to the hidden states after some layers (DeepStack), for the tokens of
    the current sequence: ``tables`` {layer index: (M + 1, D)}, the rows of the M kept placeholders
    in prompt order and a last zero row; ``rows`` (B, T) long, each position's row (M: none).
    Adding a zero row leaves a text token's hidden state as it is, bit for bit."""

    tables: dict[int, torch.Tensor]
    rows: torch.Tensor

    @classmethod
    def from_visual(cls, after_layer: dict[int, torch.Tensor], placeholders: torch.Tensor) -> LayerAdds:
        """``after_layer`` {layer: (M, D)} rows of the kept placeholders, row-major over ``placeholders``
        (B, T) bool (the order ``masked_scatter`` fills them in)."""
        m = next(iter(after_layer.values())).shape[0]
        flat = placeholders.flatten().long()
        rows = torch.where(placeholders, (flat.cumsum(0) - 1).view_as(placeholders), m)  # (B, T)
        tables = {i: torch.cat([t, t.new_zeros(1, t.shape[-1])]) for i, t in after_layer.items()}
        return cls(tables, rows)

    def take(self, index: torch.Tensor) -> LayerAdds:
        """The rows of the columns ``index`` (B, T') (-1: padding, no row)."""
        m = next(iter(self.tables.values())).shape[0] - 1
        return LayerAdds(self.tables, gather_rows(self.rows, index).masked_fill(index < 0, m))

    def after(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """``h`` (B, T, D) plus this layer's rows (none: ``h`` itself)."""
        table = self.tables.get(layer)
        if table is None:
            return h
        return h + table.to(h.dtype).index_select(0, self.rows.flatten()).view_as(h)
