"""An offline InternVL processor, as close to the hub's as this machine allows: transformers' own
``InternVLProcessor`` over its PIL image processor (``GotOcr2ImageProcessorPil``: a grid of tiles chosen
by aspect ratio plus a thumbnail), a tokenizer trained here with InternVL's image tokens (``<img>``,
``</img>``, ``<IMG_CONTEXT>``, ``<video>``) and InternVL's chat template (ChatML; an image part renders
as ``<IMG_CONTEXT>\\n``), and a stand-in video processor.

The stand-in is the one thing that is not transformers': ``InternVLVideoProcessor`` needs torchvision,
which is not installed here, and without a video processor no ``InternVLProcessor`` can be built (its
constructor checks the class of each part, and on transformers 5.2x resolves the video part's class
through torchvision-only mappings) or loaded (``AutoVideoProcessor``). :func:`offline_video_processor`
makes transformers accept :class:`FrameVideoProcessor` in its place while it is active: each frame
resized to the tile size (PIL bicubic) and normalised as the images are, which is what InternVL's video
processor does once it has sampled the frames.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
import transformers
from PIL import Image
from transformers import processing_utils
from transformers.image_processing_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin
from transformers.video_processing_utils import BaseVideoProcessor

from tpkit.data.processor import train_tokenizer

IMAGENET_MEAN = [0.485, 0.456, 0.406]  # InternVL's image normalisation
IMAGENET_STD = [0.229, 0.224, 0.225]
MARKERS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}  # ids 5, 6, 7, 8: the tiny config's defaults (tpkit.models.internvl.tiny)
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{'<|im_end|>\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\\n' }}{% endif %}"
)


class FrameVideoProcessor(BaseVideoProcessor):
    """Videos (each a list of PIL frames or an array (frames, H, W, 3)) -> ``pixel_values_videos``
    (videos, frames, 3, S, S): every frame resized to S x S and normalised (ImageNet mean and std)."""

    model_input_names = ["pixel_values_videos"]

    def __init__(self, side: int = 448, **kwargs):
        super().__init__(**kwargs)
        self.side = side

    def __call__(self, videos, **kwargs) -> BatchFeature:
        out = []
        for video in videos:
            frames = [f if isinstance(f, Image.Image) else Image.fromarray(np.asarray(f)) for f in video]
            arrays = [
                np.asarray(f.convert("RGB").resize((self.side, self.side), Image.BICUBIC), dtype=np.float32)
                / 255
                for f in frames
            ]
            x = (np.stack(arrays) - IMAGENET_MEAN) / IMAGENET_STD  # (frames, S, S, 3)
            out.append(torch.from_numpy(x.transpose(0, 3, 1, 2).astype(np.float32)))
        return BatchFeature({"pixel_values_videos": torch.stack(out)})


@contextlib.contextmanager
def offline_video_processor() -> Iterator[None]:
    """Inside the block, transformers builds and loads InternVL processors with :class:`FrameVideoProcessor`
    as their video processor (see the module docstring)."""
    check = ProcessorMixin.check_argument_for_proper_class
    names = processing_utils._LazyAutoProcessorMapping._MAPPING_NAMES  # where sub-processors load from

    def accept(self, name, arg):
        if name == "video_processor" and isinstance(arg, FrameVideoProcessor):
            return FrameVideoProcessor
        return check(self, name, arg)

    auto = names["video_processor"]
    ProcessorMixin.check_argument_for_proper_class = accept
    names["video_processor"] = (__name__, FrameVideoProcessor.__name__)
    try:
        yield
    finally:
        ProcessorMixin.check_argument_for_proper_class = check
        names["video_processor"] = auto


def build_internvl_processor(
    image_size: int = 32, tokens_per_tile: int = 16, max_patches: int = 6, corpus=()
):
    """``InternVLProcessor`` for the tiny config (build, save and load it inside :func:`offline_video_processor`): tiles of
    ``image_size``, up to ``max_patches`` of them plus a thumbnail, ``tokens_per_tile`` placeholders each."""
    tokenizer = train_tokenizer(
        list(corpus), vocab_size=512, extra_special_tokens=MARKERS, chat_template=CHAT_TEMPLATE
    )
    cls = getattr(transformers, "GotOcr2ImageProcessorPil", None) or transformers.GotOcr2ImageProcessor
    image_processor = cls(
        size={"height": image_size, "width": image_size},
        max_patches=max_patches,  # tiles when the processor asks for them (crop_to_patches), as the hub's
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
    )
    return transformers.InternVLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=FrameVideoProcessor(image_size),
        image_seq_length=tokens_per_tile,
        chat_template=CHAT_TEMPLATE,
    )
