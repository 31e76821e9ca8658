"""The recipe knobs: named recipes, one-cycle, label smoothing, positive weighting, EMA, flip TTA, keep last."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from xrai.config import PRE_RECIPE_VALUES, TrainConfig
from xrai.recipe import RECIPE_FIELDS, RECIPES, recipe_config, recipe_of
from xrai.train.regularise import SmoothedBCEWithLogitsLoss, build_criterion
from xrai.train.trainer import build_optimizer, build_scheduler, fit, validate

pytestmark = pytest.mark.usefixtures("one_thread")


def _config(**changes) -> TrainConfig:
    base = dict(data="synthetic", pretrained=False, epochs=2, img_size=32, batch_size=16, num_workers=0,
                input_path="cached", max_batches=2, warmup_epochs=0, patience=0)
    return TrainConfig(**{**base, **changes})


def test_named_recipes_set_every_recipe_field():
    for name, fields in RECIPES.items():
        assert set(fields) == set(RECIPE_FIELDS), name
    config = recipe_config("v1", data="fracatlas", lr=5e-4)
    assert config.lr == 5e-4 and config.resize == "letterbox" and config.keep == "best" and config.batch_size == 32
    assert recipe_of(config)["lr"] == 5e-4
    with pytest.raises(ValueError, match="unknown recipe 'v0'; choose one of: v1, v2"):
        recipe_config("v0")
    # the default: the old recipe with the three changes the grouped CV chose, nothing else
    changed = {k: v for k, v in RECIPES["v2"].items() if RECIPES["v1"][k] != v}
    assert changed == {"lr": 2e-3, "resize": "stretch", "tta": True}


def test_a_config_saved_before_the_recipe_fields_reads_back_as_trained():
    saved = TrainConfig().to_dict()
    for name in PRE_RECIPE_VALUES:
        del saved[name]
    config = TrainConfig.from_dict(saved)
    assert {name: getattr(config, name) for name in PRE_RECIPE_VALUES} == PRE_RECIPE_VALUES


@pytest.mark.parametrize("field, value, match", [
    ("resize", "crop", "choose one of: letterbox, stretch"), ("keep", "first", "choose one of: best, last"),
    ("crop_scale", 0.0, "crop_scale"), ("label_smoothing", 1.0, "label_smoothing"), ("ema_decay", -0.1, "ema_decay"),
    ("aug_strength", -1.0, "aug_strength"),
])
def test_bad_recipe_values_name_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**{field: value})


def test_one_cycle_peaks_at_lr_and_ends_low():
    model = nn.Linear(2, 1)
    config = _config(scheduler="onecycle", lr=2e-3, epochs=4)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config, steps_per_epoch=10)
    lrs = []
    for _ in range(40):
        optimizer.step()
        scheduler.step() if len(lrs) < 39 else None
        lrs.append(optimizer.param_groups[0]["lr"])
    assert max(lrs) == pytest.approx(2e-3, rel=1e-3) and lrs[0] < 2e-3 / 10 and lrs[-1] < 2e-3 / 100


def test_label_smoothing_and_positive_weighting():
    logits, y = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([1.0, 0.0, 1.0])
    smoothed = SmoothedBCEWithLogitsLoss(0.1)(logits, y)
    assert smoothed == pytest.approx(nn.BCEWithLogitsLoss()(logits, torch.tensor([0.95, 0.05, 0.95])).item())
    train, evaluation = build_criterion(_config(label_smoothing=0.1), 3.0, torch.device("cpu"))
    assert isinstance(train, SmoothedBCEWithLogitsLoss) and float(train.pos_weight) == 3.0
    assert type(evaluation) is nn.BCEWithLogitsLoss  # validation losses stay comparable across recipes
    train, evaluation = build_criterion(_config(), None, torch.device("cpu"))
    assert train is evaluation and train.pos_weight is None


def test_flip_tta_averages_the_two_probabilities():
    class Half(nn.Module):  # the logit is the mean of the left half: flipping changes it
        def forward(self, x):
            return x[..., : x.shape[-1] // 2].mean(dim=(1, 2, 3)).unsqueeze(1)

    x = torch.randn(6, 3, 8, 8)
    y = torch.tensor([0.0, 1, 0, 1, 0, 1])

    class Source:
        def __len__(self):
            return 1

        def epoch(self, epoch):
            yield x, y

    criterion = nn.BCEWithLogitsLoss()
    plain = validate(Half(), Source(), criterion, device=torch.device("cpu"), amp_dtype=None, progress=False)
    tta = validate(Half(), Source(), criterion, device=torch.device("cpu"), amp_dtype=None, tta=True, progress=False)
    p = (torch.sigmoid(Half()(x)) + torch.sigmoid(Half()(torch.flip(x, dims=[3])))).reshape(-1) / 2
    assert tta["val_loss"] == pytest.approx(nn.BCELoss()(p, y).item(), rel=1e-4)
    assert plain["val_loss"] != pytest.approx(tta["val_loss"])


def test_ema_weights_are_validated_and_handed_on(synthetic_manifest, tmp_path):
    from xrai.runs.load import load_model

    config = _config(ema_decay=0.5, keep="last")
    fit(config, synthetic_manifest, tmp_path / "run", progress=False)
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    best = torch.load(tmp_path / "run" / "checkpoints" / "best.pt", weights_only=True)
    assert last["ema"] is not None and best["epoch"] == 2
    name = next(k for k in best["model"] if k.endswith("weight") and best["model"][k].is_floating_point())
    assert torch.equal(best["model"][name], last["ema"]["module." + name])
    assert not torch.equal(best["model"][name], last["model"][name])  # the raw weights stay for resuming
    model, _ = load_model(tmp_path / "run", which="last")
    assert torch.equal(model.state_dict()[name], best["model"][name])


def test_ema_resumes_exactly(synthetic_manifest, tmp_path):
    config = _config(ema_decay=0.5, scheduler="none")  # a schedule's shape depends on epochs, raised here
    fit(config, synthetic_manifest, tmp_path / "straight", progress=False)
    fit(config.replace(epochs=1), synthetic_manifest, tmp_path / "resumed", progress=False)
    fit(config, synthetic_manifest, tmp_path / "resumed", resume=True, progress=False)
    a = torch.load(tmp_path / "straight" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoints" / "last.pt", weights_only=True)
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_a_run_without_validation_needs_keep_last(synthetic_manifest, tmp_path):
    pool = synthetic_manifest.assign(split=synthetic_manifest["split"].replace({"valid": "train"}))
    with pytest.raises(ValueError, match="keep='last'"):
        fit(_config(keep="best"), pool, tmp_path / "best", progress=False)
    result = fit(_config(keep="last", pos_weighting=False), pool, tmp_path / "last", progress=False)
    history = pd.read_csv(tmp_path / "last" / "history.csv")
    assert len(history) == 2 and history["val_auroc"].isna().all() and math.isfinite(history["train_loss"].iloc[-1])
    best = torch.load(tmp_path / "last" / "checkpoints" / "best.pt", weights_only=True)
    assert best["epoch"] == 2 and result.stopped_early is False


def test_cli_recipe_flags_override_the_named_recipe():
    from xrai.cli.commands import _train_config, build_parser

    args = build_parser().parse_args(["train", "--recipe", "v1", "--lr", "0.002", "--no-pos-weighting", "--tta",
                                      "--keep", "last", "--patience", "0"])
    config = _train_config(args)
    assert (config.lr, config.pos_weighting, config.tta, config.keep, config.batch_size) == (0.002, False, True,
                                                                                            "last", 32)
    default = _train_config(build_parser().parse_args(["train"]))  # ImageNet weights by default: ft1
    assert recipe_of(default) == recipe_of(recipe_config("ft1"))
    scratch = _train_config(build_parser().parse_args(["train", "--no-pretrained"]))
    assert recipe_of(scratch) == recipe_of(TrainConfig())  # from scratch: TrainConfig's defaults (v2)


# ---- the input recipe: resize mode, crop scale, augmentation strength ------------------------------


def test_stretch_fills_the_square_and_letterbox_pads():
    from xrai.data.decode.images import fit_square

    image = np.full((40, 80), 200, dtype=np.uint8)
    stretched, boxed = fit_square(image, 32, "stretch"), fit_square(image, 32, "letterbox")
    assert stretched.shape == boxed.shape == (32, 32)
    assert (stretched == 200).all() and (boxed == 0).any()
    with pytest.raises(ValueError, match="choose one of: letterbox, stretch"):
        fit_square(image, 32, "crop")


def test_augment_options_scale_the_training_ranges():
    from xrai.data.augment import GpuAugment, augment_options

    none = GpuAugment(16, train=True, **augment_options(crop_scale=0.3, aug_strength=0.0))
    params = none.sample_params(256, 20, torch.Generator().manual_seed(0))
    assert (params["angle"] == 0).all() and (params["brightness"] == 1).all() and (params["contrast"] == 1).all()
    area = params["box"][:, 2] * params["box"][:, 3] / 400
    assert area.min() < 0.5 and area.max() <= 1.0 + 1e-9  # crops down to 0.3 of the area
    strong = GpuAugment(16, train=True, **augment_options(aug_strength=2.0))
    params = strong.sample_params(256, 20, torch.Generator().manual_seed(0))
    assert params["angle"].abs().max() > math.radians(15) and params["brightness"].max() > 1.3
    default = augment_options()
    assert GpuAugment(16, train=True, **default).degrees == GpuAugment(16, train=True).degrees  # strength 1 = v1
    with pytest.raises(ValueError, match="aug_strength"):
        augment_options(aug_strength=6.0)


def test_stretch_is_one_definition_on_every_path(synthetic_manifest, tmp_path):
    """Cached and classic training give the same weights; inference preprocessing is the cache's pixels."""
    from xrai.data.augment import preprocess
    from xrai.data.cache import build_cache, find_cache
    from xrai.data.decode.images import read_image

    config = _config(resize="stretch", crop_scale=0.4, aug_strength=0.5, epochs=1)
    fit(config, synthetic_manifest, tmp_path / "cached", progress=False)
    fit(config.replace(input_path="classic"), synthetic_manifest, tmp_path / "classic", progress=False)
    a = torch.load(tmp_path / "cached" / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "classic" / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    size = config.resize_size
    stretched = find_cache(synthetic_manifest, size=size, resize="stretch")
    boxed = build_cache(synthetic_manifest.head(4), size=size, cache_dir=tmp_path / "c", progress=False)
    assert stretched is not None and stretched.key != boxed.key
    assert find_cache(synthetic_manifest.head(4), size=size, cache_dir=tmp_path / "c", resize="stretch") is None
    path = synthetic_manifest["path"].iloc[0]
    x = preprocess([read_image(path)], image_size=config.image_size, resize_size=size, resize="stretch")
    row = torch.from_numpy(np.array(stretched.array[stretched.rows([path])[0]]))[None, None]
    from xrai.data.augment import GpuAugment

    torch.testing.assert_close(x, GpuAugment(config.image_size, train=False)(row))


def test_cam_maps_back_through_the_resize_mode():
    from xrai.explain.overlays import cam_to_image

    cam = np.ones((28, 28), dtype=np.float32)
    stretched = cam_to_image(cam, (40, 80), resize_size=32, resize="stretch")
    boxed = cam_to_image(cam, (40, 80), resize_size=32, resize="letterbox")
    assert stretched.shape == boxed.shape == (40, 80)
    # stretch: the centre crop cut a ring off every side; letterbox: the 2:1 image sat in the middle of the
    # square, so the crop cut only its left and right ends and kept its top row
    assert stretched[20, 40] == pytest.approx(1.0) and stretched[20, 0] < 0.5 and stretched[0, 40] < 0.5
    assert boxed[20, 40] == pytest.approx(1.0) and boxed[20, 0] < 0.5 and boxed[0, 40] == pytest.approx(1.0)


def test_default_config_is_the_default_recipe():
    from xrai.recipe import DEFAULT_RECIPE

    assert recipe_of(TrainConfig()) == RECIPES[DEFAULT_RECIPE]


def test_bench_recipe_prints_the_cv_auroc_and_reprints_it(synthetic_root, tmp_path, monkeypatch, capsys):
    import json

    import xrai.bench.recipe
    from xrai.cli.commands import main

    monkeypatch.setattr(xrai.bench.recipe, "QUICK_BUDGET", {"folds": 2, "img_size": 32, "epochs": 1})
    args = ["bench", "--recipe", "v1", "--quick", "--data", "synthetic", "--root", str(synthetic_root),
            "--out", str(tmp_path / "cv"), "--json", str(tmp_path / "bench.json")]
    assert main(args) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]  # after the folds' progress lines
    assert "recipe v1 on synthetic" in line and "2-fold grouped CV" in line and "CV AUROC" in line
    figures = json.loads((tmp_path / "bench.json").read_text())
    assert len(figures["cv_auroc"]["values"]) == 2 and figures["recipe"] == RECIPES["v1"] | {"batch_size": 32}
    stamp = (tmp_path / "cv" / "cv.json").stat().st_mtime_ns
    assert main(args) == 0 and (tmp_path / "cv" / "cv.json").stat().st_mtime_ns == stamp  # read back, not rerun
    assert capsys.readouterr().out.strip() == line


