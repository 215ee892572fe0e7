"""The ``data`` config section (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["DataConfig"]


@dataclass
class DataConfig:
    """LLaVA conversation-JSON data (tpkit.data)."""

    train_json: str | None = None
    val_json: str | None = None
    test_json: str | None = None
    image_folder: str | None = None  # None = the json's directory
    on_error: Literal["raise", "skip"] = "raise"  # unreadable image / malformed / over-long record
    check_images: Literal["open", "decode", "exists", "none"] = "open"  # at load time (exists: large sets)
    max_length: int = 512
    batch_size: int = 4  # per device
    eval_batch_size: int = 8
    num_workers: int = 0

    def validate(self) -> None:
        if self.max_length < 8:
            raise ValueError(f"max_length = {self.max_length} is too small (>= 8)")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError("batch_size and eval_batch_size must be >= 1")
        if self.num_workers < 0:
            raise ValueError(f"num_workers = {self.num_workers} must be >= 0")
