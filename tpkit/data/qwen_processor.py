"""Offline Qwen2-VL, Qwen2.5-VL and Qwen3-VL processors: a byte-level BPE tokenizer trained locally,
Qwen2-VL's PIL image processor, a PIL video processor and Qwen's chat template.

transformers cannot build ``Qwen2VLProcessor`` without torchvision: the processor declares a video
processor, every video processor is a torchvision one, and ``ProcessorMixin`` checks each declared
part's class. :class:`OfflineQwen2VLProcessor` (and :class:`OfflineQwen2_5_VLProcessor`,
:class:`OfflineQwen3VLProcessor`) is the stock class with the declared video part left out (its
``__init__`` takes no ``video_processor``), so it builds, saves and loads anywhere, and
:class:`tpkit.data.video.QwenVideoProcessorPil` in its place, derived from the image processor and a
per-frame pixel budget (saved with the processor); everything else is stock: placeholder expansion
(``<|image_pad|>`` / ``<|video_pad|>`` repeated once per merged 2 x 2 unit; Qwen3-VL's per-frame
timestamps and markers), ``image_grid_thw``, ``video_grid_thw``, Qwen2.5-VL's ``second_per_grid_ts``,
``mm_token_type_ids``, the chat template's ``<|vision_start|>`` / ``<|vision_end|>``.

It registers itself with ``AutoProcessor`` when this module is imported (``tpkit.models.load_processor``
imports it), so a saved directory loads back with either::

    from tpkit.data.qwen_processor import build_qwen2_vl_processor
    processor = build_qwen2_vl_processor(corpus=texts)  # deterministic for a given corpus
    processor.save_pretrained("DIR")
    AutoProcessor.from_pretrained("DIR")                # after importing tpkit.data.qwen_processor
    tpkit.models.load_processor("DIR")

Tokenizer: byte-level BPE as Qwen2's (any text encodes, no ``<unk>``; decoding is lossless), trained
on the given corpus plus the chat template's own words; Qwen's special tokens are added after the
learned vocabulary, at the top of the id range as in the real one, and have fixed relative order
(:data:`SPECIAL_TOKENS`). No BOS (Qwen prepends none); ``<|im_end|>`` ends a turn and is the EOS;
``<|endoftext|>`` pads, on the left.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from transformers import (
    AutoProcessor,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen2_5_VLProcessor,
    Qwen2VLProcessor,
    Qwen3VLProcessor,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from tpkit.data.processor import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from tpkit.data.video import QwenVideoProcessorPil

__all__ = [
    "OfflineQwen2VLProcessor",
    "OfflineQwen2_5_VLProcessor",
    "OfflineQwen3VLProcessor",
    "build_qwen2_vl_processor",
    "model_token_ids",
    "train_byte_level_tokenizer",
    "QWEN2_VL_CHAT_TEMPLATE",
    "SPECIAL_TOKENS",
]

PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = (
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# Qwen2-VL's own special tokens, in its order; ids follow the learned vocabulary in this order
SPECIAL_TOKENS = [PAD, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD]

# Qwen2-VL-Instruct's chat template as published: a default system prompt, ChatML turns, an image part
# rendered as <|vision_start|><|image_pad|><|vision_end|> (the processor repeats <|image_pad|> to the
# image's merged-unit count).
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# the template's own words, so that they are single tokens whatever the corpus
_TEMPLATE_LINES = ["system\nYou are a helpful assistant.\n", "user\n", "assistant\n", "Picture 1: Video 1: "]

# the keys they register under with AutoProcessor (names, not config classes: no model maps to them)
_AUTO_KEY = "tpkit_offline_qwen2_vl"
_AUTO_KEY_2_5 = "tpkit_offline_qwen2_5_vl"
_AUTO_KEY_3 = "tpkit_offline_qwen3_vl"
# transformers' Qwen2VLVideoProcessor size: the per-frame pixel budget of a video
VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS = 128 * 28 * 28, 768 * 28 * 28


def train_byte_level_tokenizer(corpus: Iterable[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on ``corpus`` + the template's words, Qwen's specials added on top.

    ``vocab_size`` bounds the learned vocabulary (256 byte symbols + merges); BPE stops earlier once
    every word of the corpus is one token. Deterministic for a given corpus.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    lines = [line for line in corpus if line] + _TEMPLATE_LINES
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer=trainer, length=len(lines))
    tok.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=PAD,
        extra_special_tokens={"image_token": IMAGE_PAD, "video_token": VIDEO_PAD},
        padding_side="left",
        model_max_length=32768,
        chat_template=QWEN2_VL_CHAT_TEMPLATE,
    )


class _OfflineParts:
    """What ``Qwen2VLProcessor.__init__`` sets, with the PIL video processor in place of the declared
    torchvision one (which ``ProcessorMixin`` would check): the mixin gets the two parts these classes
    declare, then the video part is derived from the image processor and the per-frame pixel budget
    ``video_min_pixels`` / ``video_max_pixels`` (the video processor's ``size``; transformers'
    defaults when None; saved with the processor, being ``__init__`` arguments)."""

    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        chat_template: str | None = None,
        video_min_pixels: int | None = None,
        video_max_pixels: int | None = None,
        **kwargs: Any,
    ):
        self.image_token = getattr(tokenizer, "image_token", None) or IMAGE_PAD
        self.video_token = getattr(tokenizer, "video_token", None) or VIDEO_PAD
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)
        # Qwen3-VL's processor also names the markers around each image (and each video frame)
        self.vision_start_token, self.vision_end_token = VISION_START, VISION_END
        self.vision_start_token_id = tokenizer.convert_tokens_to_ids(VISION_START)
        self.vision_end_token_id = tokenizer.convert_tokens_to_ids(VISION_END)
        self.video_min_pixels = int(video_min_pixels or VIDEO_MIN_PIXELS)
        self.video_max_pixels = int(video_max_pixels or VIDEO_MAX_PIXELS)
        self.video_processor = QwenVideoProcessorPil(
            image_processor, self.video_min_pixels, self.video_max_pixels
        )


class OfflineQwen2VLProcessor(_OfflineParts, Qwen2VLProcessor):
    """``Qwen2VLProcessor`` with its PIL image processor and, for videos, tpkit's PIL video processor
    (:class:`tpkit.data.video.QwenVideoProcessorPil`, which computes what ``Qwen2VLVideoProcessor``
    does for frames given as arrays): the same ``__call__``, chat template, placeholder expansion,
    ``image_grid_thw``, ``video_grid_thw`` and ``mm_token_type_ids`` as the stock class."""


class OfflineQwen2_5_VLProcessor(_OfflineParts, Qwen2_5_VLProcessor):
    """``Qwen2_5_VLProcessor`` as :class:`OfflineQwen2VLProcessor` is ``Qwen2VLProcessor``: the same
    parts, and Qwen2.5-VL's ``second_per_grid_ts`` for videos (temporal patch size over the sampled
    frames' rate, from the ``video_metadata`` a call passes: 24 frames per second when none)."""


