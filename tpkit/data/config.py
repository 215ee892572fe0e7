"""The ``data`` config section (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tpkit.config import path_field

__all__ = ["DataConfig"]


@dataclass
class DataConfig:
    """LLaVA conversation-JSON data (tpkit.data)."""

    train_json: str | None = path_field()
    val_json: str | None = path_field()
    test_json: str | None = path_field()
    image_folder: str | None = path_field()  # None = the json's directory
    # true: read images under image_folder only (an absolute path, ../ or a symlink out of it is a bad
    # record); false: relative paths are under image_folder, absolute ones are read as given (real
    # LLaVA files use absolute paths)
    confine_images: bool = False
    # bad record (malformed, unreadable or undecodable image, over-long): raise = stop naming it;
    # skip = drop it, at load time and at batch time, and list it in <out_dir>/skipped_records.jsonl
    on_error: Literal["raise", "skip"] = "raise"
    check_images: Literal["open", "decode", "exists", "none"] = "open"  # at load time (exists: large sets)
    # records sharing an id (teacher cache and outputs are keyed by id): raise = refuse, naming them;
    # rename = the 2nd, 3rd ... record of id x becomes x#2, x#3 ...
    duplicate_ids: Literal["raise", "rename"] = "raise"
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
