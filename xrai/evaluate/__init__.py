"""Scoring a run: predictions, metrics with bootstrap intervals, thresholds, calibration, the report,
explanation scores, the Grad-CAM gallery and the model card."""

from xrai.evaluate.run import (
    PREDICTION_COLUMNS,
    build_report,
    evaluate_external,
    evaluate_run,
    predict,
    read_predictions,
    run_threshold,
)

__all__ = ["PREDICTION_COLUMNS", "build_report", "evaluate_external", "evaluate_run", "predict", "read_predictions",
           "run_threshold"]
