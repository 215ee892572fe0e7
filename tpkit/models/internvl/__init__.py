"""InternVL3 / InternVL2.5 (tiles plus a thumbnail, InternViT with a CLS token, pixel shuffle 2 x 2 -> 1): the family adapter."""
