"""Notebook widgets on core ipywidgets only: a body-part picker, a Grad-CAM browser and an X-ray upload.

Core widgets (Dropdown, ToggleButtons, IntSlider, HTML, Image, VBox, HBox) render in Colab, Kaggle,
JupyterLab, classic Jupyter and VS Code without any front-end extension, which third-party widgets
would need. Every API used here exists in ipywidgets 7.6 and 8, so Colab's own copy works.

The picker's value starts at the notebook's BODY_PART parameter, so "Run all" (and papermill, and Kaggle's
"Save & Run All") never waits for a click: the cell after it reads the value it started with. A person
running cell by cell picks a part, then runs the cells below, which read the new value.

A saved notebook has no widgets to show: Kaggle's batch run and papermill have no front end, and a
saved version renders widget outputs blank. So every widget is displayed with the static form it
stands for beside it (``show``; the browser is drawn as a grid of its first overlays): a live front end
picks the widget, a static renderer the picture or text. In a Kaggle batch run, which no one watches,
only the static form is shown.
"""

from __future__ import annotations

import base64
import datetime
import io
import re
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import ipywidgets as widgets
import pandas as pd
from IPython import display as ipython_display  # looked up when called: tests (and IPython) may replace it
from matplotlib.figure import Figure
from PIL import Image

import xrai.data
from xrai.env import detect_platform
from xrai.errors import USER_ERRORS, one_line
from xrai.evaluate.single import explain_file
from xrai.explain.cam import explain_paths
from xrai.labels import CLASS_NAMES
from xrai.models.registry import list_models
from xrai.runs.layout import RunFolder
from xrai.runs.load import load_run

WIDGET_MIME = "application/vnd.jupyter.widget-view+json"

ALL = "all"
OUTCOMES = ("TP", "FP", "FN", "TN")
OUTCOME_HELP = {
    "TP": "true positives: abnormal, called abnormal",
    "FP": "false positives: normal, called abnormal",
    "FN": "false negatives: abnormal, called normal",
    "TN": "true negatives: normal, called normal",
}

# explain(path, label) -> PNG bytes of the Grad-CAM overlay of that image (label: the actual one, 0/1)
Explain = Callable[[str, int], bytes]


def enable_colab_widgets() -> None:
    """Turn on Colab's widget manager when running in Colab; does nothing anywhere else.

    Core widgets render without it on recent Colab, but the call is cheap and makes ipywidgets 8
    render on Colab front ends that still expect version 7.
    """
    if "google.colab" not in sys.modules:
        return
    from google.colab import output  # type: ignore[import-not-found]

    output.enable_custom_widget_manager()


def no_frontend() -> bool:
    """True where no one can see a widget: a Kaggle batch run ("Save & Run All", a saved version)."""
    return detect_platform()[1]


def mimebundle(widget: widgets.Widget, *, text: str, png: bytes | None = None) -> dict:
    """The display data of a widget with its static form beside it (PNG and/or text).

    A live front end renders the widget view; a static renderer (a saved version) the PNG or the text.
    Without a front end the widget view is left out.
    """
    bundle: dict = {"text/plain": text}
    if png:
        bundle["image/png"] = base64.b64encode(png).decode("ascii")
    if not no_frontend():
        bundle[WIDGET_MIME] = {"version_major": 2, "version_minor": 0, "model_id": widget.model_id}
    return bundle


def show(*items: widgets.Widget) -> None:
    """Display widgets each with its static form: a picker as the line of its current choice."""
    for item in items:
        own = isinstance(item, (GradCamBrowser, XrayUpload))  # these know their own static form
        bundle = item._repr_mimebundle_() if own else mimebundle(item, text=describe(item))
        ipython_display.display(bundle, raw=True)


def describe(widget: widgets.Widget) -> str:
    """One line for a value widget: "Body part: wrist (1,234 images, 567 abnormal)"."""
    label = getattr(widget, "label", None) or getattr(widget, "value", "")
    return f"{getattr(widget, 'description', '') or type(widget).__name__}: {label}"


# ---- body-part picker ---------------------------------------------------------------------------


def part_counts(manifest: pd.DataFrame) -> pd.DataFrame:
    """Images and abnormal images per body part, sorted by part name.

    Returns:
        DataFrame indexed by body part with columns ``images`` and ``abnormal``.
    """
    grouped = manifest.groupby("body_part")["label"]
    return pd.DataFrame({"images": grouped.size(), "abnormal": grouped.sum()}).astype(int).sort_index()


