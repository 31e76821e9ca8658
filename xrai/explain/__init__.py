"""Grad-CAM and its relatives through the grad-cam package: CAMs per image and overlays on the X-ray."""

from xrai.explain.cam import (
    CAM_METHODS,
    CamExplainer,
    cam_to_image,
    explain_paths,
    gallery,
    overlay,
)

__all__ = ["CAM_METHODS", "CamExplainer", "cam_to_image", "explain_paths", "gallery", "overlay"]