def test_pretrained_runs_default_to_ft1_and_every_consumer_can_name_the_recipe():
    from xrai.cli.commands import _train_config, build_parser
    from xrai.config import TrainConfig
    from xrai.recipe import RECIPES, default_recipe, describe_recipe, recipe_config, recipe_name

    assert default_recipe(True) == "ft1" and default_recipe(False) == "v2"
    assert recipe_name(TrainConfig(data="synthetic", pretrained=False)) == "v2"
    assert recipe_name(recipe_config("ft1", data="synthetic", pretrained=True)) == "ft1"
    assert recipe_name(recipe_config("v1", data="synthetic").to_dict()) == "v1"  # a config.json's dict
    assert recipe_name(TrainConfig(data="synthetic", lr=0.0123)) is None
    assert describe_recipe(TrainConfig(data="synthetic", lr=0.0123)).startswith("a custom recipe")
    assert "fine-tuning ImageNet weights" in describe_recipe(recipe_config("ft1", data="synthetic"))
    parser = build_parser()
    pretrained = _train_config(parser.parse_args(["train", "--data", "synthetic"]))
    scratch = _train_config(parser.parse_args(["train", "--data", "synthetic", "--no-pretrained"]))
    for config, name in ((pretrained, "ft1"), (scratch, "v2")):
        assert {k: getattr(config, k) for k in RECIPES[name]} == RECIPES[name]
    explicit = _train_config(parser.parse_args(["train", "--data", "synthetic", "--recipe", "v2"]))
    assert {k: getattr(explicit, k) for k in RECIPES["v2"]} == RECIPES["v2"]
    assert _train_config(parser.parse_args(["train", "--data", "synthetic", "--freeze-epochs", "1",
                                            "--layer-decay", "0.7"])).layer_decay == 0.7
