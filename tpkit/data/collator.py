"""Turn LLaVA conversation records into left-padded model batches (train: with labels; eval: prompts).

Works on plain dict records (``datasets`` rows or dicts from JSON); needs only the processor. Hub
processors whose chat template wants list-of-parts content (llava-hf's) are detected and fed parts,
image first; what such a template closes an answer with is what gets supervised (llava-hf's
LLaVA-1.5 template closes with a space, not ``</s>``).

Per sample the chat template is rendered once for the whole conversation, plus once per answer for
its prefix with the generation prompt (``... ASSISTANT:``): the answer spans are the characters
between the two, which include what the template closes an answer with (``</s>``). The batch is
tokenised in one call with character offsets; a token is an answer token when its characters
overlap an answer span. Each image token (LLaVA-JSON's ``<image>``, written as the processor's own
image token) then becomes the tokens the processor expands it to: its run of image tokens, between
the markers the processor puts around it (InternVL's ``<img>`` ... ``</img>``); likewise each video
token. That is what the processor's ``__call__`` does to the text (a test checks the ids are
identical), without tokenising hundreds of placeholders. Images go through the processor's image
processor.

A record carries no image (a text-only record), one (``image``: a path or a PIL image), several
(``image``: a list, one ``<image>`` placeholder each) and videos (``video``: a path, a
:class:`tpkit.data.video.Video` or a (frames, H, W, 3) array, or a list of them; one ``<video>``
placeholder each, the processor's ``video_token``); the processor turns them into what its model
takes (several any-res images, OneVision's base views of a multi-image sample, video frames).

Over-long sequences are rejected, never truncated (see ``tpkit.data.llava_json``), and so are
images that fail to decode at batch time (a truncated file passes the load-time header check):
``on_error="raise"`` raises ``LlavaDataError`` naming the record id; ``on_error="skip"`` drops the
record from the batch and lists it in ``batch["skipped"]`` (a batch may then be empty).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tpkit.data.errors import LlavaDataError, RecordError
from tpkit.data.labels import IGNORE_INDEX
from tpkit.data.processor import IMAGE, num_image_tokens
from tpkit.data.records import strict_decoding
from tpkit.data.video import Video, VideoError, load_video, probe_video, sample_indices

LLAVA_VIDEO = "<video>"  # the video placeholder of LLaVA-JSON records (the image's: processor.IMAGE)
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


class LlavaCollator:
    """Collate LLaVA-JSON records into model inputs.

    Train batch (``mode="train"``):
        ``input_ids`` (B, T) long, left-padded; ``attention_mask`` (B, T) long;
        ``pixel_values`` (images, 3, H, W) float (one image per sample: (B, 3, H, W); any-res and
        Qwen processors: their own layout, with ``image_sizes`` / ``image_grid_thw``; videos:
        ``pixel_values_videos`` and the processor's other video keys; none for a text-only batch);
        ``labels`` (B, T) long, ``IGNORE_INDEX`` (-100) except answer tokens
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
        max_frames, video_fps: frames a video file gives (:func:`tpkit.data.video.load_video`): at
            most ``max_frames``, evenly spaced, and at most ``video_fps`` per second when set.
    """

    def __init__(
        self,
        processor: Any,
        max_length: int = 512,
        mode: str = "train",
        system_prompt: str | None = None,
        image_folder: str | os.PathLike | None = None,
        on_error: str = "raise",
        max_frames: int = 32,
        video_fps: float | None = None,
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
        # videos: processors with a video processor (OneVision, Qwen2-VL) name their placeholder
        self.video_token = (
            getattr(processor, "video_token", None) if hasattr(processor, "video_processor") else None
        )
        self.video_token_id = (  # InternVL's processor names its video token only
            getattr(processor, "video_token_id", None)
            or self.tokenizer.convert_tokens_to_ids(self.video_token)
            if self.video_token
            else None
        )
        self.max_frames, self.video_fps = int(max_frames), video_fps
        self.pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self._bos = self.tokenizer.bos_token
        self._parts = self._content_as_parts()
        # one fixed-size image per sample (LlavaProcessor): its count needs no image
        self._fixed = type(processor).__name__ == "LlavaProcessor"
        # the processor takes the images one list per text row (Gemma 3's), not grouped by record
        self._image_rows = type(processor).__name__ == "Gemma3Processor"
        # the key under which the processor marks each token's modality (set by encode_visual): Qwen's
        # mm_token_type_ids, Gemma 3's token_type_ids (its images attend bidirectionally by them); None
        self._types_key: str | None = None
        # Qwen3-VL's processor writes each video frame as <t seconds><|vision_start|>...<|vision_end|> and
        # drops the chat template's own markers around the video (the text it collapses; None elsewhere)
        self._video_wrapper = _qwen3_video_wrapper(processor)
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
        # LLaVA-JSON's "<image>" ("<video>") is the processor's image (video) token (InternVL's
        # "<IMG_CONTEXT>", Qwen2-VL's "<|image_pad|>")
        value = value.replace(IMAGE, self.image_token)
        if self.video_token:
            value = value.replace(LLAVA_VIDEO, self.video_token)
        if not parts:
            return value  # LLaVA-JSON text as is, the placeholders inline
        # hub templates render images first, as LLaVA's own preprocessing moves "<image>" to the front
        # (and lmms-eval's own models put a request's images, then its videos, before its text)
        n_image = value.count(self.image_token)
        n_video = value.count(self.video_token) if self.video_token else 0
        if n_image or n_video:
            text = value.replace(self.image_token, "")
            text = (text.replace(self.video_token, "") if n_video else text).strip()
            visual = [{"type": "image"} for _ in range(n_image)] + [{"type": "video"} for _ in range(n_video)]
            return [*visual, {"type": "text", "text": text}]
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
        self, records: Sequence[dict[str, Any]], counts: Sequence[Counts]
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Token ids and answer mask (bool) per record, unpadded, each image (video) token replaced by
        the tokens the processor expands that image (video) to, in the text's order."""
        placeholders = [(self.image_token, self.image_token_id, "image")]
        if self.video_token:
            placeholders.append((self.video_token, self.video_token_id, "video"))
        texts, spans, spliced = [], [], []
        for r, c in zip(records, counts):
            full, sp, prompt = self._texts(r)
            text = prompt if self.mode == "eval" else full
            for token, _, what in placeholders:
                want = len(getattr(c, what))
                if text.count(token) != want:
                    raise ValueError(
                        f"record id={r.get('id')!r}: {text.count(token)} {token} placeholder(s) in the text "
                        f"but {want} {what}(s): give one placeholder per {what}"
                    )
            if self.video_token is None and c.video:
                raise ValueError(
                    f"record id={r.get('id')!r}: {len(c.video)} video(s), but {type(self.processor).__name__} "
                    "takes no videos"
                )
            if self._video_wrapper and c.video:  # Qwen3-VL: each frame is wrapped by the processor instead
                text, sp = _collapse(text, sp, self._video_wrapper, self.video_token)
            text, sp, c = self._inline(text, sp, c)
            texts.append(text)
            spans.append(np.asarray(sp, dtype=np.int64).reshape(-1, 2))
            spliced.append(c)
        add_bos = not (self._bos and all(t.startswith(self._bos) for t in texts))
        enc = self.tokenizer(
            texts, add_special_tokens=add_bos, return_offsets_mapping=True, return_attention_mask=False
        )
        out = []
        for r, ids, offsets, sp, c in zip(records, enc["input_ids"], enc["offset_mapping"], spans, spliced):
            ids = np.asarray(ids, dtype=np.int64)  # (L,)
            off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)  # (L, 2) character spans
            # a token belongs to an answer when its characters overlap a span; (0, 0) specials never do
            mask = ((off[:, None, 1] > sp[None, :, 0]) & (off[:, None, 0] < sp[None, :, 1])).any(1)
            # the placeholder tokens left to splice: the tokens starting where they stand in the text
            starts = {
                int(o): k
                for k, o in enumerate(off[:, 0])
                if ids[k] in (self.image_token_id, self.video_token_id)
            }
            if not set(c) <= set(starts):
                raise ValueError(
                    f"record id={r.get('id')!r}: {self.image_token} (or {self.video_token}) is not a single "
                    "token of this tokenizer"
                )
            runs = {starts[at]: run for at, run in c.items()}  # token position -> the tokens it becomes
            # splice each placeholder's run in, as the processor does on the text (the placeholder is
            # a special token: its neighbours are unchanged); the runs are prompt, never answer
            pieces, answer, last = [], [], 0
            for at in sorted(runs):
                pieces += [ids[last:at], runs[at]]
                answer += [mask[last:at], np.zeros(len(runs[at]), dtype=bool)]
                last = at + 1
            pieces.append(ids[last:])
            answer.append(mask[last:])
            out.append((np.concatenate(pieces), np.concatenate(answer)))
        return out

    def _n_image_tokens(self) -> int:
        """Image tokens per sample from the image processor's output size (no image needed)."""
        ip = self.image_processor
        size = ip.crop_size if getattr(ip, "do_center_crop", False) else ip.size
        if not size or "height" not in size:
            raise ValueError(f"cannot tell the image size from the image processor (size={size})")
        return num_image_tokens(self.processor, size["height"], size["width"])

    def _inline(
        self, text: str, spans: list[tuple[int, int]], counts: Counts
    ) -> tuple[str, list[tuple[int, int]], dict[int, np.ndarray]]:
        """The runs that hold ordinary text (InternVL's ``Frame1: <img>...`` for a video) written into
        the text in place of their placeholder, as the processor writes them (the tokenizer then reads
        the text around them as it reads the processor's), the answer spans shifted to match; the runs
        of added tokens only (placeholders, markers) are left to splice in as ids (the placeholder's
        neighbours tokenise the same either way). Returns (text, spans, {character position of a
        placeholder left in the text: its run})."""
        added = set(self.tokenizer.added_tokens_decoder)
        edits: list[tuple[int, int, str | np.ndarray]] = []  # (position, length replaced, text or run)
        for token, runs in ((self.image_token, counts.image), (self.video_token, counts.video)):
            places = [i for i in range(len(text)) if runs and text.startswith(token, i)]
            for at, run in zip(places, runs):
                written = set(run.tolist()) <= added
                edits.append((at, len(token), run if written else self.tokenizer.decode(run.tolist())))
        splices: dict[int, np.ndarray] = {}
        shift = 0
        for at, n, new in sorted(edits, key=lambda e: e[0]):
            if isinstance(new, np.ndarray):
                splices[at + shift] = new
                continue
            text = text[: at + shift] + new + text[at + shift + n :]
            spans = [
                (a + len(new) - n, b + len(new) - n) if a >= at + shift + n else (a, b) for a, b in spans
            ]
            shift += len(new) - n
        return text, spans, splices

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

    def _counts_from_sizes(self, records: Sequence[dict[str, Any]]) -> list[Counts]:
        """What each record's placeholders become, without decoding it, as the processor expands them:
        one image's run from its size (read from the file header; the processor's markers around
        it); several images and videos by the processor itself on blank images (videos) of their
        sizes (frame counts: read from the container), since OneVision counts the images of a
        multi-image sample otherwise and not every transformers version counts videos from sizes."""
        single: list[tuple[int, tuple[int, int]]] = []
        out: list[Counts | None] = [None] * len(records)
        for k, r in enumerate(records):
            sizes = [self._image_size(r, source) for source in self._image_sources(r)]
            videos = [self._blank_video(r, v) for v in self._video_sources(r)]
            if len(sizes) == 1 and not videos:
                single.append((k, sizes[0]))
            elif not sizes and not videos:
                out[k] = Counts([], [])
            else:
                from PIL import Image

                blank_images = [Image.new("RGB", (w, h)) for h, w in sizes]
                out[k] = self.encode_visual([blank_images], [videos])[1][0]
        if single:
            before, after, extra = self._markers()  # extra: what the count holds besides placeholders
            got = self.processor._get_num_multimodal_tokens(image_sizes=[size for _, size in single])
            for (k, _), n in zip(single, got["num_image_tokens"]):
                run = np.asarray(before + [self.image_token_id] * (int(n) - extra) + after, dtype=np.int64)
                out[k] = Counts([run], [])
        return out  # type: ignore[return-value]

    def _image_size(self, record: dict[str, Any], source: Any) -> tuple[int, int]:
        """(height, width) of an image source (a file: read from its header)."""
        from PIL import Image

        if isinstance(source, Image.Image):
            return source.height, source.width
        try:
            with Image.open(self._image_path(record, source)) as im:
                return im.height, im.width
        except (OSError, _Dropped) as e:
            raise ValueError(f"record id={record.get('id')!r}: cannot read image: {e}") from None

    def _video_plan(
        self, record: dict[str, Any], video: Any
    ) -> tuple[list[int], int, int, int, float | None]:
        """(sampled frame indices, height, width, frames in the file, its frame rate) of a video source
        as the collator will sample it, a file's read from its container without decoding."""
        if isinstance(video, Video):
            _, height, width = video.frames.shape[:3]
            return list(video.frames_indices), height, width, video.total_num_frames, video.fps
        if isinstance(video, np.ndarray):
            n, height, width = video.shape[:3]
            return list(range(n)), height, width, n, None
        try:
            total, height, width, rate = probe_video(self._image_path(record, video))
        except (VideoError, _Dropped) as e:
            raise ValueError(f"record id={record.get('id')!r}: {e}") from None
        return (
            sample_indices(total, self.max_frames, self.video_fps, rate).tolist(),
            height,
            width,
            total,
            rate,
        )

    def _blank_video(self, record: dict[str, Any], video: Any) -> Video:
        """A video source as the collator will sample it (:meth:`_video_plan`), its frames black where they
        are not decoded yet: the processor counts its tokens, and Qwen3-VL writes each frame's time."""
        if isinstance(video, Video):
            return video
        indices, height, width, total, rate = self._video_plan(record, video)
        frames = (
            video if isinstance(video, np.ndarray) else np.zeros((len(indices), height, width, 3), np.uint8)
        )
        return Video(frames, total, rate, indices)

    def sequence_lengths(self, records: Sequence[dict[str, Any]], batch_size: int = 256) -> list[int]:
        """Token count (image tokens included) of each record as this collator would build it."""
        lengths: list[int] = []
        for i in range(0, len(records), batch_size):
            chunk = records[i : i + batch_size]
            if self._fixed:
                run = np.full(self._n_image_tokens(), self.image_token_id, dtype=np.int64)
                counts = [Counts([run] * len(self._image_sources(r)), []) for r in chunk]
            else:
                counts = self._counts_from_sizes(chunk)
            lengths += [len(ids) for ids, _ in self._encode(chunk, counts)]
        return lengths

    def encode_visual(
        self, images: list[list], videos: list[list[Video]]
    ) -> tuple[dict[str, Any], list[Counts]]:
        """The visual inputs of a batch and what each record's placeholders become: ``images[b]`` the
        PIL images of record b, ``videos[b]`` its videos (either may be empty: a text-only record).

        LLaVA-1.5 (one fixed-size image): the image processor, and the run's length from its output
        size. The other processors: the processor itself, on one placeholder per image and per video
        (record after record, each record's images, then its videos: the order they take in its
        prompt; the images grouped by record, so that OneVision knows a multi-image sample, or one per
        row where the processor asks for it: Gemma 3's), so that
        the runs (crops, newlines, merged units, pooled frames, InternVL's markers) and the tensors
        (``image_sizes``, ``batch_num_images``, ``image_grid_thw``, ``pixel_values_videos``,
        ``video_grid_thw``, ``second_per_grid_ts``; InternVL's tiles in prompt order) are exactly the
        processor's.
        """
        flat = [im for ims in images for im in ims]
        clips = [v for vs in videos for v in vs]
        if self._fixed:
            if clips:
                raise ValueError(f"{type(self.processor).__name__} takes no videos")
            if not flat:
                return {}, [Counts([], []) for _ in images]
            pixel_values = self.image_processor(flat, return_tensors="pt")["pixel_values"]  # (N, 3, H, W)
            n = num_image_tokens(self.processor, pixel_values.shape[-2], pixel_values.shape[-1])
            run = np.full(n, self.image_token_id, dtype=np.int64)
            return {"pixel_values": pixel_values}, [Counts([run] * len(ims), []) for ims in images]
        if not flat and not clips:
            return {}, [Counts([], []) for _ in images]
        if clips and self.video_token is None:
            raise ValueError(f"{type(self.processor).__name__} takes no videos (it has no video processor)")
        kw: dict[str, Any] = {}
        if flat:  # Gemma 3's processor checks each text row's images against its placeholders: one each
            kw["images"] = [[im] for im in flat] if self._image_rows else [ims for ims in images if ims]
        if clips:
            kw["videos"] = [v.frames for v in clips]
            kw["video_metadata"] = [v.metadata() for v in clips]
        text = [
            t
            for ims, vs in zip(images, videos)
            for t in [self.image_token] * len(ims) + [self.video_token] * len(vs)
        ]
        out = self.processor(text=text, padding=True, return_tensors="pt", add_special_tokens=False, **kw)
        # (images + videos, L), left-padded: row i is what its placeholder becomes
        rows = iter(ids[mask.bool()].numpy() for ids, mask in zip(out["input_ids"], out["attention_mask"]))
        counts = [
            Counts([next(rows) for _ in ims], [next(rows) for _ in vs]) for ims, vs in zip(images, videos)
        ]
        text_keys = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")
        # rebuilt for the final ids: Qwen2-VL's M-RoPE needs them, Gemma 3's image attention too. A plain
        # tokenizer's token_type_ids (segment ids, all 0 here) mark nothing and are left out
        if "mm_token_type_ids" in out:
            self._types_key = "mm_token_type_ids"
        elif "token_type_ids" in out and bool(out["token_type_ids"].any()):
            self._types_key = "token_type_ids"
        return {k: v for k, v in out.items() if k not in text_keys}, counts

    # ---- images and videos ------------------------------------------------------------------
    def _image_sources(self, record: dict[str, Any]) -> list[Any]:
        """The record's images as given (paths or PIL images): none, one, or a list."""
        from PIL import Image

        image = record.get("image")
        if isinstance(image, (list, tuple)):
            return list(image)
        if not isinstance(image, Image.Image):  # a PIL image in "image" wins over the loader's path
            image = record.get("image_path") or image
        return [] if image is None or image == "" else [image]

    def _video_sources(self, record: dict[str, Any]) -> list[Any]:
        """The record's videos as given (paths, :class:`Video` s or (F, H, W, 3) arrays)."""
        video = record.get("video")
        if video is None:
            return []
        return list(video) if isinstance(video, (list, tuple)) else [video]

    def _image_path(self, record: dict[str, Any], source: Any) -> Path:
        if not isinstance(source, (str, os.PathLike)) or not str(source):
            raise _Dropped(f"no image (got {source!r:.60})")
        path = Path(source)
        if not path.is_absolute() and self.image_folder is not None:
            path = self.image_folder / path
        return path

    def _load_images(self, record: dict[str, Any]) -> list:
        """The record's images, decoded (RGB)."""
        from PIL import Image

        out = []
        for source in self._image_sources(record):
            if isinstance(source, Image.Image):
                out.append(source.convert("RGB"))
                continue
            path = self._image_path(record, source)
            try:
                with strict_decoding(), Image.open(path) as im:
                    out.append(im.convert("RGB"))  # decodes the whole image: a truncated file fails here
            except Exception as e:  # PIL raises many types for corrupt files
                raise _Dropped(f"cannot read image {path}: {type(e).__name__}: {e}") from None
        return out

    def _load_videos(self, record: dict[str, Any]) -> list[Video]:
        """The record's videos as sampled frames (a file: :func:`tpkit.data.video.load_video`)."""
        out = []
        for source in self._video_sources(record):
            if isinstance(source, Video):
                out.append(source)
            elif isinstance(source, np.ndarray):
                n = source.shape[0]
                out.append(Video(source, n, None, list(range(n))))
            else:
                path = self._image_path(record, source)
                try:
                    out.append(load_video(path, self.max_frames, self.video_fps))
                except VideoError as e:
                    raise _Dropped(str(e)) from None
        return out

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
        images, videos, kept = [], [], []
        for r in records:
            try:
                images.append(self._load_images(r))
                videos.append(self._load_videos(r))
                kept.append(r)
            except _Dropped as e:
                self._drop(r, e.args[0], skipped)
        if not kept:
            return {"ids": [], "skipped": skipped}
        records = kept
        visual, counts = self.encode_visual(images, videos)
        encoded = self._encode(records, counts)
        lengths = [len(ids) for ids, _ in encoded]
        fits = [n <= self.max_length for n in lengths]
        for r, n, c in zip(records, lengths, counts):
            if n > self.max_length:
                self._drop(
                    r,
                    f"sequence of {n} tokens ({c.describe()}) exceeds "
                    f"max_length={self.max_length}. Over-long records are rejected, not truncated: raise "
                    "max_length, or drop them with load_llava_json(..., processor=..., max_length=..., "
                    "on_error='skip')",
                    skipped,
                )
        if not all(fits):  # rare (over-long records were skipped): the kept visuals, encoded again
            if not any(fits):
                return {"ids": [], "skipped": skipped}
            keep = lambda xs: [x for x, ok in zip(xs, fits) if ok]  # noqa: E731
            records, images, videos, encoded, lengths = map(keep, (records, images, videos, encoded, lengths))
            visual, _ = self.encode_visual(images, videos)
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
            # pixel_values (images, 3, H, W); any-res: (images, views, 3, H, W) + image_sizes; Qwen: grids;
            # videos: pixel_values_videos (+ grids); a text-only batch: none
            **visual,
        }
        if self._types_key:  # the processor's modality of each token, as it marks them
            batch[self._types_key] = torch.tensor(self.processor.create_mm_token_type_ids(input_ids.tolist()))
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


