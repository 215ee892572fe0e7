"""Teacher cache: KD read from the cache equals online KD (full vocabulary), top-k is close, a cache
for another model / temperature / data is refused, and an interrupted build continues."""

from __future__ import annotations

import json

import pytest
import torch

from tpkit.cli import main
from tpkit.data.collator import LlavaCollator
from tpkit.data.llava_json import load_llava_json
from tpkit.training.recipe import build_module, build_student, fit
from tpkit.training.teacher_cache.build import build_teacher_cache
from tpkit.training.teacher_cache.cache import TeacherCache, TeacherCacheError

from .conftest import tiny_cfg_dict


@pytest.fixture(scope="module")
def records(train_json):
    ds, _ = load_llava_json(train_json)
    return [ds[i] for i in range(len(ds))]


def _cfg(make_cfg, cache=None, **sections):
    distill = {"alpha": 1.0, "temperature": 2.0, **({"teacher_cache": str(cache)} if cache else {})}
    return make_cfg(distill=distill, **sections)


def _build(cfg, processor, records, out, **kw):
    return build_teacher_cache(
        cfg, out, dataset=records, processor=processor, device="cpu", progress=False, **kw
    )


def _module(cfg, processor, perturb: bool = False):
    peft_model, attached = build_student(cfg, processor)
    if perturb:  # a trained-looking adapter (the same for every module built with perturb)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in peft_model.parameters():
                if p.requires_grad:
                    p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return build_module(cfg, peft_model, attached)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_full_vocab_cache_equals_online_kd(make_cfg, processor, records, tmp_path, kind):
    cfg = _cfg(make_cfg)
    cache = _build(cfg, processor, records, tmp_path / "cache", batch_size=5)  # other batches than training's
    online = _module(make_cfg(distill={"alpha": 1.0, "temperature": 2.0, "kind": kind}), processor, True)
    cached_cfg = make_cfg(
        distill={"alpha": 1.0, "temperature": 2.0, "kind": kind, "teacher_cache": str(cache)}
    )
    cached = _module(cached_cfg, processor, True)
    assert cached.teacher_cache is not None and online.teacher_cache is None
    batch = LlavaCollator(processor, max_length=128, mode="train")([records[i] for i in (3, 0, 9, 14)])
    po, pc = online.losses(batch), cached.losses(batch)
    assert po["kd"] > 1e-4
    torch.testing.assert_close(pc["kd"], po["kd"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(pc["teacher_acc"], po["teacher_acc"])
    po["loss"].backward()
    pc["loss"].backward()
    for (n, a), (_, b) in zip(online.model.named_parameters(), cached.model.named_parameters()):
        if a.requires_grad:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-3, atol=1e-6, msg=n)


def test_topk_cache_is_close_and_small(make_cfg, processor, records, tmp_path):
    cfg = _cfg(make_cfg)
    full = _build(cfg, processor, records, tmp_path / "full")
    top = _build(cfg, processor, records, tmp_path / "top", top_k=8, dtype="float16")
    size = {p: sum(f.stat().st_size for f in p.glob("*.bin")) for p in (full, top)}
    meta = json.loads((top / "meta.json").read_text())
    assert meta["k"] == 8 and not meta["full_vocab"] and meta["records"] == len(records)
    assert size[top] < size[full] / 4
    batch = LlavaCollator(processor, max_length=128, mode="train")(records[:4])
    with torch.no_grad():
        a = _module(_cfg(make_cfg, full), processor, True).losses(batch)["kd"]
        b = _module(_cfg(make_cfg, top), processor, True).losses(batch)["kd"]
    # the collapsed divergence is a lower bound (+ the tail floor); a random model's logits are nearly
    # flat, so 8 of 333 classes hold little of the mass here (test_losses checks a peaked teacher)
    assert 0 < float(b) <= float(a) * 1.05


def test_training_on_the_cache_equals_online(make_cfg, processor, records, tmp_path):
    """A few optimiser steps through train.py's fit: same adapter as with the online teacher."""
    cfg = _cfg(make_cfg)
    cache = _build(cfg, processor, records, tmp_path / "cache")
    results = []
    for name, extra in (("online", {}), ("cached", {"teacher_cache": str(cache)})):
        d = tiny_cfg_dict(
            cfg.data.train_json, tmp_path / name, distill={"alpha": 1.0, "temperature": 2.0, **extra}
        )
        from tpkit.config import from_dict
        from tpkit.training.config import TrainConfig

        res = fit(from_dict(TrainConfig, d), processor=processor)
        results.append(
            {n: p.detach().clone() for n, p in res.module.model.named_parameters() if p.requires_grad}
        )
    assert results[0].keys() == results[1].keys()
    for n in results[0]:
        torch.testing.assert_close(results[1][n], results[0][n], rtol=1e-3, atol=1e-5, msg=n)


def test_refuses_another_teacher_temperature_or_data(make_cfg, processor, records, tmp_path):
    cfg = _cfg(make_cfg)
    cache = _build(cfg, processor, records[:8], tmp_path / "cache")
    other_model = make_cfg(
        model={"seed": 1}, distill={"alpha": 1.0, "temperature": 2.0, "teacher_cache": str(cache)}
    )
    with pytest.raises(TeacherCacheError, match="does not fit this run.*embed_sum"):
        _module(other_model, processor)
    with pytest.raises(TeacherCacheError, match=r"temperature: 2.0 \(cache\) vs 1.0"):
        _module(make_cfg(distill={"alpha": 1.0, "temperature": 1.0, "teacher_cache": str(cache)}), processor)
    m = _module(_cfg(make_cfg, cache), processor)
    batch = LlavaCollator(processor, max_length=128, mode="train")(records[6:10])  # 8, 9 are not cached
    with pytest.raises(TeacherCacheError, match="is not in the teacher cache"):
        m.losses(batch)
    changed = [dict(r) for r in records[:4]]
    changed[1]["conversations"] = [dict(t) for t in changed[1]["conversations"]]
    changed[1]["conversations"][1]["value"] = "a different answer than before"
    with pytest.raises(TeacherCacheError, match="answer tokens"):
        m.losses(LlavaCollator(processor, max_length=128, mode="train")(changed))
    with pytest.raises(TeacherCacheError, match="no finished teacher cache"):
        _module(_cfg(make_cfg, tmp_path / "missing"), processor)


def test_interrupted_build_continues(make_cfg, processor, records, tmp_path, monkeypatch):
    cfg = _cfg(make_cfg)
    whole = _build(cfg, processor, records, tmp_path / "whole", batch_size=4)
    import tpkit.training.teacher_cache.build as tc

    calls = {"n": 0}
    original = tc._Writer.commit

    def commit(self):
        original(self)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(tc._Writer, "commit", commit)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):  # after the 2nd batch (commit_every_s=0: after every batch)
        _build(cfg, processor, records, out, batch_size=4, commit_every_s=0)
    monkeypatch.undo()
    with pytest.raises(TeacherCacheError, match="not finished"):
        TeacherCache(out)
    assert len(json.loads((out / "progress.json").read_text())["ids"]) == 8
    _build(cfg, processor, records, out, batch_size=4, workers=1)  # collation in a worker process now
    for f in ("values.bin", "lse.bin", "targets.bin", "records.json"):
        assert (out / f).read_bytes() == (whole / f).read_bytes(), f


