"""Issue 25 on real X-rays: a run trained with BCE pos_weight (n_neg / n_pos, ~4.7 on FracAtlas) has every
logit shifted up by about log(4.7); Platt scaling fitted on valid takes the shift back.

Trains a small model on the FracAtlas subset (fracatlas-dev) on the CPU and evaluates valid. Skipped
where the subset is absent (XRAI_FRACATLAS_DEV, ../shared/data/fracatlas-dev beside the repository, or
/work/shared/data/fracatlas-dev).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
CANDIDATES = [Path(p) for p in (os.environ.get("XRAI_FRACATLAS_DEV"),) if p] + [
    REPO.parent / "shared" / "data" / "fracatlas-dev", Path("/work/shared/data/fracatlas-dev")]

pytestmark = [pytest.mark.real, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def dev_root() -> Path:
    for root in CANDIDATES:
        if (root / "dataset.csv").is_file():
            return root
    pytest.skip(f"real FracAtlas subset not found at any of {[str(c) for c in CANDIDATES]}")


def _small_recipe(dev_root: Path, *, batch_size: int):
    """MobileNetV2 from scratch at 64 px for 3 epochs on the CPU, the recipe's pos_weight on."""
    from xrai.config import TrainConfig

    return TrainConfig(data="fracatlas", root=str(dev_root), model="mobilenet_v2", pretrained=False, img_size=64,
                       epochs=3, batch_size=batch_size, num_workers=0, amp=False, device="cpu", tta=False,
                       warmup_epochs=0, patience=0, pos_weighting=True)


@pytest.fixture(scope="module")
def trained(dev_root, tmp_path_factory):
    """A MobileNetV2 from scratch at 64 px, 3 epochs, the recipe's pos_weight on: ~6 minutes on a shared
    2-core CPU (it hardly ranks at this scale, AUROC ~0.5; what it shows is the shift pos_weight puts
    on its probabilities, and Platt taking it back)."""
    from xrai.data import load
    from xrai.evaluate.run import evaluate_run
    from xrai.train.trainer import fit

    run = tmp_path_factory.mktemp("calib_real") / "run"
    config = _small_recipe(dev_root, batch_size=64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit(config, load("fracatlas", root=dev_root, progress=False), run, progress=False)
        report = evaluate_run(run, split="valid", progress=False, n_bootstrap=0, device="cpu", explain_images=0)
    return run, report


def test_platt_calibrates_a_pos_weighted_run_on_real_xrays(trained):
    from xrai.evaluate.calibration import choose_calibration
    from xrai.runs.layout import read_predictions
    from xrai.runs.load import load_run

    run, report = trained
    cal = report["calibration"]
    print(f"\nfracatlas-dev valid ({report['image']['n']} images, AUROC {report['image']['auroc']:.3f}): "
          f"Platt a={cal['slope']:.3f} b={cal['intercept']:+.3f}; cross-fitted ECE {cal['ece']['uncalibrated']:.3f} "
          f"-> {cal['ece']['calibrated']:.3f}, NLL {cal['nll']['uncalibrated']:.3f} -> {cal['nll']['calibrated']:.3f}, "
          f"Brier {cal['brier']['uncalibrated']:.3f} -> {cal['brier']['calibrated']:.3f}")
    assert cal["method"] == "platt" and cal["applied"] and cal["figures"].startswith("cross-fitted")
    assert cal["ece"]["uncalibrated"] > 0.1 and cal["ece"]["calibrated"] < 0.05
    pred = read_predictions(run / "predictions_valid.csv")
    y, z = pred["label"].to_numpy(int), pred["logit"].to_numpy(float)
    assert abs(pred["probability"].mean() - y.mean()) < 0.05  # the probabilities consumers show: near the true rate
    np.testing.assert_allclose(load_run(run).calibrate(z), pred["probability"], rtol=1e-9)
    # what the old default did: at this scale the logits hardly spread, so scaling alone
    # gets part of the way (measured: cross-fitted ECE 0.083 against Platt's 0.011); on a model that ranks (issue 25: valid ECE 0.210 -> 0.220) it cannot
    _, _, temp = choose_calibration(z, y, "temperature")
    print(f"temperature scaling, cross-fitted: ECE {temp['ece']['calibrated']:.3f}, NLL {temp['nll']['calibrated']:.3f}, "
          f"Brier {temp['brier']['calibrated']:.3f}")
    assert temp["nll"]["calibrated"] > cal["nll"]["calibrated"] and temp["ece"]["calibrated"] > cal["ece"]["calibrated"]


@pytest.fixture(scope="module")
def cv_run(dev_root, tmp_path_factory):
    """A 2-fold grouped CV on fracatlas-dev's train+valid pool (test never used): 64 px, 3 epochs of batches of 32,
    about 1 minute on 2 CPU cores (measured: out-of-fold AUROC 0.669, Platt a = 1.35, b = -1.61, ECE 0.313 -> 0.017;
    with 3 folds, twice the training, 0.705 and ECE 0.309 -> 0.011)."""
    from xrai.data import load
    from xrai.train.cv import cross_validate

    run = tmp_path_factory.mktemp("calib_real_cv") / "cv"
    config = _small_recipe(dev_root, batch_size=32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cross_validate(config, load("fracatlas", root=dev_root, progress=False), run, folds=2, progress=False)
    return run


def test_platt_calibrates_a_cv_runs_out_of_fold_predictions_on_real_xrays(cv_run):
    import json

    from xrai.runs.layout import RunFolder

    folder = RunFolder(cv_run)
    report = json.loads(folder.report_json("oof").read_text())
    cal = report["calibration"]
    print(f"\nfracatlas-dev out-of-fold ({report['image']['n']} images, AUROC {report['image']['auroc']:.3f}): "
          f"{cal['method']} a={cal['slope']:.3f} b={cal['intercept']:+.3f}; ECE {cal['ece']['uncalibrated']:.3f} -> "
          f"{cal['ece']['calibrated']:.3f}, NLL {cal['nll']['uncalibrated']:.3f} -> {cal['nll']['calibrated']:.3f}")
    assert report["image"]["auroc"] > 0.6  # it ranks (measured 0.669): not a constant calibrated to the base rate
    assert cal["method"] == "platt" and cal["applied"] and cal["slope"] > 0.3
    assert cal["ece"]["uncalibrated"] > 0.1 and cal["ece"]["calibrated"] < 0.05
    pred = folder.read_predictions("oof")
    assert abs(pred["probability"].mean() - pred["label"].mean()) < 0.05
