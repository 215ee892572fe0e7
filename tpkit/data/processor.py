"""Offline processors: a BPE tokenizer trained locally plus a CLIP image processor (LLaVA-1.5), an
any-res one (LLaVA-NeXT), or OneVision's with a video processor.

No tokenizer or processor can be downloaded where tpkit is built, so tiny models get one trained
locally on a text corpus (the synthetic benchmark passes its own; by default a few template lines).
The result is a stock ``transformers.LlavaProcessor`` that ``save_pretrained``/``from_pretrained``
round-trips, so everything downstream (collator, export, evaluation) treats it exactly like a hub
processor such as ``llava-hf/llava-1.5-7b-hf``.

Tokenizer: SentencePiece-style BPE (``Metaspace`` pre-tokenisation: split on spaces, ``▁`` marks a
word start), which decodes losslessly, so an answer's tokens decode back to the answer string. The
printable ASCII characters and ``\\n`` are always in the vocabulary, so any ASCII text encodes
without ``<unk>``. Training is deterministic (same corpus -> same vocabulary and merges).
"""

from __future__ import annotations

import importlib.util
import string
from collections.abc import Iterable
from typing import Any

import transformers
from transformers import AutoProcessor, LlavaProcessor, PreTrainedTokenizerFast

from tpkit.data.video import OnevisionVideoProcessorPil

PAD, BOS, EOS, IMAGE, UNK = "<pad>", "<s>", "</s>", "<image>", "<unk>"
VIDEO = "<video>"  # OneVision's video placeholder: added after the learned vocabulary
SPECIAL_TOKENS = [PAD, BOS, EOS, IMAGE, UNK]  # ids 0, 1, 2, 3, 4 (in this order)
PAD_ID, BOS_ID, EOS_ID, IMAGE_ID, UNK_ID = range(5)

# One sentence: stage 2 may prune the system prompt, so it must exist, but it should stay short.
DEFAULT_SYSTEM_PROMPT = "A chat between a user and an assistant who answers questions about an image."

OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# LLaVA-1.5 ("vicuna_v1") layout:
#   {system} USER: <image>\n{question} ASSISTANT: {answer}</s>USER: {q2} ASSISTANT: {a2}</s>
# Messages use the Hugging Face format: content is a string (LLaVA-JSON turns, "<image>" inline) or a
# list of {"type": "image"} / {"type": "text", "text": ...} parts (images are rendered first, as
# llava-hf does). A leading system message replaces the default system prompt ("" removes it).
# The assistant answer and its "</s>" sit in a {% generation %} block, so
# apply_chat_template(..., return_assistant_tokens_mask=True) marks exactly the supervised tokens.
CHAT_TEMPLATE = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- else -%}"
    "{%- for part in content if part['type'] == 'image' -%}{{ '<image>\\n' }}{%- endfor -%}"
    "{%- for part in content if part['type'] == 'text' -%}{{ part['text'] }}{%- endfor -%}"
    "{%- endif -%}"
    "{%- endmacro -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = render(messages[0]['content']) -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}"
    "{%- set system = '" + DEFAULT_SYSTEM_PROMPT + "' -%}{%- set turns = messages -%}"
    "{%- endif -%}"
    "{{ system }}"
    "{%- for message in turns -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- if loop.first and system -%}{{ ' ' }}{%- endif -%}"
    "{{ 'USER: ' + render(message['content']) }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ ' ASSISTANT: ' }}{%- generation -%}{{ render(message['content']) + '</s>' }}{%- endgeneration -%}"
    "{%- else -%}"
    "{{ raise_exception('unsupported role ' + message['role'] + ': expected user/assistant') }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ ' ASSISTANT:' }}{%- endif -%}"
)

# Lines that make the template's own words single tokens even if the corpus lacks them.
_TEMPLATE_LINES = [
    DEFAULT_SYSTEM_PROMPT,
    "USER: <image>\nWhat is in the image? ASSISTANT: yes</s>USER: And then? ASSISTANT: no</s>",
]
_ALPHABET = sorted(set(string.printable) - set(string.whitespace) | {"\n"})


