"""Scoring a run: predictions (``predict``), metrics with bootstrap intervals (``metrics``), calibration
(``calibration``), thresholds and the report (``report``), explanation scores (``scores``), evaluating a
split (``run``), Grad-CAM galleries (``gallery``) and the model card (``model_card``)."""

from xrai.evaluate.card import model_card, write_model_card
from xrai.evaluate.galleries import GALLERY_KINDS, gallery
from xrai.evaluate.predictions import PREDICTION_COLUMNS, predict
from xrai.evaluate.report import build_report, calibration_table, per_part_table, thresholds_table
from xrai.evaluate.run import evaluate_external, evaluate_run, run_threshold
from xrai.evaluate.scores import explanation_table
from xrai.runs.layout import read_predictions

__all__ = ["GALLERY_KINDS", "PREDICTION_COLUMNS", "build_report", "calibration_table", "evaluate_external",
           "evaluate_run", "explanation_table", "gallery", "model_card", "per_part_table", "predict",
           "read_predictions", "run_threshold", "thresholds_table", "write_model_card"]
