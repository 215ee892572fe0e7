"""Training: the recipe (config -> student, data, trainer -> fit -> checkpoint -> export), the
LightningModule, losses, checkpoints, exports and the teacher cache."""
