"""``python -m xrai predict | explain``: one JSON line per image, with a Grad-CAM overlay PNG for explain.

Both load the run as the app does (``xrai.runs.load.load_run``, which only reads): a stale operating point is
refused in one line naming ``python -m xrai evaluate``.
"""

from __future__ import annotations

import json

from xrai.explain.cam import explain_paths
from xrai.runs.layout import RunFolder
from xrai.runs.load import load_run

__all__ = ["cmd_explain", "cmd_predict"]


def _explain_or_predict(run: str, images: list[str], out: str | None, method: str = "gradcam") -> int:
    loaded = load_run(run)  # a stale operating point: StaleOperatingPointError, one line naming evaluate
    if loaded.point.source == "default":
        raise FileNotFoundError(f"no threshold for this checkpoint: {loaded.point.note}; run "
                                f"`python -m xrai evaluate --run {run} --split valid` first")
    threshold = loaded.threshold
    results = explain_paths(loaded.model, loaded.config, images, threshold=threshold, out_dir=out, method=method,
                            with_cam=out is not None, calibration=loaded.calibration,
                            class_names=RunFolder(run).class_names())
    failures = 0
    for r in results:
        if r.get("error"):
            failures += 1
            print(json.dumps({"path": r["path"], "error": r["error"]}, allow_nan=False), flush=True)
            continue
        line = {"path": r["path"], "probability": round(float(r["probability"]), 6), "label": int(r["label"]),
                "threshold": threshold, "calibration": loaded.calibration.to_dict()}
        if r.get("overlay"):
            line["overlay"] = str(r["overlay"])
        print(json.dumps(line, allow_nan=False), flush=True)  # never a bare NaN: stdout is JSON lines
    return 1 if failures == len(results) else 0


def cmd_predict(args) -> int:
    return _explain_or_predict(args.run, args.images, None)


def cmd_explain(args) -> int:
    return _explain_or_predict(args.run, args.images, args.out, args.method)
