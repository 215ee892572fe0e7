"""Qwen3-VL (``Qwen3VLForConditionalGeneration``, ``Qwen3VLMoeForConditionalGeneration``) and Qwen3.5
(``Qwen3_5ForConditionalGeneration``): Qwen2-VL's way of seeing (merged 2 x 2 units, 3-D M-RoPE ids
from ``get_rope_index``), so the family extends :class:`tpkit.models.qwen2_vl.family.Qwen2VLFamily`
and says what differs.

* **Tower**: a ViT with learned position embeddings resampled to each image, no windows, no CLS; stage 1
  scores the merged units at the merger's input (``mean_distance``, ``cosine_mean`` or
  ``attn_received``), as on Qwen2-VL.
* **DeepStack** (Qwen3-VL): the outputs of the tower blocks ``deepstack_visual_indexes`` pass through
  their own mergers, one row per merged unit, and stock adds them to the visual tokens' hidden states
  after decoder layers 0..n-1. The family hands the kept units' rows to the core
  (:attr:`tpkit.models.core.family.Visual.after_layer`), which adds each to its token after those layers:
  a unit stage 1 drops takes its rows with it, and after stage 2's cut only the tokens kept there get
  theirs.
* **Video**: the processor writes each frame (a temporal patch) as its own ``<|vision_start|>`` ...
  ``<|vision_end|>`` run after a timestamp in text (``<0.5 seconds>``); ``get_rope_index`` gives each
  frame its own grid of ids, and stage 1 still cuts one knee per video (``groups: view``: per frame).
* **Qwen3.5**'s decoder is hybrid: Gated DeltaNet layers (a recurrent state, no keys) between gated
  softmax-attention layers. The core's layer rules read it from ``layer_types``: a recurrent layer runs on
  the kept tokens only, in order, and its cached state is the kept tokens' (it never sees a dropped
  one). Stage 2 scores with a softmax-attention layer's own q/k, so ``stage2.layer`` must name one (3,
  7, 11, ... on the shipped models; :meth:`tpkit.models.core.family.Family.check_config` says so).
"""

from __future__ import annotations

from tpkit.models.core.family import DEFAULT_LORA_TARGET
from tpkit.models.qwen2_vl.family import Qwen2VLFamily
from tpkit.models.qwen3_vl.tiny import (
    ARCHITECTURES,
    tiny_qwen3_5_config,
    tiny_qwen3_vl_config,
    tiny_qwen3_vl_moe_config,
)

__all__ = ["FAMILIES", "Qwen3VLFamily", "Qwen3_5Family"]

# random_prompt's image side without a tpkit config attribute: 1024 = 64 patches of 16 -> 32 x 32 units
DEFAULT_IMAGE_SIZE = 1024


class Qwen3VLFamily(Qwen2VLFamily):
    name = "qwen3_vl"
    classes = ("Qwen3VLForConditionalGeneration", "Qwen3VLMoeForConditionalGeneration")
    visual_keys = (
        "pixel_values",
        "image_grid_thw",
        "pixel_values_videos",
        "video_grid_thw",
        "mm_token_type_ids",
    )
    packed_visual_keys = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")
    builders = {
        "qwen3_vl": (tiny_qwen3_vl_config, "Qwen3VLForConditionalGeneration"),
        "qwen3_vl_moe": (tiny_qwen3_vl_moe_config, "Qwen3VLMoeForConditionalGeneration"),
    }
    architectures = {k: v for k, v in ARCHITECTURES.items() if v["builder"] in ("qwen3_vl", "qwen3_vl_moe")}
    # the merger and the three DeepStack mergers (every Qwen3-VL ships three) map tower states to the LM
    projector_modules = (
        "visual.merger",
        "visual.deepstack_merger_list.0",
        "visual.deepstack_merger_list.1",
        "visual.deepstack_merger_list.2",
    )
    required = (*Qwen2VLFamily.required, "model.visual.deepstack_merger_list")
    like = "Qwen3-VL"
    default_image_size = DEFAULT_IMAGE_SIZE


class Qwen3_5Family(Qwen3VLFamily):
    name = "qwen3_5"
    classes = ("Qwen3_5ForConditionalGeneration",)
    builders = {"qwen3_5": (tiny_qwen3_5_config, "Qwen3_5ForConditionalGeneration")}
    architectures = {k: v for k, v in ARCHITECTURES.items() if v["builder"] == "qwen3_5"}
    projector_modules = ("visual.merger",)
    # the language model's linear layers, the Gated DeltaNet projections among them
    lora_target = DEFAULT_LORA_TARGET.replace("down_proj)", "down_proj|in_proj_qkv|in_proj_z|out_proj)")
    required = Qwen2VLFamily.required
    like = "Qwen3.5"


FAMILIES = (Qwen3VLFamily(), Qwen3_5Family())
