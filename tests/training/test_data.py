"""tpkit.training.data: the synthetic splits it writes."""


def test_generated_splits_follow_the_config(tmp_path):
    """A changed synthetic_n_train rewrites the split instead of training on the old one."""
    import json

    from tpkit.config import DataConfig
    from tpkit.training.data import ensure_synthetic_data

    cfg = DataConfig(
        train_json=str(tmp_path / "train.json"),
        val_json=str(tmp_path / "val.json"),
        generate_synthetic=True,
        synthetic_n_train=3,
        synthetic_n_val=2,
    )
    ensure_synthetic_data(cfg)
    assert len(json.loads((tmp_path / "train.json").read_text())) == 3
    cfg.synthetic_n_train = 5
    ensure_synthetic_data(cfg)
    assert len(json.loads((tmp_path / "train.json").read_text())) == 5
    assert len(json.loads((tmp_path / "val.json").read_text())) == 2
