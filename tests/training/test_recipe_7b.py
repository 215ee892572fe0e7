"""The 7B training configs load, and their students build on the meta device (no download):
configs/train/llava15_7b.yaml from llava-hf's config written by hand, the LLaVA-NeXT, LLaVA-OneVision,
Qwen2.5-VL, Qwen3-VL, InternVL3 and Gemma 3 ones from the --random-init shape each names (their eval configs with them)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from tpkit.training.config import load_train_config
from tpkit.training.lora import apply_lora

ROOT = Path(__file__).resolve().parents[2]


def llava15_7b_config() -> LlavaConfig:
    """llava-hf/llava-1.5-7b-hf's config.json, by hand: CLIP ViT-L/14-336 + Vicuna-7B (Llama)."""
    vision = CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        projection_dim=768,
        hidden_act="quick_gelu",
    )
    text = LlamaConfig(
        vocab_size=32064,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        pad_token_id=32001,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=32000,
        image_seq_length=576,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )


def test_7b_recipe_loads_and_builds_on_meta():
    cfg = load_train_config(ROOT / "configs" / "train" / "llava15_7b.yaml")
    assert cfg.model.path == "llava-hf/llava-1.5-7b-hf"
    assert (cfg.trainer.strategy, cfg.trainer.devices, cfg.trainer.precision) == ("ddp", 8, "bf16-mixed")
    with torch.device("meta"):
        base = LlavaForConditionalGeneration(llava15_7b_config())
    n_base = sum(p.numel() for p in base.parameters())
    assert 7.0e9 < n_base < 7.2e9
    model = apply_lora(base, cfg.lora)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("language_model" in n and "lora_" in n for n in trainable)
    assert not any("vision_tower" in n for n, _ in model.named_modules() if "lora_" in n)
    n_lora = sum(p.numel() for p in trainable.values())
    # r * (in + out) per projection; 32 layers of q, k, v, o (4096 -> 4096), gate, up (4096 -> 11008), down
    r = cfg.lora.r
    per_layer = 4 * r * (4096 + 4096) + 3 * r * (4096 + 11008)
    assert n_lora == 32 * per_layer == 39_976_960
    # checkpoint: fp32 LoRA weights + AdamW exp_avg + exp_avg_sq = 12 bytes per trainable parameter
    ckpt_gb = n_lora * 12 / 1e9
    assert ckpt_gb < 0.5  # vs ~14 GB for the bf16 base alone


# ---------------------------------------------------------------------------------------------------
# LLaVA-NeXT, LLaVA-OneVision, Qwen2.5-VL, Qwen3-VL, InternVL3, Gemma 3: each config names the --random-init shape that is its model
# with random weights; the numbers its comments claim are computed here from that shape.


@dataclass(frozen=True)
class Recipe:
    hub: str
    shape: str  # the --random-init name the config's comments give
    model_class: str
    params: tuple[float, float]  # the base's parameter count lies in this range (the hub model's size)
    lm: tuple[int, int, int, int]  # the hub config's LM: layers, hidden, k/v width (kv heads x head dim), MLP
    lora: int  # trainable parameters, as the comment says
    n_visual: int  # visual tokens of the --random-init prompt
    n_text: int  # its text tokens (35 before the image, 29 after, Qwen's vision start/end)
    k1: int  # stage-1 and stage-2 counts at 22% of its token-layers (fixed counts, as speed runs do)
    k2: int
    photo: int  # visual tokens of a 640 x 480 photo at the processor's defaults


