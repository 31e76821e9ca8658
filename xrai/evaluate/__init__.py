"""Scoring a run: predictions (``predict``), metrics with bootstrap intervals (``metrics``), calibration
(``calibration``), thresholds and the report (``report``), explanation scores (``scores``), evaluating a
split (``run``), Grad-CAM galleries of the four outcomes (``gallery``), one file explained (``explain_file``),
the model card (``model_card``, ``model_card_markdown``) and a run's figures in plain words
(``metrics_in_words``, ``gradcam_in_words``)."""

from xrai.evaluate.card import model_card, write_model_card
from xrai.evaluate.galleries import GALLERY_KINDS, gallery
from xrai.evaluate.predictions import PREDICTION_COLUMNS, predict
from xrai.evaluate.report import build_report, calibration_table, per_part_table, thresholds_table
from xrai.evaluate.run import evaluate_external, evaluate_run, run_threshold
from xrai.evaluate.scores import explanation_table
from xrai.evaluate.single import explain_file
from xrai.evaluate.words import gradcam_in_words, metrics_in_words, model_card_markdown
from xrai.runs.layout import read_predictions

__all__ = ["GALLERY_KINDS", "PREDICTION_COLUMNS", "build_report", "calibration_table", "evaluate_external",
           "evaluate_run", "explain_file", "explanation_table", "gallery", "gradcam_in_words", "metrics_in_words",
           "model_card", "model_card_markdown", "per_part_table", "predict", "read_predictions", "run_threshold",
           "thresholds_table", "write_model_card"]
