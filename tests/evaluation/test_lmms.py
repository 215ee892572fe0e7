"""lmms-eval runs tpkit: the local tasks `tpkit lmms-task` writes over the synthetic test split (a
`datasets` directory, no hub) through lmms-eval's own ``simple_evaluate`` and CLI, on the fixture
model dense, ours and with an adapter from a short training run, against ``tpkit evaluate`` on the
same questions.

Skipped, at collection, where the ``lmms`` extra is not installed (``pip install -e ".[test]"``);
where its lmms-eval distribution is installed, a failing import fails the run instead."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

try:
    importlib.metadata.distribution("lmms_eval")
except importlib.metadata.PackageNotFoundError:
    pytest.skip('lmms-eval is not installed (pip install -e ".[test,lmms]")', allow_module_level=True)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from lmms_eval.evaluator import simple_evaluate  # noqa: E402
from lmms_eval.models import get_model, list_available_models  # noqa: E402
from lmms_eval.tasks import TaskManager  # noqa: E402

from tpkit.cli import main as tpkit_main  # noqa: E402
from tpkit.config import ConfigError, load_config  # noqa: E402
from tpkit.evaluation.config import load_eval_config  # noqa: E402
from tpkit.evaluation.harness.config import parse_model_args  # noqa: E402
from tpkit.evaluation.harness.model import TpkitLMM, summarise_counts  # noqa: E402
from tpkit.evaluation.metrics import yes_no_label  # noqa: E402
from tpkit.evaluation.runner import evaluate  # noqa: E402
from tpkit.synthetic.splits import generate_split  # noqa: E402
from tpkit.training.config import TrainConfig  # noqa: E402
from tpkit.training.recipe import fit  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "assets" / "tiny-llava"
EVAL_YAML = ROOT / "configs" / "eval" / "tiny.yaml"  # ours' pruning for both tpkit evaluate and the harness
N = 32  # questions of the synthetic test split (8 per type)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def split(tmp_path_factory) -> Path:
    return generate_split(tmp_path_factory.mktemp("synthetic"), split="test", n=N, seed=2)


@pytest.fixture(scope="module")
def task_dir(split, tmp_path_factory) -> Path:
    """`tpkit lmms-task` over the split: max_new_tokens 6 as configs/eval/tiny.yaml's eval.max_new_tokens."""
    out = tmp_path_factory.mktemp("lmms") / "task"
    argv = ["lmms-task", "--data", str(split), "--out", str(out), "--name", "tpkit_synthetic"]
    assert tpkit_main([*argv, "--max-new-tokens", "6"]) == 0
    return out


@pytest.fixture(scope="module")
def adapter(split, tmp_path_factory) -> Path:
    """The demo's recipe (configs/train/tiny.yaml: LoRA + pruner + distillation) for 3 steps."""
    out = tmp_path_factory.mktemp("train")
    train_json = generate_split(out / "data", split="train", n=16, seed=0)
    cfg = load_config(
        TrainConfig,
        ROOT / "configs" / "train" / "tiny.yaml",
        [
            f"data.train_json={train_json}",
            "data.val_json=null",
            "data.batch_size=4",
            f"trainer.out_dir={out / 'run'}",
            "trainer.max_steps=3",
            "trainer.val_every_n_steps=0",
            "trainer.checkpoint_every_n_steps=0",
            "trainer.logger=none",
            "trainer.progress_bar=false",
            "optim.warmup_steps=0",
        ],
    )
    return fit(cfg).export_dir


def harness(task_dir: Path, model_args: str, tasks: list[str]) -> dict:
    """lmms-eval's simple_evaluate with --model tpkit (resolved through the installed entry point)."""
    tm = TaskManager(include_path=str(task_dir), include_defaults=False)
    args = f"pretrained={FIXTURE},{model_args},progress=false"
    return simple_evaluate(
        model="tpkit",
        model_args=args,
        tasks=tasks,
        task_manager=tm,
        log_samples=True,
        bootstrap_iters=0,
        process_docs_parallel=1,
    )


