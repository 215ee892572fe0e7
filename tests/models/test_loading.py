import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tpkit.models.loading import load_pretrained, resolve_dtype


def test_round_trip_and_options(tiny_llava, tmp_path):
    tiny_llava.save_pretrained(tmp_path / "m")
    m = load_pretrained(tmp_path / "m", dtype="float32", attn_implementation="eager")
    assert type(m).__name__ == "LlavaForConditionalGeneration"
    assert m.config.text_config._attn_implementation == "eager"
    for (k, a), b in zip(tiny_llava.state_dict().items(), m.state_dict().values()):
        assert torch.equal(a, b), k
    assert load_pretrained(tmp_path / "m", dtype="bfloat16").lm_head.weight.dtype == torch.bfloat16
    assert resolve_dtype("auto", "cpu") == torch.float32


@pytest.mark.parametrize("kind", ["next", "ov"])
def test_every_family_loads_from_a_save_pretrained_directory(kind, tmp_path):
    from tests.models.llava_next.test_family import build

    model = build(kind)
    model.save_pretrained(tmp_path / "m")
    loaded = load_pretrained(tmp_path / "m", dtype="float32")
    assert type(loaded) is type(model)
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k


def test_not_llava_like_is_a_clear_error(tmp_path):
    cfg = LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "llama")
    with pytest.raises(
        ValueError, match="'llama' .* is not a family tpkit prunes; supported: .*LlavaForCond"
    ):
        load_pretrained(tmp_path / "llama")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="cannot read a model config"):
        load_pretrained(tmp_path / "empty")
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("int8")


def test_missing_local_directories_are_named_before_any_hub_lookup(tmp_path, monkeypatch):
    from tpkit.models.config import ModelConfig, parse_model_path
    from tpkit.models.loading import load_processor

    monkeypatch.chdir(tmp_path)
    (tmp_path / "assets").mkdir()
    # local by shape: relative with an existing first component, ./, ../, absolute, no slash, two slashes
    for path in (
        "assets/tiny-llava",
        "./model",
        "../model",
        str(tmp_path / "gone"),
        "model",
        "runs/x/export",
    ):
        assert "no such directory" in parse_model_path(path).missing(), path
    assert f"(relative to the current directory {tmp_path})" in parse_model_path("runs/x/export").missing()
    assert "hub id, which looks like 'org/name'" in parse_model_path("runs/x/export").missing()
    assert parse_model_path("llava-hf/llava-1.5-7b-hf").kind == "hub"  # may be a hub id
    assert parse_model_path("assets").missing() is None  # exists
    assert parse_model_path("tiny:qwen2").name == "qwen2" and parse_model_path("tiny").name == "llama"
    with pytest.raises(ValueError, match="tiny backbone must be one of"):
        parse_model_path("tiny:gpt2")
    with pytest.raises(ValueError, match="'assets/tiny-llava': no such directory"):
        load_pretrained("assets/tiny-llava")
    with pytest.raises(ValueError, match="'assets/tiny-llava': no such directory"):
        load_processor("assets/tiny-llava")
    assert ModelConfig("tiny").missing_paths() is None and ModelConfig("tiny:qwen2").missing_paths() is None
    assert (
        ModelConfig("tiny", "./proc").missing_paths().startswith("model.processor_path = './proc': no such")
    )
    assert ModelConfig("assets/tiny-llava").missing_paths().startswith("model.path = 'assets/tiny-llava'")


def test_a_hub_id_with_no_network_fails_after_one_check(tmp_path, unreachable_hub):
    """HF_HUB_OFFLINE unset and the hub out of reach (its endpoint a closed local port): one check of
    the endpoint, then an error that says so, not huggingface_hub's five retries."""
    import subprocess
    import sys

    env, endpoint = unreachable_hub
    code = (
        "import time; from tpkit.models import load_model; t = time.perf_counter()\n"
        "try:\n    load_model('someorg/somemodel')\nexcept ValueError as e:\n"
        "    print(f'{time.perf_counter() - t:.1f}'); print(e)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 2, out.stdout + out.stderr[-2000:]
    assert "Retry" not in out.stderr, out.stderr[-2000:]
    assert lines[1].startswith(
        f"'someorg/somemodel': not a directory here ({tmp_path / 'someorg' / 'somemodel'})"
    )
    assert f"the hub cannot be reached ({endpoint}: " in lines[1] and "refused" in lines[1]
    assert float(lines[0]) < 10.0  # one refused connection; the retries took 23 s and more
