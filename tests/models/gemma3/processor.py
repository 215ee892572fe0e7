"""An offline Gemma 3 processor: transformers' own ``Gemma3Processor`` over its PIL image processor, a
tokenizer trained here with Gemma's image and turn tokens (``<start_of_image>``, ``<image_soft_token>``,
``<end_of_image>``, ``<start_of_turn>``, ``<end_of_turn>``) and Gemma's chat template (an image part
renders as ``<start_of_image>``, which the processor expands to ``\\n\\n<start_of_image>`` + the image's
soft tokens + ``<end_of_image>\\n\\n``; the assistant's turn is ``model``). The hub's tokenizer cannot be
downloaded here; everything else is the class a real checkpoint loads.
"""

from __future__ import annotations

import transformers

from tpkit.data.processor import train_tokenizer

MARKERS = {
    "image_token": "<image_soft_token>",
    "boi_token": "<start_of_image>",
    "eoi_token": "<end_of_image>",
    "sot_token": "<start_of_turn>",
    "eot_token": "<end_of_turn>",
}  # ids 5, 6, 7, 8, 9 (tpkit.data.processor.train_tokenizer puts them after its own five)
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<start_of_image>' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)


def build_gemma3_processor(image_size: int = 32, tokens_per_image: int = 16, corpus=()):
    """``Gemma3Processor`` for the tiny config: images resized to ``image_size``, ``tokens_per_image``
    soft tokens each (the model's ``mm_tokens_per_image``)."""
    tokenizer = train_tokenizer(
        list(corpus), vocab_size=512, extra_special_tokens=MARKERS, chat_template=CHAT_TEMPLATE
    )
    cls = getattr(transformers, "Gemma3ImageProcessorPil", None) or transformers.Gemma3ImageProcessor
    image_processor = cls(size={"height": image_size, "width": image_size})
    return transformers.Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_length=tokens_per_image,
        chat_template=CHAT_TEMPLATE,
    )


def model_ids(processor) -> dict:
    """The tiny config's token ids for ``processor``'s tokenizer."""
    tok = processor.tokenizer
    ids = tok.convert_tokens_to_ids
    return dict(
        vocab_size=len(tok),
        image_token_id=ids(MARKERS["image_token"]),
        boi_token_id=ids(MARKERS["boi_token"]),
        eoi_token_id=ids(MARKERS["eoi_token"]),
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