def answers(res: dict, task: str = "tpkit_synthetic") -> dict[str, str]:
    return {s["doc"]["id"]: s["filtered_resps"][0] for s in res["samples"][task]}


def tpkit_evaluate(split: Path, out: Path, adapter: Path | None = None) -> dict:
    overrides = [
        f"data.test_json={split}",
        f"out_dir={out}",
        f"model.path={FIXTURE}",
        "eval.methods=[dense, ours]",
        "eval.budgets=[]",
        "eval.grid_samples=0",
        "eval.progress=false",
        "speed.enabled=false",
        "data.eval_batch_size=4",
    ]
    if adapter is not None:
        overrides.append(f"adapter={adapter}")
    res = evaluate(load_eval_config(EVAL_YAML, overrides))
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    res["answers"] = {m: {p["id"]: p[m] for p in preds} for m in ("dense", "ours")}
    return res


@pytest.fixture(scope="module")
def reference(split, tmp_path_factory) -> dict:
    return tpkit_evaluate(split, tmp_path_factory.mktemp("eval"))


@pytest.fixture(scope="module")
def ours(task_dir) -> dict:
    return harness(
        task_dir,
        f"pruning={EVAL_YAML},method=ours,batch_size=4",
        ["tpkit_synthetic", "tpkit_synthetic_yesno_ll"],
    )


def test_the_entry_point_names_the_model():
    """Registered through the entry point. (`lmms-eval models` prints lmms-eval's built-in tables only,
    not its registry, so it lists no plug-in: docs/lmms-eval.md.)"""
    assert get_model("tpkit") is TpkitLMM
    assert "tpkit" in list_available_models()


def test_lmms_task_writes_both_tasks(task_dir, capsys):
    names = sorted(p.name for p in task_dir.iterdir())
    assert names == ["data", "tpkit_synthetic.yaml", "tpkit_synthetic_yesno_ll.yaml", "utils.py"]
    assert "max_new_tokens: 6" in (task_dir / "tpkit_synthetic.yaml").read_text()
    tm = TaskManager(include_path=str(task_dir), include_defaults=False)
    assert {"tpkit_synthetic", "tpkit_synthetic_yesno_ll"} <= set(tm.all_tasks)


@pytest.mark.parametrize("method", ["dense", "ours"])
def test_harness_equals_tpkit_evaluate(method, task_dir, reference, ours):
    res = (
        ours
        if method == "ours"
        else harness(task_dir, f"pruning={EVAL_YAML},method=dense,batch_size=4", ["tpkit_synthetic"])
    )
    got, want = answers(res), reference["answers"][method]
    assert len(got) == N and got.keys() == want.keys()
    assert {k: v.strip() for k, v in got.items()} == want  # the same answer to every question
    acc = res["results"]["tpkit_synthetic"]["exact_match,none"]
    assert acc == pytest.approx(reference["methods"][method]["accuracy"], abs=1e-9)


def test_adapter_through_the_harness(task_dir, adapter, split, tmp_path):
    want = tpkit_evaluate(split, tmp_path / "eval", adapter)
    res = harness(task_dir, f"adapter={adapter},method=ours,batch_size=4", ["tpkit_synthetic"])
    got = {k: v.strip() for k, v in answers(res).items()}
    assert got == want["answers"]["ours"]
    assert res["results"]["tpkit_synthetic"]["exact_match,none"] == pytest.approx(
        want["methods"]["ours"]["accuracy"], abs=1e-9
    )


def test_batch_size_4_gives_the_answers_of_batch_size_1(task_dir, ours):
    one = harness(task_dir, f"pruning={EVAL_YAML},method=ours,batch_size=1", ["tpkit_synthetic"])
    assert answers(one) == answers(ours)
    counts = lambda r: {s["doc"]["id"]: s["token_counts"][0] for s in r["samples"]["tpkit_synthetic"]}  # noqa: E731
    assert counts(one) == counts(ours)


