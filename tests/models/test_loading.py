import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tpkit.models.loading import load_llava, resolve_dtype


def test_round_trip_and_options(tiny_llava, tmp_path):
    tiny_llava.save_pretrained(tmp_path / "m")
    m = load_llava(tmp_path / "m", dtype="float32", attn_implementation="eager")
    assert type(m).__name__ == "LlavaForConditionalGeneration"
    assert m.config.text_config._attn_implementation == "eager"
    for (k, a), b in zip(tiny_llava.state_dict().items(), m.state_dict().values()):
        assert torch.equal(a, b), k
    assert load_llava(tmp_path / "m", dtype="bfloat16").lm_head.weight.dtype == torch.bfloat16
    assert resolve_dtype("auto", "cpu") == torch.float32


def test_not_llava_like_is_a_clear_error(tmp_path):
    cfg = LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "llama")
    with pytest.raises(ValueError, match="'llama' is not LLaVA-like"):
        load_llava(tmp_path / "llama")
    with pytest.raises(ValueError, match="cannot read a model config"):
        load_llava(tmp_path / "missing")
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("int8")
