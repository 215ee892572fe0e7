"""The embedded world: a procedurally generated multimodal benchmark (scenes, questions, split files),
the study of the CLS premise on a tower (``premise``) and the recipe that trains the embedded base
model from scratch (``fixture``). It sits on top of the product: nothing in ``tpkit`` below
``tpkit.demo`` and ``tpkit.cli`` imports it."""
