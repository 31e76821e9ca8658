"""Grad-CAM: hooks, batches, both classes, the map back onto the original X-ray, overlays, galleries."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from _checks import assert_picture
from PIL import Image
from test_evaluate import make_fake_run

from xrai.evaluate.galleries import GALLERY_KINDS, _select, gallery
from xrai.explain.cam import CAM_METHODS, CamExplainer, explain_paths
from xrai.explain.overlays import cam_to_image, overlay

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    from xrai.models.factory import create_model

    torch.manual_seed(0)
    return create_model("mobilenet_v2", pretrained=False).eval()


def _hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules())


def _batch(n: int = 3, size: int = 64) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def test_hooks_released_after_context(model):
    assert _hooks(model) == 0
    with CamExplainer(model) as explainer:
        assert _hooks(model) > 0
        explainer(_batch())
    assert _hooks(model) == 0


def test_errors_propagate_and_hooks_still_released(model):
    # grad-cam's own __exit__ swallows IndexError; ours must not
    with pytest.raises(IndexError):
        with CamExplainer(model):
            raise IndexError("boom")
    assert _hooks(model) == 0


def test_call_outside_context_is_refused(model):
    with pytest.raises(RuntimeError, match="context manager"):
        CamExplainer(model)(_batch())
    with pytest.raises(ValueError, match="unknown CAM method"):
        CamExplainer(model, method="scorecam")


@pytest.mark.parametrize("method", sorted(CAM_METHODS))
def test_batch_cams_for_both_classes(model, method):
    x = _batch(3)
    with CamExplainer(model, method=method) as explainer:
        abnormal = explainer(x, target_class=1)
        probs = explainer.probabilities
        normal = explainer(x, target_class=0)
        mixed = explainer(x, target_class=[1, 0, 1])
        assert explainer.grid == (2, 2)  # mobilenet_v2's stride 32 on a 64 px input
    for cams in (abnormal, normal, mixed):
        assert cams.shape == (3, 64, 64) and cams.dtype == np.float32
        assert cams.min() >= 0.0 and cams.max() <= 1.0
    with torch.no_grad():
        expected = torch.sigmoid(model(x).reshape(-1)).numpy()
    np.testing.assert_allclose(probs, expected, rtol=1e-4, atol=1e-5)
    # one target per image: the mixed batch equals the per-class batches image by image
    np.testing.assert_allclose(mixed[0], abnormal[0], atol=1e-5)
    np.testing.assert_allclose(mixed[1], normal[1], atol=1e-5)
    if method != "eigencam":  # EigenCAM uses no gradients: both classes give the same map
        assert not np.allclose(abnormal, normal)


def test_works_under_inference_mode_and_frozen_backbone():
    from xrai.models.factory import create_model

    frozen = create_model("mobilenet_v2", pretrained=False, freeze=True).eval()
    with torch.inference_mode():
        x = _batch(2)
        with CamExplainer(frozen) as explainer:
            cams = explainer(x)
    assert cams.shape == (2, 64, 64) and np.isfinite(cams).all() and cams.max() > 0
    assert all(p.grad is None for p in frozen.parameters())
    with pytest.raises(ValueError, match="target_class"):
        with CamExplainer(frozen) as explainer:
            explainer(x, target_class=[1])


# ---- mapping back onto the original -------------------------------------------------------------


def test_hot_corner_of_the_crop_lands_in_the_right_place():
    """Original 90 x 100 (H x W), letterboxed to 80, centre-cropped to 64.

    letterbox: scale 80/100 = 0.8 -> content 72 x 80, top = (80-72)//2 = 4, left = 0.
    crop offset = round((80-64)/2) = 8, so crop rows/cols 0..7 are letterbox rows/cols 8..15,
    i.e. content rows 4..11 and cols 8..15 -> original rows 5..15, cols 10..20 (divide by 0.8).
    """
    cam = np.zeros((64, 64), np.float32)
    cam[:8, :8] = 1.0
    mapped = cam_to_image(cam, (90, 100), resize_size=80)
    assert mapped.shape == (90, 100)
    ys, xs = np.nonzero(mapped > 0.5)
    assert 4 <= ys.min() and ys.max() <= 16 and 9 <= xs.min() and xs.max() <= 21
    cy, cx = np.average(np.indices(mapped.shape).reshape(2, -1), axis=1, weights=mapped.ravel())
    assert cy == pytest.approx(10, abs=1.5) and cx == pytest.approx(15, abs=1.5)
    # what the crop cut away (the ring beyond it) gets no heat
    assert mapped[40:, :].max() == 0 and mapped[:, 95:].max() == 0


@pytest.mark.parametrize("shape", [(150, 260), (300, 110), (128, 128)])
def test_mapping_inverts_the_real_preprocessing(shape):
    """A marker drawn on a non-square original, sent through the real eval preprocessing and mapped
    back, lands where it was drawn."""
    from xrai.data.augment import IMAGENET_MEAN, IMAGENET_STD, preprocess

    h, w = shape
    original = np.zeros(shape, np.uint8)
    original[int(0.55 * h) : int(0.7 * h), int(0.3 * w) : int(0.45 * w)] = 255
    x = preprocess([original], image_size=64, resize_size=73, device="cpu")
    crop = (x[0, 0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]).numpy()  # back to [0, 1]
    mapped = cam_to_image(crop, shape, resize_size=73) > 0.5
    truth = original > 0
    iou = (mapped & truth).sum() / (mapped | truth).sum()
    assert iou > 0.8, iou


# ---- overlays -----------------------------------------------------------------------------------


def test_overlay_keeps_original_size_and_adds_text_band():
    image = np.tile(np.linspace(0, 255, 160, dtype=np.uint8), (100, 1))  # 100 x 160, not square
    cam = np.zeros((100, 160), np.float32)
    cam[20:40, 100:140] = 1.0
    plain = overlay(image, cam)
    assert plain.shape == (100, 160, 3) and plain.dtype == np.uint8
    labelled = overlay(image, cam, label=1, probability=0.8, threshold=0.4)
    band = labelled.shape[0] - 100
    assert labelled.shape[1] == 160 and band > 0
    np.testing.assert_array_equal(labelled[band:], plain)  # the X-ray part is untouched by the band
    assert labelled[:band].max() > 0  # text was drawn
    # correct call -> green text, wrong call -> red text
    wrong = overlay(image, cam, label=0, probability=0.8, threshold=0.4)
    g, r = labelled[:band].reshape(-1, 3).sum(0), wrong[:band].reshape(-1, 3).sum(0)
    assert g[1] > g[0] and r[0] > r[1]
    # the heat is where the cam is: red channel up in the hot box relative to a cold spot
    assert plain[30, 120, 0] > plain[80, 20, 0] + 50


def test_overlay_maps_a_crop_frame_cam():
    image = np.full((90, 100), 128, np.uint8)
    cam = np.zeros((64, 64), np.float32)
    cam[:8, :8] = 1.0
    with pytest.raises(ValueError, match="resize_size"):
        overlay(image, cam)
    out = overlay(image, cam, resize_size=80, predicted=1)
    assert out.shape[1] == 100 and out.shape[0] > 90


# ---- files: explain_paths and the gallery -------------------------------------------------------


def test_explain_paths_survives_a_bad_file(model, synthetic_manifest, tmp_path):
    from xrai.config import TrainConfig

    config = TrainConfig(data="synthetic", pretrained=False, img_size=64)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"")
    good = synthetic_manifest["path"].tolist()[:3]
    with pytest.warns(UserWarning, match="broken.png"):
        results = explain_paths(model, config, [good[0], str(bad), *good[1:]], threshold=0.5,
                                out_dir=tmp_path / "out", labels=[1, None, 0, 1])
    assert [r["error"] is None for r in results] == [True, False, True, True]
    assert "empty" in results[1]["error"] and results[1]["overlay"] is None
    for r, path in zip([results[0], *results[2:]], good):
        original = np.asarray(Image.open(path))
        assert r["cam"].shape == original.shape[:2]
        assert r["label"] == int(r["probability"] >= 0.5)
        written = np.asarray(Image.open(r["overlay"]))
        assert written.shape[1] == original.shape[1] and written.shape[0] > original.shape[0]
    assert len({r["overlay"] for r in results if r["overlay"]}) == 3  # MURA's image1.png names do not clash
    fast = explain_paths(model, config, good, threshold=0.5, with_cam=False)
    assert all(r["cam"] is None for r in fast)
    with_cam = [r["probability"] for r in results if not r["error"]]
    assert [r["probability"] for r in fast] == pytest.approx(with_cam, abs=1e-4)


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory, synthetic_manifest):
    """A run folder as fit() leaves it, with an untrained mobilenet_v2 whose outputs vary."""
    return make_fake_run(tmp_path_factory.mktemp("explain_run"), synthetic_manifest)


def test_gallery_holds_the_images_it_names(fake_run, monkeypatch):
    import xrai.evaluate.galleries as explain

    tiles, real_tile = [], explain.tile
    monkeypatch.setattr(explain, "tile", lambda *a, **k: tiles.append(real_tile(*a, **k)) or tiles[-1])
    with pytest.warns(UserWarning):  # no audit.csv in the fake run
        written = gallery(fake_run, split="test", n=2, progress=False)
    singles = [k for k in written if "_" in k]
    assert 1 <= len(singles) <= 8
    for kind in ("tp", "fp", "fn", "tn"):  # the fourth outcome, correct normals, since issue 22
        assert written[kind] == fake_run / "gradcam" / f"{kind}_test.png"
        picture = assert_picture(written[kind], min_side=100)
        named = sorted(k for k in singles if k.startswith(f"{kind}_"))
        mine, tiles[: len(named)] = tiles[: len(named)], []
        for key in named:  # each image the gallery names is written on its own, over its X-ray
            assert written[key].parent == fake_run / "gradcam" and assert_picture(written[key], min_side=32) is not None
        if named:  # the row below the title holds exactly those tiles, side by side, 8 px apart
            row, x = picture[-max(t.shape[0] for t in mine):], 0
            for tile in mine:
                assert np.array_equal(row[: tile.shape[0], x : x + tile.shape[1]], tile[..., :3])
                x += tile.shape[1] + 8
            assert x - 8 == picture.shape[1]
    assert tiles == []  # no tile drawn that no gallery shows


# ---- on a model that really learned -------------------------------------------------------------


@pytest.mark.slow
def test_gradcam_points_at_the_fracture_line(demo_run):
    from xrai.evaluate.scores import fracture_localisation

    scores = fracture_localisation(Path(demo_run), split="test")
    assert scores["n"] >= 10
    assert scores["mass_ratio"] > 1.5  # more CAM mass on the line than its share of the image
    assert scores["pointing_game"] > 2 * scores["chance"]


def test_gallery_selects_the_four_outcomes_most_confident_first():
    """tp / fp by probability high to low, fn / tn (correct normals, issue 22) low to high."""
    pred = pd.DataFrame({"path": list("abcdefgh"), "label": [1, 1, 0, 0, 1, 1, 0, 0],
                         "probability": [0.9, 0.7, 0.8, 0.6, 0.2, 0.4, 0.1, 0.3]})
    assert list(GALLERY_KINDS) == ["tp", "fp", "fn", "tn"]
    chosen = {kind: _select(pred, kind, 0.5, 2)["path"].tolist() for kind in GALLERY_KINDS}
    assert chosen == {"tp": ["a", "b"], "fp": ["c", "d"], "fn": ["e", "f"], "tn": ["g", "h"]}
