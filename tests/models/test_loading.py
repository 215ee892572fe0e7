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
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="cannot read a model config"):
        load_llava(tmp_path / "empty")
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("int8")


def test_missing_local_directories_are_named_before_any_hub_lookup(tmp_path, monkeypatch):
    from tpkit.models.loading import load_processor, missing_local_dir, model_paths_error

    monkeypatch.chdir(tmp_path)
    (tmp_path / "assets").mkdir()
    # local by shape: relative with an existing first component, ./, absolute, no slash
    for path in ("assets/tiny-llava", "./model", str(tmp_path / "gone"), "model"):
        assert "no such directory" in missing_local_dir(path), path
    assert missing_local_dir("llava-hf/llava-1.5-7b-hf") is None  # may be a hub id
    assert missing_local_dir("assets") is None  # exists
    with pytest.raises(ValueError, match="'assets/tiny-llava': no such directory"):
        load_llava("assets/tiny-llava")
    with pytest.raises(ValueError, match="'assets/tiny-llava': no such directory"):
        load_processor("assets/tiny-llava")
    assert model_paths_error("tiny") is None and model_paths_error("tiny:qwen2") is None
    assert model_paths_error("tiny", "./proc").startswith("model.processor_path = './proc': no such")
    assert model_paths_error("assets/tiny-llava").startswith("model.path = 'assets/tiny-llava'")
