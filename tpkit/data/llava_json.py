"""Load LLaVA conversation JSON (the LLaVA-Instruct format) into a ``datasets.Dataset``, validating every record.

A record::

    {"id": "000001", "image": "images/test/000001.png",
     "conversations": [{"from": "human", "value": "<image>\\nWhat color is the circle?"},
                       {"from": "gpt", "value": "red"}, ...],
     ...extra keys (qtype, objects, neg_type, ...) pass through unchanged}

Real LLaVA-Instruct files (``llava_instruct_150k.json``, ``llava_v1_5_mix665k.json``) read the same
way; their text-only records (no ``image``) are rejected as bad records, because tpkit feeds exactly
one image per sample (load them with ``on_error="skip"`` to keep the rest).

Every bad record is reported with the file, its index and its id. ``on_error="raise"`` raises
``LlavaDataError`` at the first one; ``on_error="skip"`` drops it, keeps every good record, and lists
each bad one with its reason in the ``LoadReport``.

Over-long sequences are **rejected, never truncated**: truncation would cut the answer (the only
supervised tokens) or the image placeholder run (whose length must match the image features). Give
``processor`` (and ``max_length``) here to find them at load time, which with ``on_error="skip"``
drops them before training; otherwise ``LlavaCollator`` raises on them, naming the record id.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tpkit.data.collator import LlavaCollator
from tpkit.data.errors import LlavaDataError, RecordError
from tpkit.data.records import LoadReport, check_records, validate_record

if TYPE_CHECKING:  # `datasets` is imported lazily: the GPU machine does not have it
    import datasets
    from transformers import ProcessorMixin

__all__ = ["LlavaDataError", "RecordError", "LoadReport", "load_llava_json", "validate_record"]


def load_llava_json(
    json_path: str | os.PathLike,
    image_folder: str | os.PathLike | None = None,
    on_error: str = "raise",
    max_records: int | None = None,
    *,
    check_images: str = "open",
    confine_images: bool = False,
    duplicate_ids: str = "raise",
    processor: ProcessorMixin | None = None,
    max_length: int = 512,
    system_prompt: str | None = None,
    mode: str = "train",
) -> tuple[datasets.Dataset, LoadReport]:
    """Read a LLaVA conversation JSON (or JSONL) file into a ``datasets.Dataset`` and a ``LoadReport``.

    Args:
        json_path: the ``.json`` (list of records) or ``.jsonl`` file, UTF-8.
        image_folder: where relative ``image`` paths live; defaults to the JSON file's directory.
        on_error: ``"raise"`` (``LlavaDataError`` naming file, index and id at the first bad record)
            or ``"skip"`` (drop bad records, list each in the report; no good record is lost).
        max_records: only the first ``max_records`` entries of the file are examined.
        check_images: ``"open"`` (exists and PIL reads its header, default), ``"decode"`` (full
            decode, slow), ``"exists"``, or ``"none"``.
        confine_images: only read images under ``image_folder``: an absolute path or one that
            leaves the folder (``../``, a symlink out of it) is a bad record. Off by default: real
            LLaVA files name absolute paths, which are then read as given.
        duplicate_ids: ``"raise"`` (two records with one id are an error naming the ids: the teacher
            cache and per-sample outputs are keyed by id) or ``"rename"`` (the 2nd, 3rd ... record
            of an id ``x`` becomes ``x#2``, ``x#3`` ...; listed in ``report.renamed``).
        processor, max_length, system_prompt, mode: if ``processor`` is given, every record is
            rendered and tokenised as ``LlavaCollator(processor, max_length, mode, system_prompt=...)``
            would (``mode="eval"``: the prompt up to the first answer), and records longer than
            ``max_length`` tokens are bad records (rejected, not truncated).

    Rows keep every key of the record (``id`` as str) plus ``image_path``, the resolved image file.
    Bad records: not an object, missing id, non-list or empty conversations, malformed turns,
    unknown or non-alternating roles (human, gpt, human, ...), empty answer, missing or misplaced
    ``<image>`` placeholder (exactly one, in the first human turn), no image field, missing or
    unreadable image file, image outside the folder (``confine_images``), over-long sequence (with
    ``processor``). A file without any usable record is an error.
    """
    processor_lengths = None
    if processor is not None:
        collator = LlavaCollator(processor, max_length=max_length, mode=mode, system_prompt=system_prompt)
        processor_lengths = collator.sequence_lengths
    rows, report = check_records(
        json_path,
        image_folder,
        on_error,
        max_records,
        check_images=check_images,
        confine_images=confine_images,
        duplicate_ids=duplicate_ids,
        lengths=processor_lengths,
        max_length=max_length,
    )
    return _to_dataset(rows, Path(json_path)), report


def _to_dataset(rows: list[dict[str, Any]], path: Path) -> datasets.Dataset:
    try:
        import datasets
    except ImportError as e:
        raise ImportError(
            "load_llava_json needs the `datasets` package (pip install datasets); "
            "LlavaCollator itself works on plain dict records without it"
        ) from e

    # Dataset.from_list takes its columns from the first row: give every row the union of keys.
    keys: dict[str, None] = {}
    for row in rows:
        keys.update(dict.fromkeys(row))
    columns = {k: [row.get(k) for row in rows] for k in keys}
    try:
        return datasets.Dataset.from_dict(columns)
    except Exception as e:  # pyarrow type clashes between records (e.g. a key that is sometimes a list)
        raise LlavaDataError(path, f"records do not share one schema: {type(e).__name__}: {e}") from None