def test_loglikelihood_chooses_what_generation_answers(ours):
    gen = answers(ours)
    ll = ours["samples"]["tpkit_synthetic_yesno_ll"]
    assert len(ll) == N // 4
    sure = 0
    for s in ll:
        (nll_yes, _), (nll_no, _) = s["filtered_resps"]
        choice = "yes" if nll_yes < nll_no else "no"
        said = yes_no_label(gen[s["doc"]["id"]])
        if said is not None and abs(nll_yes - nll_no) > 1.0:  # the model is sure
            sure += 1
            assert choice == ("yes" if said else "no"), s["doc"]["id"]
    assert sure >= len(ll) // 2
    assert ours["results"]["tpkit_synthetic_yesno_ll"]["acc,none"] > 0.5


def test_token_accounting_in_samples_and_results(ours, reference):
    samples = ours["samples"]["tpkit_synthetic"]
    tc = [s["token_counts"][0] for s in samples]
    assert all(
        {"input_tokens", "output_tokens", "k1", "k2", "n_visual", "token_layer_fraction"} <= set(t)
        for t in tc
    )
    assert all(
        t["k1"] < t["n_visual"] and t["k2"] < t["input_tokens"] and 0 < t["token_layer_fraction"] < 1
        for t in tc
    )
    # the same per-sample counts as tpkit evaluate: the same means
    ref = reference["methods"]["ours"]["tokens"]
    assert sum(t["k1"] for t in tc) / len(tc) == pytest.approx(ref["k1"]["mean"])
    assert sum(t["token_layer_fraction"] for t in tc) / len(tc) == pytest.approx(ref["fraction"]["mean"])
    thr = ours["throughput"]
    ll = [t for s in ours["samples"]["tpkit_synthetic_yesno_ll"] for t in (x for x in s["token_counts"])]
    assert thr["avg_tpkit_samples"] == len(tc) + len(ll)
    want = summarise_counts([t | {"n_dense": t["input_tokens"]} for t in tc + ll])
    for key in ("k1_mean", "k1_p5", "k1_p95", "token_layer_fraction_mean", "k2_p95"):
        assert thr[f"avg_tpkit_{key}"] == pytest.approx(want[f"tpkit_{key}"])


def test_matched_baseline_and_budget(task_dir, ours):
    res = harness(task_dir, f"pruning={EVAL_YAML},method=random,batch_size=4", ["tpkit_synthetic"])
    k1 = lambda r: {s["doc"]["id"]: s["token_counts"][0]["k1"] for s in r["samples"]["tpkit_synthetic"]}  # noqa: E731
    assert k1(res) == k1(ours)  # matched to ours' per-sample counts
    res = harness(task_dir, f"pruning={EVAL_YAML},method=ours@0.3,batch_size=4,k1=12", ["tpkit_synthetic"])
    assert set(k1(res).values()) == {12}


def test_model_args_are_checked():
    with pytest.raises(ConfigError, match="unknown key 'pretraind'"):
        parse_model_args({"pretraind": "x"})
    with pytest.raises(ValueError, match="known methods"):
        parse_model_args({"method": "fastvv"})
    cfg, over = parse_model_args(
        {"method": "fastv@0.22", "pruning.stage2.layer": 1, "batch_size": 8, "device": None}
    )
    assert cfg.batch_size == 8 and over == [("stage2.layer", 1)]
    with pytest.raises(ConfigError, match="did you mean"):
        TpkitLMM(pretrained=str(FIXTURE), **{"pruning.stage2.layr": 1})