def train_tokenizer(
    corpus: Iterable[str],
    vocab_size: int = 512,
    extra_special_tokens: dict[str, str] | None = None,
    chat_template: str = CHAT_TEMPLATE,
) -> PreTrainedTokenizerFast:
    """Train the BPE tokenizer on ``corpus`` (strings) and wrap it with ``chat_template``.

    Specials: ``<pad>``=0, ``<s>``=1, ``</s>``=2, ``<image>``=3, ``<unk>``=4, then the values of
    ``extra_special_tokens`` (5, 6, ... in order), each also an attribute of the tokenizer under its key
    (a processor's named tokens, e.g. InternVL's ``start_image_token: "<img>"``). ``<s>`` is prepended to
    every encoded text (as Llama does); padding is on the left.
    """
    extra = dict(extra_special_tokens or {})
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    lines = [line for line in corpus if line] + _TEMPLATE_LINES
    tok = Tokenizer(models.BPE(unk_token=UNK))
    # "\n" is a token of its own (LLaVA puts one after <image>), then SentencePiece-style words.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split("\n", behavior="isolated"),
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True),
        ]
    )
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS + list(extra.values()),
        initial_alphabet=_ALPHABET,
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer=trainer, length=len(lines))
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, BOS_ID)]
    )
    for name, idx in zip(SPECIAL_TOKENS + list(extra.values()), range(5 + len(extra))):
        if tok.token_to_id(name) != idx:  # guards the contract's fixed ids
            raise RuntimeError(f"special token {name} got id {tok.token_to_id(name)}, expected {idx}")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        extra_special_tokens={"image_token": IMAGE, **extra},
        padding_side="left",
        model_max_length=4096,
        chat_template=chat_template,
    )


def clip_image_processor_class() -> type:
    """transformers' ``CLIPImageProcessor``: its torchvision backend where torchvision is installed,
    else its PIL backend ``CLIPImageProcessorPil`` - the class ``LlavaProcessor.from_pretrained`` picks
    too, named directly so that transformers does not warn about the fallback on every command."""
    if importlib.util.find_spec("torchvision") is None and hasattr(transformers, "CLIPImageProcessorPil"):
        return transformers.CLIPImageProcessorPil
    return transformers.CLIPImageProcessor


def build_image_processor(image_size: int = 96) -> Any:
    """CLIP preprocessing at ``image_size``: resize the short side, centre-crop, OpenAI CLIP mean/std."""
    return clip_image_processor_class()(
        do_resize=True,
        size={"shortest_edge": image_size},
        do_center_crop=True,
        crop_size={"height": image_size, "width": image_size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
        do_convert_rgb=True,
        resample=3,  # bicubic, as CLIP
    )


def build_processor(
    image_size: int = 96,
    patch_size: int = 8,
    corpus: Iterable[str] | None = None,
    vocab_size: int = 512,
) -> LlavaProcessor:
    """Build the offline ``LlavaProcessor`` (deterministic for a given corpus).

    ``corpus``: training text for the tokenizer; by default only the chat template's own lines, so that
    any ASCII text encodes (the synthetic benchmark passes its questions and answers).
    ``<image>`` expands to ``(image_size // patch_size) ** 2`` tokens (CLS dropped: LLaVA's
    ``vision_feature_select_strategy="default"`` with ``num_additional_image_tokens=1``).
    ``vocab_size`` is an upper bound: BPE stops once every corpus word is a single token.
    """
    if image_size % patch_size:
        raise ValueError(f"image_size={image_size} is not a multiple of patch_size={patch_size}")
    tokenizer = train_tokenizer(corpus or [], vocab_size=vocab_size)
    return LlavaProcessor(
        image_processor=build_image_processor(image_size),
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE,
    )


def build_next_processor(
    image_size: int = 32,
    patch_size: int = 8,
    pinpoints: list[list[int]] | None = None,
    corpus: Iterable[str] | None = None,
    vocab_size: int = 512,
) -> Any:
    """An offline ``LlavaNextProcessor`` (any-res crops of ``image_size`` on the ``pinpoints`` grid,
    default 1x2, 2x1, 2x2) with the same tokenizer and chat template as :func:`build_processor`; it
    matches :func:`tpkit.models.llava_next.tiny.tiny_next_config`."""
    cls = getattr(transformers, "LlavaNextImageProcessorPil", None)
    if cls is None or importlib.util.find_spec("torchvision") is not None:
        cls = transformers.LlavaNextImageProcessor
    s = image_size
    image_processor = cls(
        size={"shortest_edge": s},
        crop_size={"height": s, "width": s},
        image_grid_pinpoints=pinpoints or [[s, 2 * s], [2 * s, s], [2 * s, 2 * s]],
        do_center_crop=True,
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
    )
    return transformers.LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=train_tokenizer(corpus or [], vocab_size=vocab_size),
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE,
    )


