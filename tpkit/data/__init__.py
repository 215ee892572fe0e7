"""Data: LLaVA conversation JSON (via ``datasets``), the collator, the offline processors, videos.

Names are resolved on first use, so that ``import tpkit.data`` stays cheap and does not need
``datasets`` (the collator works on plain dict records).
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "DataConfig": "tpkit.data.config",
    "build_processor": "tpkit.data.processor",
    "build_next_processor": "tpkit.data.processor",
    "build_onevision_processor": "tpkit.data.processor",
    "build_qwen2_vl_processor": "tpkit.data.qwen_processor",
    "OfflineQwen2VLProcessor": "tpkit.data.qwen_processor",
    "OfflineQwen2_5_VLProcessor": "tpkit.data.qwen_processor",
    "num_image_tokens": "tpkit.data.processor",
    "DEFAULT_SYSTEM_PROMPT": "tpkit.data.processor",
    "CHAT_TEMPLATE": "tpkit.data.processor",
    "load_llava_json": "tpkit.data.llava_json",
    "LoadReport": "tpkit.data.llava_json",
    "LlavaDataError": "tpkit.data.llava_json",
    "LlavaCollator": "tpkit.data.collator",
    "Video": "tpkit.data.video",
    "load_video": "tpkit.data.video",
    "IGNORE_INDEX": "tpkit.data.labels",
    "next_token_targets": "tpkit.data.labels",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'tpkit.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)
