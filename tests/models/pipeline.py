"""What the families' pipeline tests share (``tests/models/<family>/test_pipeline.py``): chat records
with random images, keep-all against stock on a collated batch, ``tpkit evaluate`` and the premise
report on a ``save_pretrained`` checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tpkit.models import attach_pruner
from tpkit.pruning import PruningConfig, Stage1Config, Stage2Config

KEEP_ALL = PruningConfig(
    stage1=Stage1Config(selector="ratio", ratio=1.0),
    stage2=Stage2Config(selector="ratio", ratio=1.0, layer=1),
)


def image_records(sizes: list[list[tuple[int, int]]], seed: int = 0) -> list[dict]:
    """One LLaVA-JSON record per entry of ``sizes`` (its images' (width, height), a list of images): as
    many ``<image>`` placeholders, a color question, the answer "red"."""
    rng = np.random.default_rng(seed)
    out = []
    for i, wh in enumerate(sizes):
        images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in wh]
        conv = [
            {"from": "human", "value": "<image>\n" * len(images) + "What color is the circle?"},
            {"from": "gpt", "value": "red"},
        ]
        out.append({"id": f"r{i}", "image": images, "conversations": conv})
    return out


def assert_keep_all_is_stock(model, inputs: dict) -> torch.Tensor:
    """Keep-all pruning gives stock's logits at every kept position of every sample; returns stock's."""
    with torch.no_grad():
        stock = model(**inputs).logits
        out = attach_pruner(model, KEEP_ALL)(**inputs)
    for b in range(stock.shape[0]):
        kept = out.kept_index[b] >= 0
        torch.testing.assert_close(out.logits[b][kept], stock[b][out.kept_index[b][kept]])
    return stock


def evaluate_saved(model, processor, tmp_path: Path, methods: list[str], *overrides: str) -> dict:
    """``tpkit evaluate`` (2 samples a batch, 2 new tokens, no sweep, one timed round) on ``model`` and
    ``processor`` written by ``save_pretrained``, 4 synthetic test questions; the results, checked for
    what every run holds: each method there, dense unpruned, ours pruned and timed."""
    from tpkit.cli import main
    from tpkit.synthetic.splits import generate_split

    model.save_pretrained(tmp_path / "base")
    processor.save_pretrained(tmp_path / "base")
    data = generate_split(str(tmp_path / "data"), split="test", n=4, seed=2)
    argv = ["evaluate", "--device", "cpu", "--out", str(tmp_path / "out"), "--set", f"model.path={tmp_path / 'base'}",
            "model.dtype=float32", f"data.test_json={data}", "data.eval_batch_size=2", "pruning.stage2.layer=1",
            f"eval.methods=[{','.join(methods)}]", "eval.max_new_tokens=2", "eval.budgets=[]", "eval.fastv_layer=1",
            "eval.progress=false", "speed.batch_size=2", "speed.repeats=1", "speed.warmup=0", "speed.decode_tokens=1",
            *overrides]  # fmt: skip
    assert main(argv) == 0
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(methods) <= set(res["methods"])
    ours = res["methods"]["ours"]
    assert 0 < ours["tokens"]["fraction"]["mean"] < 1 and ours["speed"]["prefill"]["median_ms"] > 0
    assert res["methods"]["dense"]["tokens"]["fraction"]["mean"] == 1.0
    return res


def premise_report(model, processor, tmp_path: Path) -> tuple[str, int]:
    """The premise report (4 synthetic test images, batches of 2) on ``model`` and ``processor`` written
    by ``save_pretrained``, checked for what every run holds (every image scored, an AUROC); the report
    as ``tpkit premise`` prints it, and its number of scored units per image."""
    from tpkit.synthetic.premise import format_report, run_premise
    from tpkit.synthetic.splits import generate_split

    data = generate_split(str(tmp_path / "data"), split="test", n=4, seed=2)
    model.save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    report = run_premise(data, tmp_path / "m", n=4, batch_size=2)
    m = report["model_score"]
    assert m["n_images"] == 4 and len(m["k"]) == 4 and np.isfinite(m["auroc_pooled"])
    return format_report(report), m["n_patches"]
