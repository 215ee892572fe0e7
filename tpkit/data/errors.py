"""What a bad LLaVA-JSON file or record is called, at load time and at batch time (torch-free)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["LlavaDataError", "RecordError", "write_skipped"]


class LlavaDataError(ValueError):
    """A bad LLaVA-JSON file or record; the message names the file, record index and id.

    ``LlavaDataError(message)`` alone is accepted too: a DataLoader worker re-raises an exception in
    the main process by calling its class with the formatted message.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        reason: str | None = None,
        index: int | None = None,
        record_id: Any = None,
    ):
        self.path, self.reason, self.index, self.record_id = str(path), reason, index, record_id
        if reason is None:
            super().__init__(str(path))
            return
        where = str(path) if index is None else f"{path}: record #{index} (id={record_id!r})"
        super().__init__(f"{where}: {reason}")


@dataclass
class RecordError:
    """One rejected record: ``index`` in its file (None when not known, e.g. at batch time)."""

    index: int | None
    id: str | None
    reason: str

    def __str__(self) -> str:
        where = f"record #{self.index}" if self.index is not None else "record"
        return f"{where} (id={self.id!r}): {self.reason}"


def write_skipped(path: str | os.PathLike, source: str, errors: list[RecordError], **extra: Any) -> None:
    """Append one JSON line per skipped record to ``path`` (``source``: the data file; ``extra``:
    where it happened, e.g. ``stage="batch", step=12``). Appends of whole lines, so that several
    ranks may share the file."""
    if not errors:
        return
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps({"file": source, **asdict(e), **extra}) + "\n" for e in errors)
    with open(p, "a", encoding="utf-8") as f:
        f.write(lines)
