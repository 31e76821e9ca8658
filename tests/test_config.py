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


@pytest.mark.parametrize("field, value, message", [
    ("lr", -1.0, r"lr must be a number > 0, got -1.0"),
    ("lr", 0, "lr must be a number > 0"),
    ("lr", float("nan"), "lr must be a number > 0"),
    ("lr", float("inf"), "lr must be a number > 0"),
    ("lr", "0.001", "lr must be a number > 0, got '0.001'"),
    ("img_size", 7, r"img_size must be an integer >= 32 \(every model downsamples by 32"),
    ("img_size", 31, "img_size must be an integer >= 32"),
    ("img_size", 224.0, "img_size must be an integer >= 32"),
    ("batch_size", 0, "batch_size must be an integer >= 1"),
    ("epochs", True, "epochs must be an integer >= 1"),
    ("val_fraction", 0.0, r"val_fraction must be a number in \(0, 1\)"),
    ("test_fraction", 1.0, r"test_fraction must be a number in \(0, 1\)"),
    ("weight_decay", -1e-4, "weight_decay must be a number >= 0"),
    ("momentum", 1.0, r"momentum must be a number in \[0, 1\)"),
    ("dropout", 1.0, r"dropout must be a number in \[0, 1\)"),
    ("dropout", -0.1, r"dropout must be a number in \[0, 1\)"),
    ("prune_iterations", 0, "prune_iterations must be an integer >= 1"),
    ("warmup_epochs", -1, "warmup_epochs must be an integer >= 0"),
    ("step_size", 0, "step_size must be an integer >= 1"),
    ("step_gamma", 0.0, r"step_gamma must be a number in \(0, 1\]"),
    ("exp_gamma", 1.5, r"exp_gamma must be a number in \(0, 1\]"),
    ("patience", -1, "patience must be an integer >= 0"),
    ("seed", -1, "seed must be an integer >= 0"),
    ("num_workers", -2, "num_workers must be an integer >= 0"),
    ("max_batches", -1, "max_batches must be an integer >= 0"),
    ("pretrained", "False", "pretrained must be True or False, got 'False'"),
    ("amp", 1, "amp must be True or False"),
])
def test_every_numeric_setting_is_range_checked(field, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{field: value})


def test_combined_and_relative_limits():
    with pytest.raises(ValueError, match=r"val_fraction \+ test_fraction must be < 1"):
        TrainConfig(val_fraction=0.5, test_fraction=0.5)
    with pytest.raises(ValueError, match="cache_size must be an integer >= 64"):
        TrainConfig(img_size=64, cache_size=48)
    with pytest.raises(ValueError, match="lr must be"):  # replace() and from_dict() check too
        TrainConfig().replace(lr=-1)
    with pytest.raises(ValueError, match="img_size must be"):
        TrainConfig.from_dict({"img_size": 16})


@pytest.mark.parametrize("size", [32, 48, 224, 300, 380, 600])
def test_any_image_size_from_32_is_accepted(size):
    """EfficientNet-B3's own 300 and B4's 380 are not multiples of 32; the models take any side >= 32."""
    assert TrainConfig(img_size=size).image_size == size


def test_the_models_accept_the_smallest_allowed_size():
    import torch

    from xrai.config import MIN_IMG_SIZE
    from xrai.models.factory import create_model

    for name in ("mobilenet_v2", "resnet18"):
        model = create_model(name, pretrained=False).eval()
        with torch.inference_mode():
            assert model(torch.zeros(1, 3, MIN_IMG_SIZE + 13, MIN_IMG_SIZE)).shape == (1, 1)


@pytest.mark.parametrize("field", ["pretrained", "freeze", "pos_weighting", "tta", "amp", "channels_last",
                                   "deterministic", "sync_bn"])
def test_every_switch_must_be_a_bool(field):
    """Each field declared bool is checked (tta, pos_weighting and deterministic once slipped through)."""
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: "yes"})


@pytest.mark.parametrize("size", [1025, 3000, 10**9])
def test_img_size_has_an_upper_bound(size):
    """Issue 25, fault 11: a huge img_size failed late in a MemoryError traceback; now one ValueError line."""
    from xrai.config import MAX_IMG_SIZE

    with pytest.raises(ValueError, match=rf"img_size must be an integer in \[32, {MAX_IMG_SIZE}\].*got {size}$"):
        TrainConfig(img_size=size)
    assert TrainConfig(img_size=MAX_IMG_SIZE).image_size == MAX_IMG_SIZE
