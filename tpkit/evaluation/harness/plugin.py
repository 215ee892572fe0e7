"""The ``lmms_eval.models`` entry point: lmms-eval calls :func:`manifest` when it builds its model
registry, and imports :class:`tpkit.evaluation.harness.model.TpkitLMM` only when ``--model tpkit``
is asked for (this module stays free of torch and transformers)."""

from __future__ import annotations

MODEL_ID = "tpkit"
CLASS_PATH = "tpkit.evaluation.harness.model.TpkitLMM"


def manifest():
    """lmms-eval's ``ModelManifest`` for ``--model tpkit`` (a "simple" model: it gets the task's text
    and images and applies the family's chat template itself)."""
    from lmms_eval.models.registry_v2 import ModelManifest  # only lmms-eval calls this

    return ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH)
