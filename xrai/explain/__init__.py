"""Grad-CAM and its relatives through the grad-cam package: CAMs of a one-logit model (``cam``) and the
pictures made of them (``overlay``). Scoring explanations and galleries of a run are ``xrai.evaluate``."""

import importlib
from typing import Any

from xrai._aliases import moved
from xrai.explain.cam import CAM_METHODS, CamExplainer, EconomyEigenCAM, explain_paths
from xrai.explain.overlays import cam_to_image, overlay, save_png

__all__ = ["CAM_METHODS", "CamExplainer", "EconomyEigenCAM", "cam_to_image", "explain_paths", "overlay", "save_png"]


def __getattr__(name: str) -> Any:
    if name == "gallery":  # xrai.explain.gallery before 0.2; galleries score a run, so they live in evaluate
        moved("xrai.explain.gallery", "xrai.evaluate.gallery")
        return importlib.import_module("xrai.evaluate").gallery
    raise AttributeError(f"module 'xrai.explain' has no attribute {name!r}")