def test_cli_builds_and_refuses_to_overwrite(processor, train_json, tmp_path, capsys):
    import yaml

    d = tiny_cfg_dict(train_json, tmp_path / "run")
    d["data"]["max_length"] = 512  # the built-in processor's 96 px images: 144 image tokens
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(d))
    out = tmp_path / "cache"
    assert (
        main(
            ["teacher-cache", "--config", str(cfg_path), "--out", str(out), "--top-k", "4", "--device", "cpu"]
        )
        == 0
    )
    assert "16 records" in capsys.readouterr().out
    assert main(["teacher-cache", "--config", str(cfg_path), "--out", str(out), "--device", "cpu"]) == 2
    assert "already holds" in capsys.readouterr().err


def test_shards_read_as_one_cache(make_cfg, processor, records, tmp_path):
    """--shard i/N (one process per GPU) writes N directories that training reads as one cache."""
    import shutil

    cfg = _cfg(make_cfg)
    whole = _build(cfg, processor, records, tmp_path / "whole", top_k=8)
    sharded = tmp_path / "sharded"
    for i in range(3):
        out = _build(cfg, processor, records, sharded, top_k=8, shard=(i, 3))
        assert out.name == f"shard-{i:05d}-of-00003"
    a, b = TeacherCache(whole), TeacherCache(sharded)
    assert len(b.parts) == 3 and b.row_of.keys() == a.row_of.keys()
    batch = LlavaCollator(processor, max_length=128, mode="train")([records[i] for i in (5, 0, 13, 7)])
    with torch.no_grad():
        ka = _module(_cfg(make_cfg, whole), processor, True).losses(batch)["kd"]
        kb = _module(_cfg(make_cfg, sharded), processor, True).losses(batch)["kd"]
    torch.testing.assert_close(kb, ka)
    shutil.rmtree(sharded / "shard-00001-of-00003")
    with pytest.raises(TeacherCacheError, match="missing.*shard-00001-of-00003"):
        TeacherCache(sharded)


