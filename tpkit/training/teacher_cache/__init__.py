"""The teacher cache: the unpruned teacher's answer-token logits, computed once (``build``), read by
every distillation step (``cache``)."""
