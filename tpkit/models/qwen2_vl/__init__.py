"""Qwen2-VL and Qwen2.5-VL (merged 2 x 2 units, 3-D M-RoPE, window attention in the tower): the family adapter."""