def test_duplicate_or_missing_ids_are_refused_before_building(make_cfg, processor, records, tmp_path):
    cfg = _cfg(make_cfg)
    dup = [*records[:4], {**records[5], "id": records[1]["id"]}]
    with pytest.raises(TeacherCacheError, match=r"1 record ids occur more than once.*'train-000001' x2"):
        _build(cfg, processor, dup, tmp_path / "dup")
    assert not (tmp_path / "dup").exists()  # refused before any work
    with pytest.raises(TeacherCacheError, match="1 training records have no 'id'"):
        _build(
            cfg, processor, [*records[:2], {k: v for k, v in records[3].items() if k != "id"}], tmp_path / "x"
        )


def test_rows_of_a_student_that_dropped_answer_positions(make_cfg, processor, records, tmp_path):
    """Rows are looked up by rank among the record's answer positions, so a student that kept only
    some of them (or saw other left padding) still gets each row's own teacher row."""
    from tpkit.training.teacher_cache.cache import answer_ranks

    cfg = _cfg(make_cfg)
    cache = TeacherCache(_build(cfg, processor, records, tmp_path / "c", batch_size=3))
    batch = LlavaCollator(processor, max_length=128, mode="train")([records[i] for i in (2, 11)])
    labels = batch["labels"]
    dense = torch.zeros_like(labels, dtype=torch.bool)
    dense[:, :-1] = labels[:, 1:] != -100
    b_all, t_all = dense.nonzero(as_tuple=True)
    counts, ranks = answer_ranks(labels, b_all, t_all)
    full = cache.lookup(batch["ids"], counts, b_all, ranks, device="cpu")
    keep = torch.arange(len(b_all)) % 2 == 1  # a student that lost every other answer position
    _, sub_ranks = answer_ranks(labels, b_all[keep], t_all[keep])
    sub = cache.lookup(batch["ids"], counts, b_all[keep], sub_ranks, device="cpu")
    torch.testing.assert_close(sub.values, full.values[keep])
    assert torch.equal(sub.targets, labels[b_all[keep], t_all[keep] + 1])


def test_fingerprint_survives_dtype_but_not_other_weights(make_cfg, processor):
    from tpkit.models.loading import load_base_model
    from tpkit.training.teacher_cache.cache import _fingerprint_diff, model_fingerprint

    cfg = make_cfg()
    base = load_base_model(cfg.model, dtype=torch.float32, processor=processor)
    fp32 = model_fingerprint(base)
    assert not _fingerprint_diff(
        fp32, model_fingerprint(base.to(torch.bfloat16))
    )  # built in fp32, read in bf16
    with torch.no_grad():
        base.get_output_embeddings().weight[0, :4] += 1.0
    assert _fingerprint_diff(fp32, model_fingerprint(base))[0].startswith("lm_head_sum")