class OfflineLlavaOnevisionProcessor(transformers.LlavaOnevisionProcessor):
    """``LlavaOnevisionProcessor`` whose video processor is :class:`tpkit.data.video.OnevisionVideoProcessorPil`
    (transformers' own needs torchvision): the same ``__call__``, placeholder counts (any-res images,
    base views of a multi-image sample, pooled frames plus a newline per video), ``batch_num_images``
    and ``pixel_values_videos``. The video part is not saved: it is derived from the image processor
    (frames resized to its ``size``, its mean and std), as OneVision's video processor is configured."""

    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        num_image_tokens: int | None = None,
        vision_feature_select_strategy: str | None = None,
        chat_template: str | None = None,
        image_token: str = IMAGE,
        video_token: str = VIDEO,
        vision_aspect_ratio: str = "anyres_max_9",
        **kwargs: Any,
    ):
        # LlavaOnevisionProcessor.__init__ would hand a video processor to ProcessorMixin, which checks
        # its class: set what it sets, and give the mixin the two parts this class declares
        self.num_image_tokens = num_image_tokens
        self.vision_feature_select_strategy = vision_feature_select_strategy
        self.image_token, self.video_token = image_token, video_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(video_token)
        self.vision_aspect_ratio = vision_aspect_ratio
        transformers.ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)
        self.video_processor = OnevisionVideoProcessorPil(image_processor)


AutoProcessor.register("tpkit_offline_llava_onevision", OfflineLlavaOnevisionProcessor, exist_ok=True)


def build_onevision_processor(
    image_size: int = 32,
    patch_size: int = 8,
    max_tiles: int = 3,
    vision_aspect_ratio: str = "anyres_max_9",
    corpus: Iterable[str] | None = None,
    vocab_size: int = 512,
) -> OfflineLlavaOnevisionProcessor:
    """An offline LLaVA-OneVision processor matching
    :func:`tpkit.models.llava_next.tiny.tiny_onevision_config` with the same keywords: any-res crops
    of ``image_size`` up to ``max_tiles`` x ``max_tiles``, a SigLIP tower (every patch a feature:
    strategy "full"), frames resized to ``image_size``; the tokenizer of :func:`build_processor` with
    ``<video>`` added after its vocabulary (the model's ``video_token_id`` is then
    ``processor.video_token_id``)."""
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    if image_size % patch_size:
        raise ValueError(f"image_size={image_size} is not a multiple of patch_size={patch_size}")
    tokenizer = train_tokenizer(corpus or [], vocab_size=vocab_size)
    tokenizer.add_tokens([VIDEO], special_tokens=True)
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": image_size, "width": image_size},
        # every rows x cols tiling up to max_tiles, as OneVision's config lists them
        image_grid_pinpoints=[
            [image_size * i, image_size * j] for i in range(1, max_tiles + 1) for j in range(1, max_tiles + 1)
        ],
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
    )
    return OfflineLlavaOnevisionProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        num_image_tokens=(image_size // patch_size) ** 2,
        vision_feature_select_strategy="full",
        chat_template=CHAT_TEMPLATE,
        vision_aspect_ratio=vision_aspect_ratio,
    )


def num_image_tokens(processor: LlavaProcessor, height: int, width: int) -> int:
    """How many ``<image>`` tokens ``processor`` expands one (preprocessed) image of this size into."""
    n = (height // processor.patch_size) * (width // processor.patch_size)
    n += processor.num_additional_image_tokens or 0
    if processor.vision_feature_select_strategy == "default":
        n -= 1
    return n
