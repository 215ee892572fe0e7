"""LLaVA conversation-JSON records: read a file and check every record (torch-free: the command line
checks a run's data with it in about a second, before torch, transformers and the weights load).

:func:`check_records` is the one validation; :func:`tpkit.data.llava_json.load_llava_json` adds the
length check with a processor and builds the ``datasets.Dataset``. The format and what counts as a
bad record: :mod:`tpkit.data.llava_json`.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tpkit.data.config import DataConfig
from tpkit.data.errors import LlavaDataError, RecordError

IMAGE_PLACEHOLDER = "<image>"
USER_ROLES = ("human", "user")
ASSISTANT_ROLES = ("gpt", "assistant")
CHECK_IMAGES = ("none", "exists", "open", "decode")
DUPLICATE_IDS = ("raise", "rename")

__all__ = [
    "IMAGE_PLACEHOLDER",
    "CHECK_IMAGES",
    "DUPLICATE_IDS",
    "LoadReport",
    "check_records",
    "precheck",
    "read_records",
    "role_of",
    "strict_decoding",
    "validate_record",
]


@dataclass
class LoadReport:
    """What ``load_llava_json`` read, kept and rejected."""

    json_path: str
    image_folder: str
    n_records: int = 0  # records examined (after max_records)
    n_loaded: int = 0
    errors: list[RecordError] = field(default_factory=list)
    renamed: dict[str, list[str]] = field(default_factory=dict)  # duplicate id -> the ids it became

    @property
    def n_skipped(self) -> int:
        return len(self.errors)

    def summary(self, max_errors: int = 20) -> str:
        lines = [
            f"{self.json_path}: {self.n_loaded}/{self.n_records} records loaded, {self.n_skipped} skipped"
        ]
        lines += [f"  {e}" for e in self.errors[:max_errors]]
        if len(self.errors) > max_errors:
            lines.append(f"  ... and {len(self.errors) - max_errors} more")
        if self.renamed:
            n = sum(map(len, self.renamed.values()))
            lines.append(
                f"  {n} records of {len(self.renamed)} duplicate ids renamed (e.g. {next(iter(self.renamed.values()))[0]!r})"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def role_of(turn_from: str) -> str | None:
    """LLaVA role name -> chat-template role ("user"/"assistant"), None if unknown."""
    if turn_from in USER_ROLES:
        return "user"
    if turn_from in ASSISTANT_ROLES:
        return "assistant"
    return None


def _check_conversations(conv: Any) -> None:
    if not isinstance(conv, list):
        raise _Bad(f"'conversations' must be a list of turns, got {type(conv).__name__}")
    if not conv:
        raise _Bad("'conversations' is empty")
    n_placeholders = 0
    for i, turn in enumerate(conv):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise _Bad(f"turn {i} must be a dict with 'from' and 'value', got {turn!r:.80}")
        if not isinstance(turn["value"], str):
            raise _Bad(f"turn {i}: 'value' must be a string, got {type(turn['value']).__name__}")
        role = role_of(turn["from"])
        if role is None:
            raise _Bad(f"turn {i}: unknown role {turn['from']!r} (expected 'human' or 'gpt')")
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            want = "human" if expected == "user" else "gpt"
            raise _Bad(
                f"turn {i}: expected role {want!r}, got {turn['from']!r} "
                "(turns must alternate human/gpt, starting with human)"
            )
        if role == "assistant" and not turn["value"].strip():
            raise _Bad(f"turn {i}: empty answer")
        count = turn["value"].count(IMAGE_PLACEHOLDER)
        if count and i != 0:
            raise _Bad(f"turn {i}: {IMAGE_PLACEHOLDER} placeholder outside the first human turn")
        n_placeholders += count
    if n_placeholders == 0:
        raise _Bad(f"no {IMAGE_PLACEHOLDER} placeholder in the first human turn")
    if n_placeholders > 1:
        raise _Bad(
            f"{n_placeholders} {IMAGE_PLACEHOLDER} placeholders in the first human turn (one image per record)"
        )
    if len(conv) % 2:
        raise _Bad("conversation ends with a human turn (no answer)")


def _check_image(image: Any, folder: Path, check: str, confine: bool = False) -> str:
    if image is None:
        raise _Bad("no 'image' field (text-only records are not supported: one image per sample)")
    if not isinstance(image, str) or not image:
        raise _Bad(f"'image' must be a non-empty path string, got {image!r:.80}")
    path = Path(image) if os.path.isabs(image) else folder / image
    # resolved (symlinks followed): a link inside the folder that points out of it is outside too
    if confine and not path.resolve().is_relative_to(folder.resolve()):
        raise _Bad(
            f"image path {image!r} is outside the image folder {folder} (data.confine_images is on: "
            "only files under the image folder are read)"
        )
    if check == "none":
        return str(path)
    if not path.is_file():
        raise _Bad(f"image file not found: {path}")
    if check in ("open", "decode"):
        from PIL import Image

        try:
            with strict_decoding(), Image.open(path) as im:
                if check == "decode":
                    im.load()
        except Exception as e:  # PIL raises many types for corrupt files
            raise _Bad(f"unreadable image {path}: {type(e).__name__}: {e}") from None
    return str(path)


class _Bad(Exception):
    """Internal: one record failed validation (reason in args[0])."""


def validate_record(
    record: Any, image_folder: str | os.PathLike, check_images: str = "open", confine_images: bool = False
) -> dict[str, Any]:
    """Check one record; return a copy with ``id`` as str and ``image_path`` (absolute) added.

    Raises ``_Bad`` (internal) with the reason; ``load_llava_json`` turns it into ``LlavaDataError``.
    """
    if not isinstance(record, dict):
        raise _Bad(f"a record must be a JSON object, got {type(record).__name__}")
    if record.get("id") is None or record.get("id") == "":
        raise _Bad("missing 'id'")
    if "conversations" not in record:
        raise _Bad("missing 'conversations'")
    _check_conversations(record["conversations"])
    image_path = _check_image(record.get("image"), Path(image_folder), check_images, confine_images)
    out = dict(record)
    out["id"] = str(record["id"])
    out["image_path"] = str(Path(image_path).resolve())
    return out


def _read_json(path: Path) -> list[Any]:
    if not path.is_file():
        raise LlavaDataError(path, "file not found")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # -sig: a byte-order mark is read past, not an error
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise LlavaDataError(
            path,
            f"not UTF-8 text (byte 0x{raw[e.start]:02x} at line {line}, offset {e.start}): LLaVA JSON is "
            "UTF-8; re-encode the file (e.g. iconv -f latin1 -t utf-8 IN > OUT)",
        ) from None
    del raw
    if path.suffix == ".jsonl":
        data = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    data.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise LlavaDataError(path, f"line {lineno}: invalid JSON: {e.msg}") from None
        return data
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise LlavaDataError(path, f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if not isinstance(data, list):
        raise LlavaDataError(path, f"top level must be a list of records, got {type(data).__name__}")
    return data


def _progress(it: Iterable, total: int, desc: str) -> Iterable:
    if total < 5000:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, total=total, desc=desc, unit="rec")


@contextlib.contextmanager
def strict_decoding() -> Iterator[None]:
    """Inside the block a truncated image file fails to decode, whatever the process set: PIL's
    ``ImageFile.LOAD_TRUNCATED_IMAGES`` is a global that other libraries turn on (lmms-eval does on
    import), after which a cut file decodes silently, padded with grey."""
    from PIL import ImageFile

    before = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = before


def read_records(json_path: str | os.PathLike, max_records: int | None = None) -> list[Any]:
    """The entries of a LLaVA-JSON (a list) or JSONL file, the first ``max_records`` of them; a file
    that is missing, not UTF-8 or not such a list is a ``LlavaDataError`` naming it."""
    data = _read_json(Path(json_path))
    return data if max_records is None else data[:max_records]


def check_records(
    json_path: str | os.PathLike,
    image_folder: str | os.PathLike | None = None,
    on_error: str = "raise",
    max_records: int | None = None,
    *,
    check_images: str = "open",
    confine_images: bool = False,
    duplicate_ids: str = "raise",
    lengths: Callable[[list[dict[str, Any]]], list[int]] | None = None,
    max_length: int = 512,
) -> tuple[list[dict[str, Any]], LoadReport]:
    """Read a LLaVA-JSON file and check every record -> (the good records, in file order, each with
    ``id`` as str and ``image_path``; the report). Arguments as :func:`tpkit.data.llava_json.load_llava_json`
    takes them; ``lengths(records)`` -> their token counts, to reject records over ``max_length``."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if check_images not in CHECK_IMAGES:
        raise ValueError(f"check_images must be one of {CHECK_IMAGES}, got {check_images!r}")
    if duplicate_ids not in DUPLICATE_IDS:
        raise ValueError(f"duplicate_ids must be one of {DUPLICATE_IDS}, got {duplicate_ids!r}")
    path = Path(json_path)
    folder = Path(image_folder) if image_folder is not None else path.parent
    report = LoadReport(json_path=str(path), image_folder=str(folder))
    if image_folder is not None and not folder.is_dir():
        raise LlavaDataError(path, f"image_folder {folder} is not a directory")
    data = read_records(path, max_records)
    report.n_records = len(data)

    def reject(index: int, record: Any, reason: str) -> None:
        rid = str(record.get("id")) if isinstance(record, dict) and record.get("id") is not None else None
        if on_error == "raise":
            raise LlavaDataError(path, reason, index, rid)
        report.errors.append(RecordError(index, rid, reason))

    good: list[tuple[int, dict[str, Any]]] = []
    for index, record in enumerate(_progress(data, len(data), f"checking {path.name}")):
        try:
            good.append((index, validate_record(record, folder, check_images, confine_images)))
        except _Bad as e:
            reject(index, record, e.args[0])

    if lengths is not None and good:
        kept = []
        for (index, record), n in zip(good, lengths([r for _, r in good])):
            if n > max_length:
                reject(
                    index,
                    record,
                    f"sequence of {n} tokens exceeds max_length={max_length} (rejected, not truncated)",
                )
            else:
                kept.append((index, record))
        good = kept

    _unique_ids(good, path, duplicate_ids, report)
    report.errors.sort(key=lambda e: e.index)
    report.n_loaded = len(good)
    if not good:
        why = "the file holds no records" if not data else f"all {len(data)} records are bad"
        first = f" (first: {report.errors[0]})" if report.errors else ""
        raise LlavaDataError(path, f"no usable records: {why}{first}")
    return [r for _, r in good], report