class OfflineQwen3VLProcessor(_OfflineParts, Qwen3VLProcessor):
    """``Qwen3VLProcessor`` with the same parts: 16-px patches (the image processor's), and a video's
    frames each ``<t seconds><|vision_start|>...<|vision_end|>`` with the timestamp of its temporal
    patch (from the ``video_metadata`` a call passes: 24 frames per second when none), as stock writes
    them."""


AutoProcessor.register(_AUTO_KEY, OfflineQwen2VLProcessor, exist_ok=True)
AutoProcessor.register(_AUTO_KEY_2_5, OfflineQwen2_5_VLProcessor, exist_ok=True)
AutoProcessor.register(_AUTO_KEY_3, OfflineQwen3VLProcessor, exist_ok=True)


def build_qwen2_vl_processor(
    image_size: int = 96,
    patch_size: int = 14,
    merge_size: int = 2,
    temporal_patch_size: int = 2,
    corpus: Iterable[str] | None = None,
    vocab_size: int = 1024,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    video_pixels: int | None = None,
    variant: str = "qwen2-vl",
) -> OfflineQwen2VLProcessor | OfflineQwen2_5_VLProcessor:
    """Build the offline Qwen2-VL processor (deterministic for a given corpus).

    Images are resized (Qwen's ``smart_resize``) to sides that are multiples of ``patch_size *
    merge_size`` with an area in ``[min_pixels, max_pixels]`` (default: both ``image_size ** 2``, so
    every image becomes about ``image_size`` square: ``(image_size // patch_size) ** 2`` patches,
    a quarter as many merged units), normalised with OpenAI CLIP's mean/std as Qwen2-VL does, and
    cut into ``temporal_patch_size x patch_size x patch_size`` patches (an image is repeated in
    time, as stock does). ``corpus``: the tokenizer's training text (default: the template's words
    only; any text still encodes, byte by byte). Video frames are resized to about ``video_pixels``
    each (default: the image area) and cut into the same patches, ``temporal_patch_size`` frames per
    patch. ``variant``: ``"qwen2-vl"``, ``"qwen2.5-vl"`` or ``"qwen3-vl"`` (the processor class of each;
    Qwen3-VL's patches are 16 px: pass ``patch_size=16``).
    """
    classes = {
        "qwen2-vl": OfflineQwen2VLProcessor,
        "qwen2.5-vl": OfflineQwen2_5_VLProcessor,
        "qwen3-vl": OfflineQwen3VLProcessor,
    }
    if variant not in classes:
        raise ValueError(f"variant = {variant!r}: one of {', '.join(classes)}")
    if image_size % (patch_size * merge_size):
        raise ValueError(
            f"image_size = {image_size} must be a multiple of patch_size x merge_size = {patch_size * merge_size}"
        )
    area = image_size * image_size
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=patch_size,
        merge_size=merge_size,
        temporal_patch_size=temporal_patch_size,
        min_pixels=min_pixels or area,
        max_pixels=max_pixels or area,
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
    )
    tokenizer = train_byte_level_tokenizer(corpus or [], vocab_size=vocab_size)
    video = video_pixels or area
    return classes[variant](
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=QWEN2_VL_CHAT_TEMPLATE,
        video_min_pixels=video,
        video_max_pixels=video,
    )


def model_token_ids(tokenizer: Any) -> dict[str, int]:
    """The ids a ``Qwen2VLConfig`` names, from ``tokenizer``: ``image_token_id``, ``video_token_id``,
    ``vision_start_token_id``, ``vision_end_token_id``, ``pad_token_id``, ``eos_token_id``."""
    tokens = {
        "image_token_id": IMAGE_PAD,
        "video_token_id": VIDEO_PAD,
        "vision_start_token_id": VISION_START,
        "vision_end_token_id": VISION_END,
        "pad_token_id": tokenizer.pad_token,
        "eos_token_id": tokenizer.eos_token,
    }
    return {key: tokenizer.convert_tokens_to_ids(token) for key, token in tokens.items()}