def _option_label(name: str, images: int, abnormal: int) -> str:
    return f"{name} ({images:,} images, {abnormal:,} abnormal)"


def body_part_picker(
    manifest: pd.DataFrame, *, default: str = ALL, description: str = "Body part"
) -> widgets.Dropdown:
    """A dropdown of the manifest's body parts with their image counts, plus "all".

    The value is the part's name ("wrist", or "all"), ready for ``TrainConfig(body_part=...)``.

    Args:
        manifest: the run's manifest (``xrai.data.read_manifest(RUN_DIR)``).
        default: the value it starts with, normally the notebook's BODY_PART parameter. Several parts
            joined by commas ("wrist,hand") are offered as one extra entry.
    Raises:
        ValueError: ``default`` names a part the manifest does not have.
    """
    enable_colab_widgets()
    counts = part_counts(manifest)
    options = [(_option_label(ALL, len(manifest), int(manifest["label"].sum())), ALL)]
    options += [(_option_label(part, int(row.images), int(row.abnormal)), part) for part, row in counts.iterrows()]
    default = (default or ALL).strip().lower()
    if default != ALL:
        wanted = [p.strip() for p in default.split(",") if p.strip()]
        unknown = [p for p in wanted if p not in counts.index]
        if unknown:
            present = ", ".join(f"{part} ({n})" for part, n in counts["images"].items())
            raise ValueError(f"unknown body part(s) {unknown} in {default!r}; this manifest has: {present}")
        if len(wanted) > 1:
            default = ",".join(wanted)
            chosen = counts.loc[wanted]
            options.append((_option_label(default, int(chosen.images.sum()), int(chosen.abnormal.sum())), default))
        else:
            default = wanted[0]
    return widgets.Dropdown(
        options=options,
        value=default,
        description=description,
        style={"description_width": "initial"},
        layout=widgets.Layout(width="max-content"),
    )


def selected_body_part(picker: widgets.Widget | None, *, fallback: str = ALL) -> str:
    """The body part a picker holds, or ``fallback`` when there is no picker (or it holds nothing).

    The picker starts at the BODY_PART parameter, so a non-interactive run ("Run all", papermill) gets
    the parameter and a person who picked another part gets theirs.
    """
    return _selected(picker, fallback)


def selected_model(picker: widgets.Widget | None, *, fallback: str = "mobilenet_v2") -> str:
    """The model a ``model_picker`` holds, or ``fallback`` (the MODEL parameter) without one."""
    return _selected(picker, fallback)


def _selected(picker: widgets.Widget | None, fallback: str) -> str:
    value = getattr(picker, "value", None)
    return str(value) if value else fallback


def model_picker(*, default: str = "mobilenet_v2", description: str = "Model") -> widgets.Dropdown:
    """A dropdown of the registry's model names, starting at ``default`` (the MODEL parameter).

    Raises:
        ValueError: ``default`` is not a registered model.
    """
    enable_colab_widgets()
    names = list_models()
    if default not in names:
        raise ValueError(f"unknown model {default!r}; choose one of: {', '.join(names)}")
    return widgets.Dropdown(options=names, value=default, description=description)


# ---- Grad-CAM browser ---------------------------------------------------------------------------


def outcome_table(predictions: pd.DataFrame, threshold: float) -> pd.DataFrame:
    """Predictions with ``predicted`` (0/1 at ``threshold``) and ``outcome`` (TP, FP, FN or TN) added."""
    table = predictions.copy()
    table["predicted"] = (table["probability"] >= threshold).astype(int)
    truth = table["label"].astype(int)
    table["outcome"] = "TN"
    table.loc[(truth == 1) & (table["predicted"] == 1), "outcome"] = "TP"
    table.loc[(truth == 0) & (table["predicted"] == 1), "outcome"] = "FP"
    table.loc[(truth == 1) & (table["predicted"] == 0), "outcome"] = "FN"
    return table


def browse_rows(table: pd.DataFrame, *, body_part: str = ALL, outcome: str = "TP") -> pd.DataFrame:
    """The rows of an outcome table for one body part and outcome, most confident first.

    TP and FP are sorted by probability high to low, FN and TN low to high, so image 0 is the case the
    model was surest about.
    """
    if outcome not in OUTCOMES:
        raise ValueError(f"unknown outcome {outcome!r}; choose one of: {', '.join(OUTCOMES)}")
    rows = table[table["outcome"] == outcome]
    if body_part != ALL:
        rows = rows[rows["body_part"] == body_part]
    ascending = outcome in ("FN", "TN")
    return rows.sort_values(["probability", "path"], ascending=[ascending, True]).reset_index(drop=True)