def _unique_ids(good: list[tuple[int, dict[str, Any]]], path: Path, how: str, report: LoadReport) -> None:
    """Refuse (or, ``how="rename"``, rename) ids that several kept records share, in place."""
    where: dict[str, list[int]] = {}
    for index, record in good:
        where.setdefault(record["id"], []).append(index)
    dup = {rid: idx for rid, idx in where.items() if len(idx) > 1}
    if not dup:
        return
    if how == "raise":
        shown = "; ".join(
            f"{rid!r} (records {', '.join(f'#{i}' for i in idx[:4])})" for rid, idx in list(dup.items())[:5]
        )
        more = f"; and {len(dup) - 5} more" if len(dup) > 5 else ""
        raise LlavaDataError(
            path,
            f"{len(dup)} record ids occur more than once: {shown}{more}. The teacher cache and the per-sample "
            "outputs are keyed by id: make them unique, or set data.duplicate_ids: rename (the 2nd, 3rd ... "
            "record of id x becomes x#2, x#3 ...)",
        )
    taken = set(where)
    seen: dict[str, int] = {}
    for _, record in good:
        rid = record["id"]
        if rid not in dup:
            continue
        seen[rid] = seen.get(rid, 0) + 1
        if seen[rid] == 1:
            continue
        k, new = seen[rid], f"{rid}#{seen[rid]}"
        while new in taken:  # "x#2" may itself be an id of the file
            k += 1
            new = f"{rid}#{k}"
        taken.add(new)
        record["id"] = new
        report.renamed.setdefault(rid, []).append(new)


def precheck(cfg: DataConfig, keys: Iterable[str]) -> None:
    """The quick pass over a config's data files (``keys`` of ``cfg``, e.g. ``["train_json"]``; unset
    ones skipped) before any model loads: every file read, every record checked, ids, and each image
    found (``check_images: exists`` at most; opening every image is the full load's). Raises
    ``LlavaDataError``, naming the ``data.*`` key, at the first bad record (``on_error: raise``) or
    when a file has no usable record. Skipped records are reported by the full load, once."""
    for key in keys:
        path = getattr(cfg, key)
        if path is None:
            continue
        try:
            check_records(
                path,
                cfg.image_folder,
                cfg.on_error,
                check_images="none" if cfg.check_images == "none" else "exists",
                confine_images=cfg.confine_images,
                duplicate_ids=cfg.duplicate_ids,
            )
        except LlavaDataError as e:
            raise LlavaDataError(f"data.{key}: {e}") from None