@pytest.mark.parametrize("edit", ["k", "rows", "cut values.bin"])
def test_a_cache_whose_metadata_and_arrays_disagree_is_refused(make_cfg, processor, records, tmp_path, edit):
    cfg = _cfg(make_cfg)
    cache = _build(cfg, processor, records[:4], tmp_path / "cache", top_k=8)
    meta_path = cache / "meta.json"
    meta = json.loads(meta_path.read_text())
    if edit == "cut values.bin":
        data = (cache / "values.bin").read_bytes()
        (cache / "values.bin").write_bytes(data[: len(data) // 2])
    else:
        meta[edit] = int(meta[edit]) + 1  # e.g. k edited by hand: rows would be read misaligned
        meta_path.write_text(json.dumps(meta))
    with pytest.raises(
        TeacherCacheError, match=r"is inconsistent: .*values\.bin: \d+ bytes, meta\.json \(rows="
    ):
        TeacherCache(cache)


def test_a_cache_with_hidden_weight_names_the_set_that_fixes_it(tmp_path, capsys):
    """configs/train/tiny.yaml sets hidden_weight 16, which a cache cannot serve: the error says
    which --set to add (the README's commands add it)."""
    argv = ["train", "--config", "configs/train/tiny.yaml", "--set", f"distill.teacher_cache={tmp_path}"]
    assert main(argv) == 2
    assert "--set distill.hidden_weight=0 to use the cache" in capsys.readouterr().err
    assert (
        main(
            ["teacher-cache", "--config", "configs/train/tiny.yaml", "--out", str(tmp_path), "--print-config"]
        )
        == 0
    )


def _damage(cache, damage: str) -> tuple[str, str]:
    """Damage a built top-k cache; (the file named, what the error says)."""
    meta = json.loads((cache / "meta.json").read_text())
    rec = json.loads((cache / "records.json").read_text())
    vocab = meta["model"]["vocab_size"]
    if damage == "bad dtype":
        (cache / "meta.json").write_text(json.dumps({**meta, "dtype": "float99"}))
        return "meta.json", "dtype = 'float99', expected one of ['float32', 'float16']"
    if damage == "k null":
        (cache / "meta.json").write_text(json.dumps({**meta, "k": None}))
        return "meta.json", "k = None, expected an integer >= 1"
    if damage == "non-UTF-8 text":
        (cache / "records.json").write_bytes(b"\xff\xfe" + (cache / "records.json").read_bytes())
        return "records.json", "not UTF-8 text (byte 0)"
    if damage == "negative offset":
        rec["offsets"][1] = -1
        (cache / "records.json").write_text(json.dumps(rec))
        return "records.json", f"offsets[1] = -1 < offsets[0] = 0 (record {rec['ids'][0]!r})"
    raw = bytearray((cache / "indices.bin").read_bytes())  # "out-of-range index": row 1's 3rd id
    at = (meta["k"] + 2) * 4
    raw[at : at + 4] = (vocab + 5).to_bytes(4, "little")
    (cache / "indices.bin").write_bytes(bytes(raw))
    return "indices.bin", f"row 1 holds vocabulary id {vocab + 5}, outside [0, {vocab})"


@pytest.mark.parametrize(
    "damage", ["bad dtype", "k null", "non-UTF-8 text", "negative offset", "out-of-range index"]
)
def test_a_damaged_cache_file_is_named_before_any_model_is_loaded(
    make_cfg, processor, records, tmp_path, damage
):
    """Raw TypeError / UnicodeDecodeError / IndexError tracebacks before, or (a negative offset)
    accepted and read as other rows."""
    cache = _build(_cfg(make_cfg), processor, records[:4], tmp_path / "cache", top_k=8)
    name, message = _damage(cache, damage)
    with pytest.raises(TeacherCacheError) as e:
        TeacherCache(cache)  # no model needed
    assert str(e.value).startswith(f"{cache / name}: {message}") and "Rebuild it: tpkit teacher-cache" in str(
        e.value
    )


def test_the_run_checks_its_cache_before_building_the_model(
    make_cfg, processor, records, tmp_path, monkeypatch
):
    from tpkit.training import recipe

    cfg = _cfg(make_cfg)
    cache = _build(cfg, processor, records[:4], tmp_path / "cache", top_k=8)
    _damage(cache, "out-of-range index")
    monkeypatch.setattr(recipe, "build_student", lambda *a, **k: pytest.fail("a model was built"))
    with pytest.raises(TeacherCacheError, match=r"indices\.bin: row 1 holds vocabulary id"):
        fit(_cfg(make_cfg, cache=cache), processor=processor)
