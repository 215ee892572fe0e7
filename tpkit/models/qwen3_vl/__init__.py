"""Qwen3-VL (DeepStack) and Qwen3.5 (hybrid Gated DeltaNet decoder): the family adapters, on Qwen2-VL's."""
