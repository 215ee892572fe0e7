"""tpkit as a model of lmms-eval (0.7.x), the harness token-pruning papers report their benchmarks
with (GQA, MME, POPE, TextVQA, MMBench; MMMU, MathVista, DocVQA, ChartQA, Video-MME, multi-image
tasks): ``lmms-eval --model tpkit --model_args pretrained=...,method=ours``, for every family tpkit
prunes, with the images, videos or text-only requests each family takes.

* :mod:`.plugin` - the entry point (group ``lmms_eval.models``) that names the model ``tpkit``;
  torch-free, since lmms-eval loads every plug-in whenever it lists its models.
* :mod:`.config` - ``--model_args`` as a typed :class:`HarnessConfig` (unknown keys fail, naming them).
* :mod:`.model` - :class:`TpkitLMM`: ``generate_until``, ``loglikelihood`` and
  ``generate_until_multi_round`` over ragged batches, with per-sample token accounting for each
  kind of request.
* :mod:`.task` - ``tpkit lmms-task``: a local task over a LLaVA-JSON file (no hub, no lmms-eval
  needed to write it).

Needs the ``lmms`` extra (``pip install "tpkit[lmms]"``); docs/lmms-eval.md has the commands.
"""
