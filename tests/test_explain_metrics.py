"""Explanations measured: grad-cam's ROAD and confidence change, the randomisation check, the table."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from pytorch_grad_cam import EigenCAM
from pytorch_grad_cam.utils.model_targets import BinaryClassifierOutputTarget
from test_evaluate import make_fake_run

import xrai.evaluate.scores as em
from xrai.explain.cam import CAM_METHODS, EconomyEigenCAM

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def loaded(tmp_path_factory, synthetic_manifest):
    from xrai.evaluate.predictions import predict
    from xrai.runs.load import load_run

    run = load_run(make_fake_run(tmp_path_factory.mktemp("explain_run"), synthetic_manifest))
    test = synthetic_manifest[synthetic_manifest["split"] == "test"]
    pred = predict(run, test, device="cpu", progress=False)
    return run, pred


def test_economy_eigencam_gives_grad_cams_map(size=128):
    from xrai.models.factory import create_model, gradcam_layer

    torch.manual_seed(0)
    model = create_model("mobilenet_v2", pretrained=False).eval()
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(2))
    targets = [BinaryClassifierOutputTarget(1)] * 3
    with EigenCAM(model=model, target_layers=[gradcam_layer(model)]) as ref, \
            EconomyEigenCAM(model=model, target_layers=[gradcam_layer(model)]) as fast:
        np.testing.assert_allclose(fast(input_tensor=x, targets=targets), ref(input_tensor=x, targets=targets),
                                   atol=1e-4)


def test_explanation_scores_for_every_method(loaded):
    run, pred = loaded
    block = em.measure_explanations(run, pred, split="test", threshold=run.threshold, n_images=6, road_images=2)
    assert set(block["methods"]) == set(CAM_METHODS)
    assert block["sample"]["n_images"] == 6 and block["sample"]["road_images"] == 2 and block["sample"]["seed"] == 0
    assert block["road_percentiles"] == list(em.ROAD_PERCENTILES)
    for method, scores in block["methods"].items():
        assert scores["road_combined"]["n"] == 2 and np.isfinite(scores["road_combined"]["mean"])
        assert scores["confidence_change"]["n"] == 6 and np.isfinite(scores["confidence_change"]["mean"])
        r = scores["randomisation"]
        assert r["n"] + r["n_constant"] == 6
        assert r["spearman_mean"] is None or -1.0 <= r["spearman_mean"] <= 1.0
        assert r["passes"] == (method not in block["flagged"])
    assert np.isfinite(block["noise_map"]["road_combined"]["mean"])
    # seeded: the same sample, the same numbers
    kwargs = dict(split="test", threshold=run.threshold, n_images=3, road_images=1, methods=("eigencam",))
    assert em.measure_explanations(run, pred, **kwargs) == em.measure_explanations(run, pred, **kwargs)


def test_randomisation_check_flags_maps_that_ignore_the_weights(loaded, monkeypatch):
    """A 'randomised' model that is the trained one gives the same maps: every method must be flagged."""
    run, pred = loaded
    monkeypatch.setattr(em, "randomised_copy", lambda model, config, seed=0: model)
    block = em.measure_explanations(run, pred, split="test", threshold=run.threshold, n_images=4, road_images=1)
    assert sorted(block["flagged"]) == sorted(CAM_METHODS)
    for scores in block["methods"].values():
        assert scores["randomisation"]["spearman_mean"] == pytest.approx(1.0)
        assert scores["randomisation"]["passes"] is False


def test_randomised_copy_has_other_weights_and_leaves_the_rng_alone(loaded):
    run, _ = loaded
    state = torch.random.get_rng_state()
    fresh = em.randomised_copy(run.model, run.config, seed=3)
    assert torch.equal(state, torch.random.get_rng_state())
    trained, random = dict(run.model.named_parameters()), dict(fresh.named_parameters())
    assert trained.keys() == random.keys()
    assert any(not torch.allclose(trained[k], random[k]) for k in trained)


def test_map_correlations():
    rng = np.random.default_rng(0)
    a = rng.random((3, 8, 8))
    rho = em.map_correlations(a, np.stack([a[0], -a[1], np.zeros((8, 8))]))
    assert rho[0] == pytest.approx(1.0) and rho[1] == pytest.approx(-1.0) and np.isnan(rho[2])


def test_explanation_table():
    scores = {"road_combined": {"mean": 0.4}, "confidence_change": {"mean": -0.1},
              "randomisation": {"spearman_mean": 0.2, "passes": True}, "pointing_game": None}
    report = {"split": "test", "explain": {"methods": {"gradcam": scores},
                                           "noise_map": {"road_combined": {"mean": 0.0},
                                                         "confidence_change": {"mean": -1.0}}}}
    table = em.explanation_table(report)
    assert isinstance(table, pd.DataFrame) and list(table.index) == ["gradcam", "noise map (reference)"]
    assert table.loc["gradcam", "randomisation check"] == "passes"
    with pytest.raises(ValueError, match="explain_images"):
        em.explanation_table({"split": "valid", "explain": None})