def _read_predictions(run_dir: Path, split: str) -> tuple[pd.DataFrame, float]:
    folder = RunFolder(run_dir)
    path, report = folder.predictions_csv(split), folder.report_json(split)
    if not path.is_file() or not report.is_file():
        raise FileNotFoundError(
            f"{path.name} and {report.name} are not in {run_dir}; run notebooks/04_evaluate.ipynb "
            f"(or: python -m xrai evaluate --run {run_dir} --split {split}) first"
        )
    predictions = folder.read_predictions(split)
    if folder.manifest_csv.is_file():  # written on another machine: its paths, found again on this one
        predictions["path"] = xrai.data.relocate_paths(predictions["path"].astype(str),
                                                       xrai.data.read_manifest(run_dir, splits=(split,)))
    threshold = float(folder.read_report(split)["threshold"])
    return predictions, threshold


def run_explainer(run_dir: str | Path, *, threshold: float, method: str = "gradcam") -> Explain:
    """An ``explain(path, label) -> PNG bytes`` over the run's best model; the model loads on first use.

    Overlays are written once under ``RUN_DIR/gradcam/browser/`` and read back on later visits.
    """
    run_dir = Path(run_dir)
    out_dir = RunFolder(run_dir).gradcam / "browser"
    names = RunFolder(run_dir).class_names()
    loaded: dict[str, object] = {}

    def explain(path: str, label: int) -> bytes:
        if "run" not in loaded:
            loaded["run"] = load_run(run_dir)  # the calibration the report's probabilities were made with
        run = loaded["run"]
        (result,) = explain_paths(
            run.model, run.config, [path], threshold=threshold, out_dir=out_dir, labels=[label],
            method=method, calibration=run.calibration, class_names=names,
        )
        if result.get("error"):
            raise ValueError(f"cannot explain {path}: {result['error']}")
        return Path(result["overlay"]).read_bytes()

    return explain


