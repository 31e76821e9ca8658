from __future__ import annotations

import pytest

from xrai.config import TrainConfig


def test_json_round_trip(tmp_path):
    cfg = TrainConfig(data="fracatlas", model="resnet18", body_part="wrist,hand", loggers=["mlflow"], epochs=7,
                      deterministic=True, val_fraction=0.2, test_fraction=0.1)
    cfg.to_json(tmp_path / "config.json")
    assert TrainConfig.from_json(tmp_path / "config.json") == cfg
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert TrainConfig.from_json(cfg.to_json()).deterministic is True and TrainConfig().deterministic is False


def test_keyword_only():
    with pytest.raises(TypeError):
        TrainConfig("synthetic")  # type: ignore[misc]


@pytest.mark.parametrize("field, value, message", [
    ("optimizer", "lamb", "unknown optimizer 'lamb'; choose one of: adamw, adam, sgd"),
    ("scheduler", "cyclic", "unknown scheduler"),
    ("monitor", "f1", "unknown monitor"),
    ("prune_sparsity", 1.0, "prune_sparsity"),
    ("epochs", 0, "epochs"),
    ("loggers", ["tensorboard"], "unknown loggers"),
    ("val_fraction", 0.9, r"val_fraction \+ test_fraction must be < 1"),
])
def test_bad_values_name_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{field: value})


def test_unknown_key_is_an_error():
    with pytest.raises(ValueError, match="unknown TrainConfig field"):
        TrainConfig.from_dict({"epochz": 3})


def test_derived_sizes_and_parts():
    assert TrainConfig(data="synthetic").image_size == 128
    assert TrainConfig(data="mura").image_size == 224
    assert TrainConfig(data="mura").resize_size == 256
    assert TrainConfig(img_size=64, cache_size=80).resize_size == 80
    assert TrainConfig().body_parts() is None
    assert TrainConfig(body_part="Wrist").body_parts() == ["wrist"]
    assert TrainConfig(body_part="wrist, hand").body_parts() == ["wrist", "hand"]
