"""Split files: deterministic per seed, reused only when written the same way, the CLI."""

import json

import pytest
from PIL import Image

from tpkit.cli import main
from tpkit.synthetic.questions import named_objects
from tpkit.synthetic.scenes import QTYPES, SyntheticConfig
from tpkit.synthetic.splits import FORMAT, ensure_split, generate_split


def test_generate_split_is_deterministic_per_seed(tmp_path):
    a = generate_split(tmp_path / "a", "test", n=12, seed=3)
    b = generate_split(tmp_path / "b", "test", n=12, seed=3)
    c = generate_split(tmp_path / "c", "test", n=12, seed=4)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    records = json.loads(a.read_text())
    assert len(records) == 12
    for r in records:
        ia, ib, ic = (p.parent / r["image"] for p in (a, b, c))
        assert ia.read_bytes() == ib.read_bytes()
        assert ia.read_bytes() != ic.read_bytes()
        with Image.open(ia) as im:
            assert im.size == (96, 96) and im.mode == "RGB"


def test_ensure_split_reuses_only_a_matching_split(tmp_path, capsys):
    path = ensure_split(tmp_path, "test", n=5, seed=1)
    assert len(json.loads(path.read_text())) == 5
    stamp = path.stat().st_mtime_ns
    assert ensure_split(tmp_path, "test", n=5, seed=1) == path and path.stat().st_mtime_ns == stamp
    assert capsys.readouterr().err == ""

    ensure_split(tmp_path, "test", n=3, seed=1)  # another size: written again, stale images removed
    assert "n 5 -> 3" in capsys.readouterr().err
    assert path.read_bytes() == generate_split(tmp_path / "ref", "test", n=3, seed=1).read_bytes()
    assert sorted(p.name for p in (tmp_path / "images" / "test").iterdir()) == [
        "000000.png",
        "000001.png",
        "000002.png",
    ]
    ensure_split(tmp_path, "test", n=3, seed=2)
    assert "seed 1 -> 2" in capsys.readouterr().err
    assert json.loads(path.read_text()) == json.loads(
        generate_split(tmp_path / "r2", "test", n=3, seed=2).read_text()
    )
    ensure_split(tmp_path, "test", n=3, seed=2, cfg=SyntheticConfig.for_split("ood"))
    assert "generator config" in capsys.readouterr().err

    own = tmp_path / "own"  # a file without the meta file is not ours: never rewritten
    own.mkdir()
    (own / "test.json").write_text("[]\n")
    assert ensure_split(own, "test", n=4, seed=0).read_text() == "[]\n"


def test_record_format(tmp_path):
    path = generate_split(tmp_path, "val", n=8, seed=0)
    records = json.loads(path.read_text())
    for i, r in enumerate(records):
        assert r["id"] == f"val-{i:06d}"
        assert r["image"] == f"images/val/{i:06d}.png"
        conv = r["conversations"]
        assert [t["from"] for t in conv] == ["human", "gpt"]
        assert conv[0]["value"].startswith("<image>\n") and conv[0]["value"].count("<image>") == 1
        assert len(conv[1]["value"].split()) == 1
        assert r["qtype"] in QTYPES
        assert (r["neg_type"] is None) == (conv[1]["value"] != "no" or r["qtype"] != "exist")
        assert r["named_objects"] == named_objects(r)
    meta = json.loads((tmp_path / "val.meta.json").read_text())
    assert meta["format"] == FORMAT and meta["n"] == 8 and meta["config"]["image_size"] == 96


def test_config_validation_and_cli(tmp_path, capsys):
    with pytest.raises(ValueError, match="max_objects"):
        SyntheticConfig(min_objects=3, max_objects=2).validate()
    with pytest.raises(ValueError, match="split"):
        SyntheticConfig.for_split("dev")
    cli = ["data", "synthetic", "--out", str(tmp_path), "--split", "test", "--n", "4"]
    assert main([*cli, "--seed", "1"]) == 0
    assert len(json.loads((tmp_path / "test.json").read_text())) == 4
    assert main([*cli, "--turns", "7"]) == 2
    assert "turns" in capsys.readouterr().err
    assert main(["data", "synthetic", "--bench", "20"]) == 0
    assert "images/s" in capsys.readouterr().out
