"""The app predicts at the run's operating point for ITS checkpoint: calibrated, never a stale threshold;
and it links to the run's model card."""

from __future__ import annotations

import json

import pytest
from scipy.special import expit, logit
from test_app import build_fake_run, upload, xray_bytes

pytestmark = pytest.mark.usefixtures("one_thread")


def _report(run, *, threshold: float, temperature: float, sha: str | None = None) -> None:
    from xrai.runs.operating import checkpoint_sha256

    sha = sha or checkpoint_sha256(run / "checkpoints" / "best.pt")
    (run / "report_valid.json").write_text(json.dumps({
        "split": "valid", "threshold": threshold, "study_threshold": None, "threshold_from": "valid",
        "calibration": {"temperature": temperature, "applied": True}, "checkpoint": {"sha256": sha}}))


def test_probabilities_are_calibrated_with_the_runs_temperature(tmp_path):
    from xrai.deploy.app import create_app

    plain = build_fake_run(tmp_path, name="plain")
    _report(plain, threshold=0.5, temperature=1.0)
    hot = build_fake_run(tmp_path, name="hot")  # the same weights, a temperature of 2 fitted on valid
    _report(hot, threshold=0.5, temperature=2.0)
    image = xray_bytes()
    for overlay in ("0", "1"):  # the plain path and the Grad-CAM path give the same calibrated number
        p1 = upload(create_app(plain).test_client(), image, url=f"/api/predict?overlay={overlay}").get_json()
        p2 = upload(create_app(hot).test_client(), image, url=f"/api/predict?overlay={overlay}").get_json()
        assert p2["probability"] == pytest.approx(expit(logit(p1["probability"]) / 2.0), abs=1e-5)


def test_a_threshold_from_another_checkpoint_is_not_used(tmp_path):
    # Serving reads only (issue 21): a stale operating point is refused in one line naming the command
    # that chooses it again, and the run folder is left as it was.
    from xrai.deploy.app import create_app
    from xrai.errors import is_user_error
    from xrai.runs.operating import StaleOperatingPointError

    run = build_fake_run(tmp_path)
    _report(run, threshold=0.73, temperature=1.0, sha="0" * 64)  # made with another checkpoint
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    with pytest.raises(StaleOperatingPointError, match=r"checkpoint sha256 000000000000.*python -m xrai evaluate") as e:
        create_app(run)
    assert is_user_error(e.value) and "\n" not in str(e.value)
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == before


def test_the_app_links_to_the_model_card(tmp_path):
    from xrai.deploy.app import create_app

    run = build_fake_run(tmp_path)
    client = create_app(run).test_client()
    assert 'href="/model_card"' in client.get("/").get_data(as_text=True)
    missing = client.get("/model_card")
    assert missing.status_code == 404 and "evaluate" in missing.get_data(as_text=True)
    (run / "model_card.md").write_text("# Model card: fake-run\n\nresearch and teaching, not diagnosis\n")
    card = client.get("/model_card")
    assert card.status_code == 200 and card.mimetype == "text/markdown"
    assert "not diagnosis" in card.get_data(as_text=True)
