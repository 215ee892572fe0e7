"""Gemma 3 (``Gemma3ForConditionalGeneration``): a SigLIP tower pooled to a fixed number of tokens per
image, and a decoder of alternating sliding-window and global layers in which an image's tokens see
each other (:mod:`tpkit.models.gemma3.family`)."""