class GradCamBrowser(widgets.VBox):
    """Browse Grad-CAM overlays by body part, outcome (TP/FP/FN/TN) and image.

    Attributes:
        part, outcome, index: the three controls (Dropdown, ToggleButtons, IntSlider).
        caption: an HTML line naming the image, its label, the prediction and the probability.
        image: the overlay (an ipywidgets.Image holding PNG bytes).
        table: the split's predictions with ``outcome`` added.
    """

    def __init__(self, table: pd.DataFrame, *, threshold: float, explain: Explain, split: str = "test",
                 names: tuple[str, str] = CLASS_NAMES) -> None:
        self.table = table
        self.names = names  # the words for label 0 and 1 (xrai.labels.class_names of the run's source)
        self.threshold = threshold
        self.split = split
        self._explain = explain
        self._cache: dict[str, bytes] = {}
        parts = part_counts(table)
        self.part = widgets.Dropdown(
            options=[(f"{ALL} ({len(table):,})", ALL)]
            + [(f"{part} ({n:,})", part) for part, n in parts["images"].items()],
            value=ALL,
            description="Body part",
        )
        present = set(table["outcome"])
        first = next((o for o in OUTCOMES if o in present), "TP")  # open on an outcome that has images
        self.outcome = widgets.ToggleButtons(options=list(OUTCOMES), value=first, description="Outcome",
                                             tooltips=[OUTCOME_HELP[o] for o in OUTCOMES])
        self.index = widgets.IntSlider(value=0, min=0, max=0, description="Image", continuous_update=False)
        self.caption = widgets.HTML()
        self.image = widgets.Image(format="png", layout=widgets.Layout(max_width="640px"))
        super().__init__([widgets.HBox([self.part, self.index]), self.outcome, self.caption, self.image])
        self.part.observe(self._on_filter, names="value")
        self.outcome.observe(self._on_filter, names="value")
        self.index.observe(self._on_index, names="value")
        self._on_filter()

    def _overlay(self, row: pd.Series) -> bytes:
        path = str(row["path"])
        if path not in self._cache:
            self._cache[path] = self._explain(path, int(row["label"]))
        return self._cache[path]

    def static_grid(self) -> bytes:
        """A PNG of the browser's first overlay for each outcome present: what a saved notebook shows."""
        firsts = [(o, rows.iloc[0]) for o in OUTCOMES if len(rows := browse_rows(self.table, outcome=o))]
        fig = Figure(figsize=(3.2 * max(1, len(firsts)), 3.6), dpi=100)
        for i, (outcome, row) in enumerate(firsts, start=1):
            ax = fig.add_subplot(1, len(firsts), i)
            ax.imshow(Image.open(io.BytesIO(self._overlay(row))))
            ax.set_axis_off()
            ax.set_title(f"{outcome} · {row['body_part']}\np = {float(row['probability']):.3f}", fontsize=9,
                         color="black" if outcome in ("TP", "TN") else "red")
        if not firsts:
            fig.text(0.5, 0.5, f"no {self.split} predictions", ha="center")
        fig.suptitle(f"Grad-CAM, {self.split}: the most confident image of each outcome "
                     f"(threshold {self.threshold:.3f})", fontsize=10)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", bbox_inches="tight")
        return buffer.getvalue()

    def _repr_mimebundle_(self, include=None, exclude=None) -> dict:
        counts = self.table["outcome"].value_counts()
        text = f"Grad-CAM browser ({self.split}): " + ", ".join(f"{o} {int(counts.get(o, 0))}" for o in OUTCOMES)
        return mimebundle(self, text=text, png=self.static_grid())

    def _ipython_display_(self) -> None:
        # IPython asks this before _repr_mimebundle_; ipywidgets 7 defines it, so it must be overridden too.
        ipython_display.display(self._repr_mimebundle_(), raw=True)

    def rows(self) -> pd.DataFrame:
        """The images the current body part and outcome select, in the slider's order."""
        return browse_rows(self.table, body_part=self.part.value, outcome=self.outcome.value)

    def _outcome_labels(self) -> list[tuple[str, str]]:
        table = self.table if self.part.value == ALL else self.table[self.table["body_part"] == self.part.value]
        counts = table["outcome"].value_counts()
        return [(f"{o} ({int(counts.get(o, 0))})", o) for o in OUTCOMES]

    def _on_filter(self, change: dict | None = None) -> None:
        value = self.outcome.value
        self.outcome.unobserve(self._on_filter, names="value")
        self.outcome.options = self._outcome_labels()
        self.outcome.value = value
        self.outcome.observe(self._on_filter, names="value")
        self._rows = self.rows()
        self.index.unobserve(self._on_index, names="value")
        self.index.max = max(len(self._rows) - 1, 0)
        self.index.value = 0
        self.index.disabled = len(self._rows) <= 1
        self.index.observe(self._on_index, names="value")
        self._on_index()

    def _on_index(self, change: dict | None = None) -> None:
        if self._rows.empty:
            self.caption.value = (
                f"<i>no {self.outcome.value} images for {self.part.value} in {self.split} "
                f"at threshold {self.threshold:.3f}</i>"
            )
            self.image.value = b""
            return
        row = self._rows.iloc[self.index.value]
        label, called = self.names[int(row["label"])], self.names[int(row["predicted"])]
        self.caption.value = (
            f"<b>{self.outcome.value} {self.index.value + 1} of {len(self._rows)}</b> · {row['body_part']} · "
            f"label {label}, called {called} (p = {float(row['probability']):.3f}, threshold "
            f"{self.threshold:.3f})<br><code>{row['path']}</code>"
        )
        self.image.value = self._overlay(row)


def gradcam_browser(
    run_dir: str | Path, *, split: str = "test", method: str = "gradcam", explain: Explain | None = None
) -> GradCamBrowser:
    """An interactive Grad-CAM browser over a run's predictions on one split.

    Args:
        run_dir: a run folder holding predictions_<split>.csv and report_<split>.json (notebook 04).
        split: "valid" or "test".
        method: a CAM method of ``xrai.explain.cam.CAM_METHODS``.
        explain: ``(path, label) -> PNG bytes``; by default Grad-CAM of the run's best model at the report's
            threshold (tests pass a stand-in).
    Raises:
        FileNotFoundError: the predictions or the report are missing (run 04_evaluate first).
    """
    enable_colab_widgets()
    run_dir = Path(run_dir)
    predictions, threshold = _read_predictions(run_dir, split)
    if explain is None:
        explain = run_explainer(run_dir, threshold=threshold, method=method)
    return GradCamBrowser(outcome_table(predictions, threshold), threshold=threshold, explain=explain, split=split,
                          names=RunFolder(run_dir).class_names())


# ---- your own X-ray ------------------------------------------------------------------------------

UPLOAD_ACCEPT = ".png,.jpg,.jpeg,.dcm"