def test_a_batch_size_lmms_eval_does_not_show_is_said(capsys):
    """lmms-eval's header prints its own --batch_size (1 unless given); a model_args batch_size the
    header cannot show is said, with the flag that makes both agree, and reported as batch_sizes."""
    lm = TpkitLMM.create_from_arg_string(
        f"pretrained={FIXTURE},batch_size=4,progress=false", {"batch_size": 1}
    )
    assert lm.batch_size == 4 and list(lm.batch_sizes.values()) == [4]
    err = capsys.readouterr().err
    assert "header shows its --batch_size 1: give --batch_size 4 instead" in err
    TpkitLMM.create_from_arg_string(f"pretrained={FIXTURE},progress=false", {"batch_size": 4})
    assert "header" not in capsys.readouterr().err


def test_lmms_eval_cli(task_dir, tmp_path):
    """`python -m lmms_eval --model tpkit ... --batch_size 4` writes results with the token accounting,
    and its header and results.json show the batch size the model used."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "tpkit", "--tasks", "tpkit_synthetic",
           "--model_args", f"pretrained={FIXTURE},pruning={EVAL_YAML},progress=false", "--batch_size", "4",
           "--include_path", str(task_dir), "--limit", "8", "--output_path", str(out), "--log_samples"]  # fmt: skip
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "batch_size: 4" in proc.stdout and "header" not in proc.stderr
    results = [p for p in out.rglob("*results*.json")]
    assert results, list(out.rglob("*"))
    data = json.loads(results[0].read_text())
    assert data["config"]["batch_sizes"] == [4]
    assert 0 <= data["results"]["tpkit_synthetic"]["exact_match,none"] <= 1
    assert 0 < data["throughput"]["avg_tpkit_token_layer_fraction_mean"] < 1
    samples = [json.loads(line) for p in out.rglob("*samples*.jsonl") for line in p.read_text().splitlines()]
    assert len(samples) == 8 and "k1" in samples[0]["token_counts"][0]


def test_a_model_args_mistake_ends_the_lmms_eval_command_with_its_message(monkeypatch, capsys):
    """lmms-eval prints a traceback and exits 0 when a model fails to build: under its command, a
    mistake in --model_args is the last line printed, and the exit status is 2."""
    from tpkit.evaluation.harness import model as harness_model

    with pytest.raises(ConfigError, match="did you mean 'method'"):  # the Python API: the exception
        TpkitLMM.create_from_arg_string("methd=ours")
    monkeypatch.setattr(harness_model, "_under_lmms_eval_command", lambda: True)
    with pytest.raises(SystemExit) as e:
        TpkitLMM.create_from_arg_string(f"pretrained={FIXTURE},pruning.stage2.diversity=nan")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (
        "error: --model tpkit: --model_args pruning.*: 'stage2.diversity' = nan must be a finite number"
    )


def test_lmms_eval_cli_ends_with_the_model_args_error(tmp_path):
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "tpkit", "--tasks", "mme",
           "--model_args", f"pretrained={FIXTURE},methd=ours", "--output_path", str(tmp_path)]  # fmt: skip
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stderr.splitlines()[-1] == (
        "error: --model tpkit: --model_args: unknown key 'methd' (did you mean 'method'?)"
    )
    assert "Traceback" not in proc.stderr


def test_a_refused_request_ends_the_lmms_eval_command_with_its_message(monkeypatch, capsys):
    """A request the model's family does not take (two images for LLaVA-1.5): the exception for the
    Python API; under the lmms-eval command, which would print a traceback and exit 0, the message as
    the last line and exit status 2."""
    from tpkit.evaluation.harness import model as harness_model

    with pytest.raises(ValueError, match="takes at most 1"):
        harness_model._refuse("mme/test/3: this request has 2 image(s) ... takes at most 1 image(s)")
    monkeypatch.setattr(harness_model, "_under_lmms_eval_command", lambda: True)
    with pytest.raises(SystemExit) as e:
        harness_model._refuse("mme/test/3: this request has 2 image(s)")
    assert e.value.code == 2
    assert (
        capsys.readouterr().err.splitlines()[-1]
        == "error: --model tpkit: mme/test/3: this request has 2 image(s)"
    )
