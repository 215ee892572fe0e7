"""Evaluation fixtures: a few synthetic test samples, the offline processor, a tiny random LLaVA
matching it, and an ``EvalConfig`` wired to them (built once per session: the processor's tokenizer
training is the slow part)."""

from __future__ import annotations

import copy

import pytest

from tpkit.models.config import ModelConfig


@pytest.fixture(scope="session")
def eval_assets(tmp_path_factory):
    from tpkit.synthetic.questions import synthetic_processor
    from tpkit.synthetic.splits import generate_split

    root = tmp_path_factory.mktemp("eval_assets")
    test_json = generate_split(str(root / "data"), split="test", n=6, seed=2)
    processor = synthetic_processor()
    processor.save_pretrained(str(root / "processor"))
    return {
        "root": root,
        "test_json": str(test_json),
        "processor_dir": str(root / "processor"),
        "processor": processor,
    }


@pytest.fixture
def eval_cfg(eval_assets, tmp_path):
    """A small, fast EvalConfig on the tiny random model (each test may change it)."""
    from tpkit.evaluation.config import EvalConfig

    cfg = EvalConfig()
    cfg.model = ModelConfig(path="tiny", processor_path=eval_assets["processor_dir"], dtype="float32")
    cfg.data.test_json = eval_assets["test_json"]
    cfg.data.eval_batch_size = 4
    cfg.eval.max_new_tokens = 3
    cfg.eval.budgets = [0.4]
    cfg.eval.fastv_layer = 1
    cfg.eval.grid_samples = 4
    cfg.eval.progress = False
    cfg.speed.batch_size = 2
    cfg.speed.repeats = 1
    cfg.speed.warmup = 0
    cfg.speed.decode_tokens = 1
    cfg.out_dir = str(tmp_path / "out")
    cfg.device = "cpu"
    return copy.deepcopy(cfg)


@pytest.fixture(scope="session")
def loaded(eval_assets):
    """(model with the pruner attached, processor, ours' PruningConfig, dataset) for the default cfg."""
    from tpkit.evaluation.config import EvalConfig
    from tpkit.evaluation.runner import load_dataset, load_model_and_processor
    from tpkit.models.loading import resolve_device

    cfg = EvalConfig()
    cfg.model = ModelConfig(path="tiny", processor_path=eval_assets["processor_dir"], dtype="float32")
    cfg.data.test_json = eval_assets["test_json"]
    cfg.data.eval_batch_size = 4
    model, processor, ours = load_model_and_processor(cfg, resolve_device("cpu"))
    return {"model": model, "processor": processor, "ours": ours, "ds": load_dataset(cfg), "cfg": cfg}