RECIPES = {
    # Vicuna-7B: 32 layers of 4096, MHA, MLP 11008
    "llava_next_7b": Recipe("llava-hf/llava-v1.6-vicuna-7b-hf", "llava-next-7b", "LlavaNextForConditionalGeneration",
                            (7.0e9, 7.1e9), (32, 4096, 4096, 11008), 39_976_960, 2928, 64, 923, 636, 2340),
    # Qwen2-7B: 28 layers of 3584, 4 kv heads of 128, MLP 18944; SigLIP so400m (26 layers as llava-hf keeps them)
    "llava_onevision_7b": Recipe("llava-hf/llava-onevision-qwen2-7b-ov-hf", "llava-onevision-7b",
                                 "LlavaOnevisionForConditionalGeneration", (8.0e9, 8.1e9), (28, 3584, 512, 18944),
                                 40_370_176, 3699, 64, 1178, 796, 2929),
    # Qwen2.5-VL-7B: the same LM shape, a 32-block ViT (1280-d) and merger
    "qwen2_5_vl_7b": Recipe("Qwen/Qwen2.5-VL-7B-Instruct", "qwen2.5-vl-7b", "Qwen2_5_VLForConditionalGeneration",
                            (8.2e9, 8.35e9), (28, 3584, 512, 18944), 40_370_176, 1369, 66, 408, 304, 391),
    # Gemma 3 4B: 34 layers of 2560, 8 heads and 4 kv heads of 256 (q is 2048 wide), MLP 10240; every image
    # 896 px, 256 pooled tokens between <start_of_image> and <end_of_image>
    # Qwen3-VL-8B: Qwen3-8B (36 layers of 4096, 8 kv heads of 128, MLP 12288), a 27-block ViT of 16 px patches
    "qwen3_vl_8b": Recipe("Qwen/Qwen3-VL-8B-Instruct", "qwen3-vl-8b", "Qwen3VLForConditionalGeneration",
                          (8.7e9, 8.8e9), (36, 4096, 1024, 12288), 43_646_976, 1024, 66, 294, 233, 300),
    # InternVL3-8B: InternViT-300M (448 px tiles, 256 tokens each) + Qwen2.5-7B (the same LM shape)
    "internvl3_8b": Recipe("OpenGVLab/InternVL3-8B-hf", "internvl3-8b", "InternVLForConditionalGeneration",
                           (7.9e9, 8.0e9), (28, 3584, 512, 18944), 40_370_176, 1280, 66, 378, 285, 3328),
    "gemma3_4b": Recipe("google/gemma-3-4b-it", "gemma-3-4b", "Gemma3ForConditionalGeneration",
                        (4.25e9, 4.35e9), (34, 2560, 1024, 10240), 29_802_496, 256, 66, 40, 69, 256),
}  # fmt: skip


