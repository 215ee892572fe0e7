"""``--model_args`` of ``--model tpkit``, checked without lmms-eval: non-finite numbers, a YAML that
asks for Python objects, unknown keys with a did-you-mean."""

from __future__ import annotations

import pytest

from tpkit.config import ConfigError
from tpkit.evaluation.harness.config import apply_pruning_overrides, parse_model_args, read_pruning_yaml
from tpkit.pruning import PruningConfig


@pytest.mark.parametrize(
    "args, message",
    [
        ({"sweep_stage1_factor": float("nan")}, "'sweep_stage1_factor' = nan must be a finite number"),
        ({"sweep_stage1_factor": 0}, "sweep_stage1_factor = 0.0 must be > 0"),
        ({"methd": "ours"}, "--model_args: unknown key 'methd' (did you mean 'method'?)"),
    ],
)
def test_model_args_are_refused_naming_the_key(args, message):
    with pytest.raises(ConfigError) as e:
        parse_model_args(args)
    assert message in str(e.value)


def test_pruning_overrides_refuse_non_finite_numbers():
    """lmms-eval turns `pruning.stage2.diversity=nan` (or inf) into a float: it was accepted."""
    _, overrides = parse_model_args({"pruning.stage2.diversity": float("inf")})
    with pytest.raises(ConfigError, match=r"'stage2.diversity' = inf must be a finite number"):
        apply_pruning_overrides(PruningConfig(), overrides)


def test_a_pruning_yaml_with_a_python_tag_or_binary_bytes_is_named(tmp_path):
    """A raw yaml.ConstructorError before (safe_load never builds the object: nothing runs)."""
    p = tmp_path / "pruning.yaml"
    p.write_text("stage2: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(ConfigError) as e:
        read_pruning_yaml(p)
    assert str(e.value).startswith(
        f"{p}: not a plain YAML config (could not determine a constructor for the tag"
    )
    p.write_bytes(b"stage2:\n  layer: \xff\n")
    with pytest.raises(ConfigError, match=r"pruning.yaml: not UTF-8 text \(byte 17\)"):
        read_pruning_yaml(p)
    p.write_text("stage2:\n  diversity: .nan\n")
    with pytest.raises(ConfigError, match=r"pruning.yaml: 'stage2.diversity' = nan must be a finite number"):
        read_pruning_yaml(p)
