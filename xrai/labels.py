"""What a label means and the few numbers every stage shares: sources, body parts, class names per
dataset, the default threshold and the screening sensitivity. Plain Python: no torch, numpy or pandas."""

from __future__ import annotations

__all__ = [
    "CLASS_NAMES",
    "DEFAULT_THRESHOLD",
    "MURA_BODY_PARTS",
    "SCREENING_SENSITIVITY",
    "SOURCES",
    "class_names",
]

# Every source a manifest can come from (xrai.data.load); the synthetic set first, as the CLI's default.
SOURCES = ("synthetic", "mura", "fracatlas", "folder", "multiregion", "bonefracture")
MURA_BODY_PARTS = ("elbow", "finger", "forearm", "hand", "humerus", "shoulder", "wrist")

# Label 0 and label 1. MURA's "abnormal" is any abnormality a radiologist marked (fractures, hardware,
# degenerative disease, lesions), not only fractures; the fracture sets' 1 is a fracture.
CLASS_NAMES = ("normal", "abnormal")
_CLASS_NAMES = {
    "fracatlas": ("not fractured", "fractured"),
    "bonefracture": ("not fractured", "fractured"),
    "multiregion": ("not fractured", "fractured"),
}

# A probability at or above it is called abnormal when a run has no operating point chosen on valid yet.
DEFAULT_THRESHOLD = 0.5
# The screening operating point: the highest threshold whose sensitivity on valid reaches this.
SCREENING_SENSITIVITY = 0.95


def class_names(source: str | None = None) -> tuple[str, str]:
    """The words for label 0 and label 1 of a source ("fracatlas": not fractured / fractured; MURA, the
    synthetic set and class folders: normal / abnormal)."""
    return _CLASS_NAMES.get(str(source or "").lower(), CLASS_NAMES)
