"""Turn LLaVA conversation records into left-padded model batches (train: with labels; eval: prompts).

Works on plain dict records (``datasets`` rows or dicts from JSON); needs only the processor. Hub
processors whose chat template wants list-of-parts content (llava-hf's) are detected and fed parts,
image first; what such a template closes an answer with is what gets supervised (llava-hf's
LLaVA-1.5 template closes with a space, not ``</s>``).

Per sample the chat template is rendered once for the whole conversation, plus once per answer for
its prefix with the generation prompt (``... ASSISTANT:``): the answer spans are the characters
between the two, which include what the template closes an answer with (``</s>``). The batch is
tokenised in one call with character offsets; a token is an answer token when its characters
overlap an answer span. The image token (LLaVA-JSON's ``<image>``, written as the processor's own image
token) is then repeated to its run of image tokens between the markers the processor puts around it
(InternVL's ``<img>`` ... ``</img>``), which is what the processor's ``__call__`` does to the text (a
test checks the ids are identical) without tokenising hundreds of placeholders. Images go through the
processor's image processor.

Over-long sequences are rejected, never truncated (see ``tpkit.data.llava_json``), and so are
images that fail to decode at batch time (a truncated file passes the load-time header check):
``on_error="raise"`` raises ``LlavaDataError`` naming the record id; ``on_error="skip"`` drops the
record from the batch and lists it in ``batch["skipped"]`` (a batch may then be empty).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tpkit.data.errors import LlavaDataError, RecordError
from tpkit.data.labels import IGNORE_INDEX
from tpkit.data.processor import IMAGE, num_image_tokens

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


class LlavaCollator:
    """Collate LLaVA-JSON records into model inputs.

    Train batch (``mode="train"``):
        ``input_ids`` (B, T) long, left-padded; ``attention_mask`` (B, T) long;
        ``pixel_values`` (B, 3, H, W) float; ``labels`` (B, T) long, ``IGNORE_INDEX`` (-100) except answer tokens
        (each answer and its closing ``</s>``, every turn), where ``labels[b, t] = input_ids[b, t]``
        (unshifted); ``answer_mask`` (B, T) bool (``labels != IGNORE_INDEX``); ``ids`` list[str].
    Eval batch (``mode="eval"``):
        ``input_ids``, ``attention_mask``, ``pixel_values`` for the prompt up to the first answer,
        ending with the generation prompt (``... ASSISTANT:``); a record whose conversation ends with
        a question (no answer turn) is rendered whole, earlier turns as history, with the generation
        prompt. ``answers`` (first answer of each record, ``None`` if none), ``qtypes``, ``ids``,
        ``neg_types`` lists (``None`` where a record has no such key).
    Score batch (``mode="score"``, for loglikelihood requests): the eval prompt of the first answer
        followed by that answer's text exactly as given (no closing token of the template);
        ``labels`` and ``answer_mask`` as in training, on the answer's tokens only; ``ids``.
    Every mode, when records were dropped (``on_error="skip"``): ``skipped`` list[RecordError]; when
    every record of the batch was, the batch holds only ``ids`` (empty) and ``skipped``.

    Args:
        processor: a ``LlavaProcessor`` (``tpkit.data.processor.build_processor`` or a hub one).
        max_length: longest allowed sequence in tokens, image tokens included; longer records raise.
        mode: ``"train"``, ``"eval"`` or ``"score"``.
        system_prompt: ``None`` keeps the chat template's own system prompt; a string replaces it
            (sent as a system message; ``""`` removes it).
        image_folder: resolves relative ``image`` paths of records without ``image_path``.
        on_error: ``"raise"`` (``LlavaDataError``) or ``"skip"`` for an image that does not decode or
            a sequence over ``max_length``.
    """

    def __init__(
        self,
        processor: Any,
        max_length: int = 512,
        mode: str = "train",
        system_prompt: str | None = None,
        image_folder: str | os.PathLike | None = None,
        on_error: str = "raise",
    ):
        if mode not in ("train", "eval", "score"):
            raise ValueError(f"mode must be 'train', 'eval' or 'score', got {mode!r}")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.on_error = on_error
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_processor = processor.image_processor
        self.max_length = int(max_length)
        self.mode = mode
        self.system_prompt = system_prompt
        self.image_folder = Path(image_folder) if image_folder is not None else None
        self.chat_template = getattr(processor, "chat_template", None) or self.tokenizer.chat_template
        if self.chat_template is None:
            raise ValueError("the processor has no chat template")
        self.image_token = processor.image_token
        self.image_token_id = processor.image_token_id
        self.pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self._bos = self.tokenizer.bos_token
        self._parts = self._content_as_parts()
        # one fixed-size image per sample (LlavaProcessor): its count needs no image
        self._fixed = type(processor).__name__ == "LlavaProcessor"
        self._mm_types = False  # the processor marks each token's modality (set by encode_images)
        self._marks: tuple[list[int], list[int], int] | None = None  # see _markers

    def _content_as_parts(self) -> bool:
        """Whether to give the chat template list-of-parts content or strings.

        Parts where strings do not render (llava-hf hub templates), and where the template marks
        an image part up beyond the bare placeholder (Qwen2-VL's ``<|vision_start|><|image_pad|>
        <|vision_end|>``, which the model was trained on); strings otherwise (tpkit's LLaVA
        template, which renders both alike)."""
        question, answer = "tpkit probe question", "tpkit probe answer"
        rendered = {}
        for parts in (False, True):
            msgs = [
                {"role": "user", "content": self._content(f"{self.image_token}\n{question}", parts)},
                {"role": "assistant", "content": self._content(answer, parts)},
            ]
            try:
                text = self._render(msgs, False)
            except Exception:
                continue
            if question in text and answer in text and text.count(self.image_token) == 1:
                rendered[parts] = text
        if not rendered:
            raise ValueError("the chat template renders neither string nor list-of-parts message content")
        if True not in rendered:
            return False
        if False not in rendered:
            return True
        # both render: parts when the template wraps the image part in markup of its own
        return rendered[True].replace(f"{self.image_token}\n", self.image_token) != rendered[False].replace(
            f"{self.image_token}\n", self.image_token
        )

    def _content(self, value: str, parts: bool) -> str | list[dict[str, str]]:
        # LLaVA-JSON's "<image>" is the processor's image token (InternVL's "<IMG_CONTEXT>")
        value = value.replace(IMAGE, self.image_token)
        if not parts:
            return value  # LLaVA-JSON text as is, the image token inline
        # hub templates render images first, as LLaVA's own preprocessing moves "<image>" to the front
        if self.image_token in value:
            text = value.replace(self.image_token, "").strip()
            return [{"type": "image"}, {"type": "text", "text": text}]
        return [{"type": "text", "text": value}]

    # ---- text -------------------------------------------------------------------------------
    def messages(self, record: dict[str, Any]) -> list[dict[str, Any]]:
        """The record's conversation as chat-template messages (system message first if set)."""
        rid = record.get("id")
        conv = record.get("conversations")
        if not isinstance(conv, list) or not conv:
            raise ValueError(f"record id={rid!r}: 'conversations' must be a non-empty list")
        msgs = []
        if self.system_prompt is not None:
            msgs.append({"role": "system", "content": self._content(self.system_prompt, self._parts)})
        for i, turn in enumerate(conv):
            role = _ROLES.get(turn.get("from")) if isinstance(turn, dict) else None
            if role is None or role != ("user" if i % 2 == 0 else "assistant"):
                raise ValueError(
                    f"record id={rid!r}: turn {i} has role {turn!r:.60}; expected alternating human/gpt"
                )
            msgs.append({"role": role, "content": self._content(turn["value"], self._parts)})
        return msgs

    def _render(self, msgs: list[dict[str, Any]], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            msgs, chat_template=self.chat_template, tokenize=False, add_generation_prompt=generation_prompt
        )

    def _texts(self, record: dict[str, Any]) -> tuple[str, list[tuple[int, int]], str]:
        """(full conversation text, answer character spans in it, prompt up to the first answer)."""
        msgs = self.messages(record)
        answers = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
        if self.mode == "eval" and msgs[-1]["role"] == "user":  # a question to answer: the whole of it
            return "", [], self._render(msgs, True)
        if not answers:
            raise ValueError(f"record id={record.get('id')!r}: no answer turn")
        if self.mode == "score":  # the answer as given, after the generation prompt: no closing token
            prompt = self._render(msgs[: answers[0]], True)
            full = prompt + _first_answer(record)
            return full, [(len(prompt), len(full))], prompt
        full = self._render(msgs, False) if self.mode == "train" else ""
        spans, prompt = [], ""
        for k, i in enumerate(answers):
            before = self._render(msgs[:i], True)  # ends with the generation prompt
            if k == 0:
                prompt = before
                if self.mode == "eval":
                    break
            through = full if i == len(msgs) - 1 else self._render(msgs[: i + 1], False)
            if not (full.startswith(before) and full.startswith(through) and len(through) > len(before)):
                raise ValueError(
                    f"record id={record.get('id')!r}: the chat template does not render conversations as "
                    "prefixes of each other; cannot locate the answer tokens"
                )
            spans.append((len(before), len(through)))
        return full, spans, prompt

    def _encode(
        self, records: Sequence[dict[str, Any]], n_image: int | Sequence[int]
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Token ids and answer mask (bool) per record, unpadded, the image placeholder expanded to
        ``n_image`` tokens (one count for all records, or one per record)."""
        counts = [n_image] * len(records) if isinstance(n_image, int) else list(n_image)
        before, after, _ = self._markers()
        texts, spans = [], []
        for r in records:
            full, sp, prompt = self._texts(r)
            text = prompt if self.mode == "eval" else full
            if text.count(self.image_token) != 1:
                raise ValueError(
                    f"record id={r.get('id')!r}: expected exactly one {self.image_token} placeholder, "
                    f"found {text.count(self.image_token)}"
                )
            texts.append(text)
            spans.append(np.asarray(sp, dtype=np.int64).reshape(-1, 2))
        add_bos = not (self._bos and all(t.startswith(self._bos) for t in texts))
        enc = self.tokenizer(
            texts, add_special_tokens=add_bos, return_offsets_mapping=True, return_attention_mask=False
        )
        out = []
        for r, ids, offsets, sp, n_img in zip(
            records, enc["input_ids"], enc["offset_mapping"], spans, counts
        ):
            ids = np.asarray(ids, dtype=np.int64)  # (L,)
            is_image = ids == self.image_token_id
            if int(is_image.sum()) != 1:
                raise ValueError(
                    f"record id={r.get('id')!r}: {self.image_token} is not a single token of this tokenizer"
                )
            off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)  # (L, 2) character spans
            # a token belongs to an answer when its characters overlap a span; (0, 0) specials never do
            mask = ((off[:, None, 1] > sp[None, :, 0]) & (off[:, None, 0] < sp[None, :, 1])).any(1)
            # expand the placeholder to its run of n_image tokens between the processor's markers, as
            # the processor does on the text (the placeholder is a special token: neighbours unchanged)
            at = int(np.flatnonzero(is_image)[0])
            run = np.asarray(before + [self.image_token_id] * n_img + after, dtype=np.int64)
            ids = np.concatenate([ids[:at], run, ids[at + 1 :]])
            out.append((ids, np.concatenate([mask[:at], np.zeros(len(run), dtype=bool), mask[at + 1 :]])))
        return out

    def _markers(self) -> tuple[list[int], list[int], int]:
        """(tokens the processor writes before each image's placeholders, after them, how many tokens
        its ``_get_num_multimodal_tokens`` counts for an image besides the placeholders), read once
        off its expansion of one image: InternVL's ``<img>``, ``</img>``, and 2 on transformers 5.17
        (0 on 5.2x); none for LLaVA's and Qwen's."""
        if self._marks is None:
            self._marks = ([], [], 0)
            if not self._fixed:
                from PIL import Image

                size = (64, 64)
                out = self.processor(
                    text=[self.image_token], images=[Image.new("RGB", size)], add_special_tokens=False
                )
                ids = list(out["input_ids"][0])
                at = [i for i, t in enumerate(ids) if t == self.image_token_id]
                counted = self.processor._get_num_multimodal_tokens(image_sizes=[size])["num_image_tokens"][0]
                self._marks = (ids[: at[0]], ids[at[-1] + 1 :], int(counted) - len(at))
        return self._marks

    def _n_image_tokens(self) -> int:
        """Image tokens per sample from the image processor's output size (no image needed)."""
        ip = self.image_processor
        size = ip.crop_size if getattr(ip, "do_center_crop", False) else ip.size
        if not size or "height" not in size:
            raise ValueError(f"cannot tell the image size from the image processor (size={size})")
        return num_image_tokens(self.processor, size["height"], size["width"])

    def _counts_from_sizes(self, records: Sequence[dict[str, Any]]) -> list[int]:
        """Image tokens of each record from its image's size (read from the file header, not decoded),
        as the processor counts them for any-resolution models."""
        from PIL import Image

        sizes = []
        for r in records:
            image = r.get("image")
            if isinstance(image, Image.Image):
                sizes.append((image.height, image.width))
                continue
            try:
                with Image.open(self._image_path(r)) as im:
                    sizes.append((im.height, im.width))
            except (OSError, _Dropped) as e:
                raise ValueError(f"record id={r.get('id')!r}: cannot read image: {e}") from None
        counts = self.processor._get_num_multimodal_tokens(image_sizes=sizes)
        _, _, extra = self._markers()  # what the count holds besides placeholders
        return [int(n) - extra for n in counts["num_image_tokens"]]

    def sequence_lengths(self, records: Sequence[dict[str, Any]], batch_size: int = 256) -> list[int]:
        """Token count (image tokens included) of each record as this collator would build it."""
        lengths: list[int] = []
        for i in range(0, len(records), batch_size):
            chunk = records[i : i + batch_size]
            n_image = self._n_image_tokens() if self._fixed else self._counts_from_sizes(chunk)
            lengths += [len(ids) for ids, _ in self._encode(chunk, n_image)]
        return lengths

    def encode_images(self, images: list) -> tuple[dict[str, Any], list[int]]:
        """The visual inputs of a batch of PIL images and each image's placeholder count.

        LLaVA-1.5 (one fixed-size image): the image processor, and the count from its output size.
        Any-resolution models (LLaVA-NeXT/OneVision, Qwen2-VL): the processor itself, on one
        placeholder per image, so that the counts (crops, newlines, merged units) and the tensors it
        returns (``image_sizes``, ``image_grid_thw``) are exactly the processor's.
        """
        if self._fixed:
            pixel_values = self.image_processor(images, return_tensors="pt")["pixel_values"]  # (B, 3, H, W)
            n = num_image_tokens(self.processor, pixel_values.shape[-2], pixel_values.shape[-1])
            return {"pixel_values": pixel_values}, [n] * len(images)
        out = self.processor(
            text=[self.image_token] * len(images), images=images, padding=True, return_tensors="pt"
        )
        counts = (out["input_ids"] == self.image_token_id).sum(dim=1).tolist()
        text_keys = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")
        self._mm_types = "mm_token_type_ids" in out  # rebuilt for the final ids (Qwen2-VL needs it)
        return {k: v for k, v in out.items() if k not in text_keys}, counts

    # ---- images -----------------------------------------------------------------------------
    def _image_path(self, record: dict[str, Any]) -> Path:
        image = record.get("image_path") or record.get("image")
        if not isinstance(image, (str, os.PathLike)) or not str(image):
            raise _Dropped(f"no image (got {image!r:.60})")
        path = Path(image)
        if not path.is_absolute() and self.image_folder is not None:
            path = self.image_folder / path
        return path

    def _load_image(self, record: dict[str, Any]):
        from PIL import Image

        image = record.get("image")
        if not isinstance(image, Image.Image):  # a PIL image in "image" wins over the loader's path
            image = record.get("image_path") or image
        if isinstance(image, Image.Image):
            return image.convert("RGB")
        path = self._image_path(record)
        try:
            with strict_decoding(), Image.open(path) as im:
                return im.convert("RGB")  # decodes the whole image: a truncated file fails here
        except Exception as e:  # PIL raises many types for corrupt files
            raise _Dropped(f"cannot read image {path}: {type(e).__name__}: {e}") from None

    def _drop(self, record: dict[str, Any], reason: str, skipped: list[RecordError]) -> None:
        rid = None if record.get("id") is None else str(record.get("id"))
        if self.on_error == "raise":
            raise LlavaDataError(
                f"record id={rid!r}: {reason} (data.on_error: skip drops such records and lists them)"
            )
        skipped.append(RecordError(None, rid, reason))

    # ---- batch ------------------------------------------------------------------------------
    def __call__(self, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
        if not records:
            raise ValueError("empty batch")
        skipped: list[RecordError] = []
        images, kept = [], []
        for r in records:
            try:
                images.append(self._load_image(r))
                kept.append(r)
            except _Dropped as e:
                self._drop(r, e.args[0], skipped)
        if not kept:
            return {"ids": [], "skipped": skipped}
        records = kept
        visual, counts = self.encode_images(images)
        encoded = self._encode(records, counts)
        lengths = [len(ids) for ids, _ in encoded]
        fits = [n <= self.max_length for n in lengths]
        for r, n, n_image in zip(records, lengths, counts):
            if n > self.max_length:
                self._drop(
                    r,
                    f"sequence of {n} tokens ({n_image} image tokens) exceeds max_length={self.max_length}. "
                    "Over-long records are rejected, not truncated: raise max_length, or drop them with "
                    "load_llava_json(..., processor=..., max_length=..., on_error='skip')",
                    skipped,
                )
        if not all(fits):  # rare (over-long records were skipped): the kept images, encoded again
            if not any(fits):
                return {"ids": [], "skipped": skipped}
            records = [r for r, ok in zip(records, fits) if ok]
            images = [im for im, ok in zip(images, fits) if ok]
            encoded = [x for x, ok in zip(encoded, fits) if ok]
            lengths = [n for n, ok in zip(lengths, fits) if ok]
            visual, _ = self.encode_images(images)
        B, T = len(records), max(lengths)
        input_ids = np.full((B, T), self.pad_token_id, dtype=np.int64)
        attention_mask = np.zeros((B, T), dtype=np.int64)
        answer_mask = np.zeros((B, T), dtype=bool)
        for b, (ids, mask) in enumerate(encoded):  # left padding
            input_ids[b, T - len(ids) :] = ids
            attention_mask[b, T - len(ids) :] = 1
            answer_mask[b, T - len(ids) :] = mask
        batch: dict[str, Any] = {
            "input_ids": torch.from_numpy(input_ids),  # (B, T)
            "attention_mask": torch.from_numpy(attention_mask),  # (B, T)
            **visual,  # pixel_values (B, 3, H, W); any-res: (B, views, 3, H, W) + image_sizes; Qwen: grids
        }
        if self._mm_types:  # the processor's modality of each token, as it marks them
            batch["mm_token_type_ids"] = torch.tensor(
                self.processor.create_mm_token_type_ids(input_ids.tolist())
            )
        ids = [str(r.get("id")) for r in records]
        if self.mode != "eval":
            labels = np.where(answer_mask, input_ids, IGNORE_INDEX)
            batch["labels"] = torch.from_numpy(labels)  # (B, T)
            batch["answer_mask"] = torch.from_numpy(answer_mask)  # (B, T)
            batch["ids"] = ids
        else:
            batch["answers"] = [_first_answer(r, required=False) for r in records]
            batch["qtypes"] = [r.get("qtype") for r in records]
            batch["ids"] = ids
            batch["neg_types"] = [r.get("neg_type") for r in records]
        if skipped:
            batch["skipped"] = skipped
        return batch


class _Dropped(Exception):
    """Internal: one record of a batch cannot be collated (reason in args[0])."""


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


def _first_answer(record: dict[str, Any], required: bool = True) -> str | None:
    for turn in record["conversations"]:
        if _ROLES.get(turn.get("from")) == "assistant":
            return turn["value"]
    if not required:
        return None
    raise ValueError(f"record id={record.get('id')!r}: no answer turn")
