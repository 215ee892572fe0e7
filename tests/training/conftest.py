"""Shared fixtures for training tests: a small processor, a 16-record synthetic split, tiny configs."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from tpkit.config import from_dict
from tpkit.training.config import TrainConfig

# 32x32 images, patch 8: 16 visual tokens; a 2-layer LM of width 32 — a training step takes ms
TINY_MODEL = {"path": "tiny:llama", "tiny": {"hidden_size": 32, "num_layers": 2, "intermediate_size": 64}}


@pytest.fixture(scope="session")
def processor():
    from tpkit.synthetic.questions import synthetic_processor

    return synthetic_processor(image_size=32, patch_size=8)


@pytest.fixture(scope="session")
def train_json(tmp_path_factory) -> Path:
    from tpkit.synthetic.splits import generate_split

    return generate_split(tmp_path_factory.mktemp("data"), split="train", n=16, seed=0)


def tiny_cfg_dict(train_json: Path, out_dir: Path, **sections) -> dict:
    d = {
        "model": copy.deepcopy(TINY_MODEL),
        "pruning": {"stage1": {"min_keep": 4}, "stage2": {"layer": 1}},
        "lora": {"r": 4, "alpha": 8.0},
        "distill": {"alpha": 1.0, "temperature": 2.0},
        "data": {"train_json": str(train_json), "batch_size": 4, "max_length": 128},
        "optim": {"lr": 5e-3, "scheduler": "constant"},
        "trainer": {
            "out_dir": str(out_dir),
            "max_steps": 4,
            "logger": "none",
            "progress_bar": False,
            "checkpoint_every_n_steps": 2,
            "export_at_end": False,
        },
    }
    for name, values in sections.items():
        d.setdefault(name, {}).update(values)
    return d


@pytest.fixture
def make_cfg(train_json, tmp_path):
    def make(**sections) -> TrainConfig:
        return from_dict(TrainConfig, tiny_cfg_dict(train_json, tmp_path / "run", **sections))

    return make