def _photo_tokens(model, family) -> int:
    """Visual tokens of a 640 x 480 photo at the hub processor's defaults."""
    if type(model).__name__.startswith("InternVL"):  # tiles at the hub processor's defaults + the thumbnail
        import transformers

        from tpkit.models.internvl.tiny import tokens_per_tile

        cls = getattr(transformers, "GotOcr2ImageProcessorPil", None) or transformers.GotOcr2ImageProcessor
        tiles = cls(size={"height": 448, "width": 448}, crop_to_patches=True, min_patches=1, max_patches=12)
        return tiles.get_number_of_image_patches(480, 640, {}) * tokens_per_tile(model.config)
    if type(model).__name__.startswith("Gemma3"):  # resized to the tower's size, pooled to a fixed count
        return model.config.mm_tokens_per_image
    if type(model).__name__.startswith("Qwen"):
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        if type(model).__name__.startswith("Qwen3"):  # 16-px patches, Qwen3-VL's pixel budget
            h, w = smart_resize(480, 640, factor=32, min_pixels=65536, max_pixels=16777216)
            return (h // 32) * (w // 32)
        h, w = smart_resize(480, 640, factor=28, min_pixels=3136, max_pixels=12845056)
        return (h // 28) * (w // 28)  # one token per 2 x 2 merge of 14-px patches
    return family.image_token_count(model, (480, 640))


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_family_recipe_builds_on_meta_and_its_budget_notes_hold(name):
    from tpkit.models.registry import architectures, build_random_init, family_of
    from tpkit.pruning.budgets import fixed_budget_counts, token_layer_fraction
    from tpkit.training.recipe import build_student

    r = RECIPES[name]
    path = ROOT / "configs" / "train" / f"{name}.yaml"
    text = path.read_text()
    cfg = load_train_config(path)
    assert cfg.model.path == r.hub and cfg.model.dtype == "bfloat16"
    assert (cfg.trainer.strategy, cfg.trainer.devices, cfg.trainer.precision) == ("ddp", 8, "bf16-mixed")
    # the shape that validates it, and no other, named with the flag that builds it
    assert {a for a in architectures() if a in text} == {r.shape} and f"--random-init {r.shape}" in text
    base = build_random_init(r.shape, device="meta", dtype="bfloat16")
    assert type(base).__name__ == r.model_class
    assert r.params[0] < sum(p.numel() for p in base.parameters()) < r.params[1]
    family = family_of(base)
    layers, hidden, kv, mlp = r.lm
    lm_cfg = family.language_model(base).config
    assert (lm_cfg.num_hidden_layers, lm_cfg.hidden_size, lm_cfg.intermediate_size) == (layers, hidden, mlp)
    head_dim = getattr(lm_cfg, "head_dim", None) or hidden // lm_cfg.num_attention_heads
    assert lm_cfg.num_key_value_heads * head_dim == kv
    q = (
        lm_cfg.num_attention_heads * head_dim
    )  # the hidden size, except where heads x head dim differs (Gemma)

    # the recipe's own student: pruning checked against the model, LoRA on the LM only, pruner attached
    student, attached = build_student(cfg, base=base)
    assert attached
    trainable = {n: p for n, p in student.named_parameters() if p.requires_grad}
    assert trainable and all("language_model" in n and "lora_" in n for n in trainable)
    assert not any(re.search(family.tower_pattern, n) for n in trainable)
    # r x (in + out) per projection: q, o (hidden <-> heads x head dim), k, v (hidden -> kv), gate, up, down
    rank = cfg.lora.r
    per_layer = rank * (2 * (hidden + q) + 2 * (hidden + kv) + 3 * (hidden + mlp))
    assert sum(p.numel() for p in trainable.values()) == layers * per_layer == r.lora
    assert f"{r.lora:,}" in text

    # the budget note: the --random-init prompt's tokens and what 22% of its token-layers means
    prompt = family.random_prompt(base, 1, 35, 29, 0, "cpu")["input_ids"][0]
    n_visual = int(torch.isin(prompt, torch.tensor(family.placeholder_ids(base))).sum())
    n_text = prompt.numel() - n_visual
    assert (n_visual, n_text) == (r.n_visual, r.n_text)
    n_dense = n_visual + n_text
    k = cfg.pruning.stage2.layer
    assert k == 2 and f"layer: 2                   # of {layers}" in text
    k1, k2 = fixed_budget_counts(n_text, n_visual, layers, k, 0.22, 1.5)
    assert (k1, k2) == (r.k1, r.k2)
    fraction = token_layer_fraction(
        torch.tensor([n_dense]), torch.tensor([n_text + k1]), torch.tensor([k2]), layers, k
    )
    assert abs(float(fraction) - 0.22) < (layers - k) / (layers * n_dense)  # within one stage-2 token
    budget = round(0.22 * layers * n_dense)
    for claim in (f"{n_visual:,}", f"{n_dense:,}", f"0.22 x {layers} layers x {n_dense:,} = {budget:,}",
                  f"k1 = {k1:,}", f"k2 = {k2:,}", f"~{n_text + k1:,} tokens"):  # fmt: skip
        assert claim in text, claim
    photo = _photo_tokens(base, family)
    assert photo == r.photo and f"{photo:,}" in text

    # the eval config: same model, same pruning, the same shape named
    from tpkit.config import to_dict
    from tpkit.evaluation.config import load_eval_config

    eval_path = ROOT / "configs" / "eval" / f"{name}.yaml"
    ev = load_eval_config(eval_path)
    assert ev.model.path == r.hub and to_dict(ev.pruning) == to_dict(cfg.pruning)
    eval_text = eval_path.read_text()
    assert {a for a in architectures() if a in eval_text} == {
        r.shape
    } and f"--random-init {r.shape}" in eval_text
    assert f"k1 = {k1:,}" in eval_text and f"k2 = {k2:,}" in eval_text
