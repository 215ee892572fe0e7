"""Models built from configs: tiny ones match a processor; full-size architectures scale down."""

from tpkit.models.llava.tiny import build_tiny_llava
from tpkit.models.registry import architecture_kwargs
from tpkit.models.tiny import tiny_kwargs_from_processor


def test_architecture_scale_down_keeps_depth_and_tokens():
    full = architecture_kwargs("llava-1.5-7b")
    small = architecture_kwargs("llava-1.5-7b", scale_down=64)
    assert (full["hidden_size"], full["num_layers"], full["intermediate_size"]) == (4096, 32, 11008)
    assert (small["hidden_size"], small["num_layers"], small["num_heads"]) == (64, 32, 1)
    assert small["image_size"] // small["patch_size"] == 24  # 576 patches


def test_a_tiny_model_matches_its_processor():
    from tpkit.data.processor import build_processor

    processor = build_processor(image_size=48, patch_size=16)
    kw = tiny_kwargs_from_processor(processor)
    assert kw == {
        "vocab_size": len(processor.tokenizer),
        "image_token_id": 3,
        "pad_token_id": 0,
        "image_size": 48,
        "patch_size": 16,
    }
    model = build_tiny_llava(**kw)
    assert model.config.image_seq_length == 9 and model.config.text_config.vocab_size == kw["vocab_size"]