def uploaded_files(value) -> list[tuple[str, bytes]]:
    """(name, bytes) of each file a FileUpload holds: ipywidgets 8's tuple of dicts or 7's dict by name."""
    if isinstance(value, dict):  # ipywidgets 7: {name: {"metadata": {...}, "content": bytes}}
        return [(str(name), bytes(item["content"])) for name, item in value.items()]
    return [(str(item["name"]), bytes(item["content"])) for item in value or ()]


class XrayUpload(widgets.VBox):
    """An X-ray upload: a FileUpload (PNG, JPEG, DICOM), a line with the result and an Output with the figure.

    On upload each file is written to a temporary file (its name's suffix kept), explained with the run
    (``xrai.evaluate.single.explain_file``: the calibrated probability at the run's Youden and screening
    thresholds, original | heat map | overlay) and removed. A file that cannot be explained shows its one
    line in the result instead; the widget stays usable.

    Attributes:
        upload, result, output: the FileUpload, the HTML result line and the Output holding the figure.
        results: explain_file's dict for each file explained so far (the last one last).
    """

    def __init__(self, run_dir: str | Path, *, method: str = "gradcam") -> None:
        self.run_dir, self.method = Path(run_dir), method
        self.results: list[dict] = []
        self.upload = widgets.FileUpload(accept=UPLOAD_ACCEPT, multiple=False, description="X-ray")
        self.result = widgets.HTML("<i>upload a PNG, JPEG or DICOM X-ray to see the model's answer</i>")
        self.output = widgets.Output()
        super().__init__([self.upload, self.result, self.output])
        self.upload.observe(self._on_upload, names="value")

    def _on_upload(self, change: dict | None = None) -> None:
        for name, data in uploaded_files(self.upload.value):
            self.explain(name, data)

    def explain(self, name: str, data: bytes) -> dict | None:
        """Explain one uploaded file's bytes; shows the result line and the figure. None when it failed."""
        with tempfile.TemporaryDirectory(prefix="xrai-upload-") as folder:
            path = Path(folder) / (re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).name)[-100:].lstrip(".") or "upload")
            path.write_bytes(data)
            try:
                result = explain_file(self.run_dir, path, method=self.method)
            except USER_ERRORS as err:
                self.result.value = f"<b>{name}</b>: cannot explain it: {_escape(one_line(err).replace(str(path), name))}"
                self.output.clear_output()
                return None
        result = {**result, "path": name, "text": result["text"].replace(path.name, name, 1)}  # the file is gone
        self.results.append(result)
        self.result.value = f"<b>{_escape(result['text'])}</b>"
        # as PNG bytes: a bare Figure only renders where matplotlib's inline backend registered its formatter
        buffer = io.BytesIO()
        result["figure"].savefig(buffer, format="png", dpi=100)
        self.output.clear_output(wait=True)
        with self.output:
            ipython_display.display(ipython_display.Image(data=buffer.getvalue(), format="png"))
        return result

    def _repr_mimebundle_(self, include=None, exclude=None) -> dict:
        return mimebundle(self, text=f"X-ray upload for {self.run_dir.name}: " + (
            self.results[-1]["text"] if self.results else "no file uploaded yet"))

    def _ipython_display_(self) -> None:
        ipython_display.display(self._repr_mimebundle_(), raw=True)


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def xray_upload(run_dir: str | Path, *, method: str = "gradcam") -> XrayUpload:
    """An upload for your own X-ray (PNG, JPEG or DICOM), explained with the run; show it with ``show``.

    Raises:
        FileNotFoundError: the run folder has no checkpoint.
    """
    enable_colab_widgets()
    if not RunFolder(run_dir).checkpoint().is_file() and not RunFolder(run_dir).is_cv:
        raise FileNotFoundError(f"no checkpoint in {run_dir}: train the run first (notebooks/03_train.ipynb)")
    return XrayUpload(run_dir, method=method)


def simulate_upload(widget: XrayUpload, name: str, data: bytes) -> dict | None:
    """Upload ``data`` as the file ``name`` without a front end (tests, a headless run): sets the FileUpload's
    value as ipywidgets 8 (or 7) does, which runs the same handler a browser upload runs.

    Returns:
        explain_file's result for it (``path`` is ``name``), or None when the file could not be explained.
    """
    before = len(widget.results)
    if int(widgets.__version__.split(".")[0]) >= 8:
        value = ({"name": name, "type": "", "size": len(data), "content": memoryview(data),
                  "last_modified": datetime.datetime.now(datetime.timezone.utc)},)
    else:
        value = {name: {"metadata": {"name": name, "type": "", "size": len(data)}, "content": data}}
    widget.upload.value = value
    return widget.results[-1] if len(widget.results) > before else None
