"""LLaVA-1.5 (``LlavaForConditionalGeneration``): the family adapter for the shared pruning core."""