def _qwen3_video_wrapper(processor: Any) -> str | None:
    """``<|vision_start|><|video_pad|><|vision_end|>`` for a Qwen3-VL-style processor (Qwen3-VL's and
    Qwen3.5's), else None."""
    from transformers import Qwen3VLProcessor

    if not isinstance(processor, Qwen3VLProcessor):
        return None
    return f"{processor.vision_start_token}{processor.video_token}{processor.vision_end_token}"


def _collapse(
    text: str, spans: list[tuple[int, int]], wrapper: str, token: str
) -> tuple[str, list[tuple[int, int]]]:
    """``text`` with every ``wrapper`` replaced by ``token``, the character spans after each moved back."""
    cut = len(wrapper) - len(token)
    at = [i for i in range(len(text)) if text.startswith(wrapper, i)]
    for a in reversed(at):
        text = text[:a] + token + text[a + len(wrapper) :]
        spans = [
            (x - cut if x >= a + len(wrapper) else x, y - cut if y >= a + len(wrapper) else y)
            for x, y in spans
        ]
    return text, spans


@dataclass
class Counts:
    """What one record's placeholders become: the token ids (L,) of each image's and each video's
    run, in the text's order (placeholders, and the processor's markers around them)."""

    image: list[np.ndarray]
    video: list[np.ndarray]

    def describe(self) -> str:
        video = f", {sum(len(v) for v in self.video)} video tokens" if self.video else ""
        return f"{sum(len(i) for i in self.image)} image tokens{video}"


class _Dropped(Exception):
    """Internal: one record of a batch cannot be collated (reason in args[0])."""


def _first_answer(record: dict[str, Any], required: bool = True) -> str | None:
    for turn in record["conversations"]:
        if _ROLES.get(turn.get("from")) == "assistant":
            return turn["value"]
    if not required:
        return None
    raise ValueError(f"record id={record.get('id')!r}: no answer turn")
