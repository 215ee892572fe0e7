"""LLaVA-NeXT and LLaVA-OneVision (any-res images, newline tokens, video frames): the family adapter."""
