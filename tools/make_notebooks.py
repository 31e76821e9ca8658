"""Write notebooks/00_quickstart.ipynb ... 05_gradcam.ipynb from the cell sources below.

    python tools/make_notebooks.py           # (re)write the notebooks
    python tools/make_notebooks.py --check   # exit 1 when a committed notebook differs from this script

The notebooks are generated so that they share one GPU check (the first code cell), one install cell,
one badge line and one way of preparing the run folder and finding the images, and so that they stay outputs-free with deterministic cell ids (clean diffs).
tests/test_notebooks.py checks that the committed files equal this script's output.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from xrai.env import GPU_MENUS

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

# The first code cell: torch alone (Colab and Kaggle ship it), so it runs before anything is installed.
GPU_CHECK = f"""\
# GPU check with torch alone (Colab and Kaggle ship it): it runs before xrai is installed.
import os

import torch

GPU = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
GPU_MENU = ("Kaggle: {GPU_MENUS['kaggle']}" if "KAGGLE_KERNEL_RUN_TYPE" in os.environ else
            "Colab: {GPU_MENUS['colab']}" if "COLAB_RELEASE_TAG" in os.environ else
            "open this notebook in Colab ({GPU_MENUS['colab']}) or Kaggle ({GPU_MENUS['kaggle']})")
print(f"GPU: {{GPU or 'none'}}; T4: {{'yes' if GPU and 'T4' in GPU else 'no'}}"
      + ("" if GPU and "T4" in GPU else f". To get a T4: {{GPU_MENU}}, then run all again."))"""

# The second: xrai only where it does not import. An attached wheelhouse (python -m xrai wheelhouse,
# uploaded as a Kaggle dataset) needs no Internet; else pip takes it from GitHub. Both keep the runtime's torch.
SETUP = f"""\
# Install xrai where it does not import (a fresh Colab or Kaggle runtime), keeping the runtime's torch:
# from an xrai wheelhouse attached under Kaggle's input folder (no Internet needed), else from GitHub.
import glob, importlib, importlib.metadata, importlib.util, os, subprocess, sys, tempfile
from pathlib import Path

if importlib.util.find_spec("xrai") is None:
    KAGGLE_INPUT = os.environ.get("XRAI_KAGGLE_INPUT", "/kaggle/input")
    WHEELS = sorted(w for depth in range(1, 6) for w in glob.glob(os.path.join(KAGGLE_INPUT, *["*"] * depth, "xrai-*.whl")))
    KEEP = Path(tempfile.gettempdir(), "xrai-keep-torch.txt")
    KEEP.write_text("".join(f"{{name}}=={{importlib.metadata.version(name)}}\\n" for name in ("torch", "torchvision", "torchaudio")
                            if importlib.util.find_spec(name)))
    SOURCE = (["--no-index", "--find-links", os.path.dirname(WHEELS[-1]), "xrai"] if WHEELS else
              ["xrai @ git+https://github.com/{REPO}@{BRANCH}"])
    print(f"installing xrai from {{os.path.dirname(WHEELS[-1]) if WHEELS else 'github.com/{REPO}'}}, keeping torch")
    SETUP_RUN = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                                "-c", str(KEEP), *SOURCE], capture_output=True, text=True)
    if SETUP_RUN.returncode != 0:
        raise RuntimeError(f"xrai could not be installed ({{(SETUP_RUN.stderr.strip() or 'pip failed').splitlines()[-1]}}): "
                           "turn the Internet on (Kaggle: Settings > Internet on) and run again, or attach the "
                           "xrai wheelhouse dataset (README: Kaggle with the Internet off)")
    importlib.invalidate_caches()"""

RUN_FOLDER_MD = """\
`RUN_DIR` is where this series keeps its files (manifest, audit, checkpoints, reports, figures): every
notebook reads what the one before wrote there, so each one can start in a fresh runtime.
**Colab** gives every notebook its own runtime: with `USE_DRIVE = True` the run folder lives on Google Drive
(under `MyDrive/xrai/`; Colab asks once for access) and a disconnect loses nothing. **Kaggle** gives every
notebook its own working folder: attach the previous notebook's output (Add Input > Notebook Output Files)
and its run folder is copied into `/kaggle/working`, because the input folder is read-only; this
notebook's output then holds the run folder so far, for the next one."""

RUN_FOLDER = "RUN_DIR = xrai.env.prepare_run_dir(RUN_DIR, use_drive=USE_DRIVE)"

IMAGES_MD = """\
The manifest's image paths are relative to the dataset's folder, so the images are found again on this
machine: where they were, attached in Kaggle, in kagglehub's cache, downloaded again, or (the synthetic
set) made again, file for file. The line below says where."""

READ_MANIFEST = 'manifest = xrai.data.read_manifest(RUN_DIR)\nprint(manifest.attrs["found"])'


def title(name: str, heading: str, text: str, needs: str) -> str:
    return f"# {heading}\n\n{text}\n\n**Needs:** {needs}\n\n{badges(name)}"


def imports(*extra: str) -> str:
    # the inline backend shows the matplotlib Figures xrai.plots returns (they are not pyplot figures)
    lines = ["%matplotlib inline", "from pathlib import Path", "", "import pandas as pd", "from IPython.display import Image, display", ""]
    lines += ["import xrai", "import xrai.data", "import xrai.env", *extra, "", "RUNTIME = xrai.env.check_runtime()"]
    return "\n".join(lines)


def header(name: str, heading: str, text: str, needs: str, extra_imports: tuple[str, ...]) -> list:
    """Title, GPU check (the first code cell), install, imports with the runtime, and the parameters' heading."""
    return [
        new_markdown_cell(title(name, heading, text, needs)),
        new_code_cell(GPU_CHECK),
        new_code_cell(SETUP),
        new_markdown_cell("## Imports and runtime\n\nSays whether a T4 GPU is attached and, if not, how to get one."),
        new_code_cell(imports(*extra_imports)),
        new_markdown_cell("## Parameters\n\nChange them here, or pass them with papermill (`-p EPOCHS 1`)."),
    ]


def parameters(source: str) -> nbformat.NotebookNode:
    return new_code_cell(source, metadata={"tags": ["parameters"]})


def md(text: str) -> nbformat.NotebookNode:
    return new_markdown_cell(text)


def code(text: str) -> nbformat.NotebookNode:
    return new_code_cell(text)


def run_folder(*, read: bool = True) -> list:
    """The run-folder cells: prepare it (Drive, Kaggle's read-only input) and, with ``read``, find the images."""
    cells = [md("## Run folder\n\n" + RUN_FOLDER_MD), code(RUN_FOLDER)]
    if read:
        cells += [md("## Images\n\n" + IMAGES_MD), code(READ_MANIFEST)]
    return cells


# ---- the notebooks ------------------------------------------------------------------------------

DATA_PARAMETERS = '''\
DATASET = "mura"  # mura, fracatlas, multiregion, bonefracture, or synthetic (built in: no download, fine on a CPU)
ROOT = None  # a folder that already holds the data; None: found attached in Kaggle, else downloaded with kagglehub
RUN_DIR = "runs/mura"  # the run folder every notebook of the series reads and writes
USE_DRIVE = True  # Colab only: keep RUN_DIR on Google Drive (ignored elsewhere)'''
SPLIT_PARAMETERS = '''\
SEED = 0  # seeds the patient-grouped split
VAL_FRACTION = 0.15  # share of patients in validation, where the source has no official split
TEST_FRACTION = 0.15  # share of patients in test (MURA: carved from its train split)'''
LOAD = ("manifest = xrai.data.load(DATASET, root=ROOT, seed=SEED, val_fraction=VAL_FRACTION, "
        "test_fraction=TEST_FRACTION)\n"
        'print(f"{len(manifest):,} images from {manifest.attrs[\'root\']} ({manifest.attrs[\'split_method\']})")\n'
        "manifest.head()")
COUNTS = ('pd.crosstab(manifest["body_part"], manifest["label"].map({0: "normal", 1: "abnormal"}), '
          'margins=True, margins_name="total")')
GPU_STOP_MD = ("## GPU\n\nTraining real X-rays on a CPU takes hours, so without a GPU this notebook stops here and "
               "says how to get a T4, unless `ALLOW_CPU = True` or the data is the synthetic set.")
# launch: every GPU there is (Kaggle's T4 x2: torchrun in a subprocess, streamed here); fit() in the kernel with one.
FIT = ('RESUME = Path(RUN_DIR, "checkpoints", "last.pt").is_file()\n'
       'result = xrai.train.launch(config, RUN_DIR, nproc="auto", manifest=manifest, resume=RESUME)\n'
       'print(f"best {config.monitor} {result.best_metric:.4f} at epoch {result.best_epoch}, "\n'
       '      f"stopped early: {result.stopped_early}")')
BASELINE_MD = ("On MURA runs, beside the study-level kappa of the DenseNet-169 in the MURA paper (Rajpurkar et al., "
               "2017). That baseline is on MURA's hidden test set; ours is on a test split carved from MURA's train "
               "set, so read it as a guide, not a ranking. Other sources get no baseline.")
BASELINE = "xrai.evaluate.per_part_table(report_test)"
CURVES = 'xrai.plots.plot_history(result.history, Path(RUN_DIR, "curves.png"))'
CLASS_REPORT = 'pd.DataFrame(report_test["classification_report"]).T'
STUDY_TABLE = 'pd.DataFrame({"valid": report_valid["study"] or {}, "test": report_test["study"] or {}})'
# One cell per Grad-CAM gallery of xrai.evaluate.gallery's GALLERY: true positives, false positives, false negatives.
SHOW_GALLERY = {k: f'display(Image(filename=str(GALLERY["{k}"])))' for k in ("tp", "fp", "fn")}


def nb00() -> list:
    name = "00_quickstart"
    return [
        *header(
            name,
            "00 · Quickstart: the whole series in one run",
            "One *Run all*: MURA v1.1 (or the `DATASET` you choose), one body part (wrist by default), MobileNetV2 "
            "from ImageNet weights for 5 epochs, then the classification report, study-level Cohen's kappa beside "
            "the MURA baseline, and a Grad-CAM gallery with actual and predicted labels and probabilities. It calls "
            "the same functions as notebooks 01-05, which take each step further.",
            "GPU T4 · about 15 minutes on a T4 for MURA's wrist images, download included (an estimate) · nothing "
            "before it. In Kaggle, attach the dataset first (Add Input > search `mura-v11`).",
            ("import xrai.evaluate", "import xrai.plots", "import xrai.train",
             "from xrai.config import TrainConfig"),
        ),
        parameters(
            DATA_PARAMETERS.replace('"runs/mura"', '"runs/quickstart"') + "\n" + SPLIT_PARAMETERS + "\n"
            'BODY_PART = "wrist"  # one MURA part (elbow, finger, forearm, hand, humerus, shoulder, wrist), or all\n'
            'MODEL = "mobilenet_v2"\n'
            "PRETRAINED = True  # start from ImageNet weights (downloaded once)\n"
            "EPOCHS = 5\n"
            "IMG_SIZE = None  # None: 224 (128 on the synthetic set)\n"
            "BATCH_SIZE = 64\n"
            "ALLOW_CPU = False  # train without a GPU anyway (hours on real data)\n"
            "GALLERY_N = 4  # images per Grad-CAM gallery"
        ),
        *run_folder(read=False),
        md(GPU_STOP_MD),
        code("RUNTIME = xrai.env.require_gpu(allow_cpu=ALLOW_CPU, dataset=DATASET)"),
        md("## Data\n\nFound attached in Kaggle, or downloaded with kagglehub (cached after the first time); split by "
           "patient, so no patient lands in two splits."),
        code(LOAD),
        code("xrai.data.save_manifest(manifest, RUN_DIR)\n" + COUNTS),
        md("## Train"),
        code(
            "config = TrainConfig(data=DATASET, root=manifest.attrs[\"root\"], body_part=BODY_PART, model=MODEL,\n"
            "                     pretrained=PRETRAINED, epochs=EPOCHS, img_size=IMG_SIZE, batch_size=BATCH_SIZE, "
            "seed=SEED)\n" + FIT
        ),
        code(CURVES),
        md("## Evaluate\n\nThe threshold is chosen on validation and applied unchanged to test."),
        code('report_valid = xrai.evaluate.evaluate_run(RUN_DIR, split="valid")\n'
             'report_test = xrai.evaluate.evaluate_run(RUN_DIR, split="test")\n'
             'pd.DataFrame({"valid": report_valid["image"], "test": report_test["image"]}).drop(index="confusion_matrix")'),
        code(CLASS_REPORT),
        md("## Study level and per body part\n\nA study's probability is the mean of its images' (MURA's protocol); "
           "its threshold is chosen on validation's study means. " + BASELINE_MD),
        code(STUDY_TABLE),
        code(BASELINE),
        md("## Grad-CAM\n\nThe most confident true positives, false positives and false negatives; each image "
           "carries its actual and predicted label and the probability (red: a wrong call)."),
        code('GALLERY = xrai.evaluate.gallery(RUN_DIR, split="test", n=GALLERY_N)\n' + SHOW_GALLERY["tp"]),
        code(SHOW_GALLERY["fp"]),
        code(SHOW_GALLERY["fn"]),
        md("Next: the numbered notebooks take each step further (01 data, 02 EDA and the leakage audit, 03 training "
           "options, 04 every report and figure, 05 the interactive Grad-CAM browser)."),
    ]


def nb01() -> list:
    name = "01_download"
    return [
        *header(
            name,
            "01 · Download the data and build the manifest",
            "Fetches MURA v1.1 (or FracAtlas, or a class-folder set) with kagglehub, or finds it attached in "
            "Kaggle, reads it into the **manifest** (one row per image: path, label, body part, patient, study, "
            "split), splits it by patient, and saves it as `RUN_DIR/manifest.csv` for the notebooks after it.",
            "no GPU (CPU is fine) · about 5 minutes on Colab for MURA (3.3 GB download; an estimate) · "
            "nothing before it. In Kaggle, attach the dataset first (Add Input > search `mura-v11`) and "
            "nothing is downloaded.",
            (),
        ),
        parameters(DATA_PARAMETERS + "\n" + SPLIT_PARAMETERS),
        *run_folder(read=False),
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
            "and as thumbnails. Writes `RUN_DIR/audit.csv` and the figures under `RUN_DIR/eda/`.",
            "no GPU (CPU is fine) · about 10 minutes on Colab for MURA's 40,561 images (an estimate) · "
            "run **01_download.ipynb** first (same `RUN_DIR`).",
            ("import xrai.plots",),
        ),
        parameters(
            'RUN_DIR = "runs/mura"  # the run folder 01_download.ipynb wrote\n'
            "USE_DRIVE = True  # Colab only: the run folder is on Google Drive (ignored elsewhere)\n"
            "SAMPLES_PER_CLASS = 6  # images per class in the sample grid\n"
            "WORST_GROUPS = 6  # duplicate groups shown as thumbnails"
        ),
        *run_folder(),
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
            'audit_table.to_csv(Path(RUN_DIR, "audit.csv"), index=False)\n'
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
            "Pick a body part (or all seven) and a model, and train it on the run folder's manifest with mixed "
            "precision on the GPU, live progress, a checkpoint every epoch and early stopping. Run it again after "
            "a disconnect, in a fresh runtime, and it **resumes** from the last checkpoint.",
            "GPU T4 (without one it stops, unless `ALLOW_CPU = True` or the data is the synthetic set) · about 15 "
            "minutes on a T4 for MobileNetV2 on all of MURA, 10 epochs at 224 px (an estimate; one body part takes "
            "a fraction of that) · run **01_download.ipynb** first (02_eda for the audit).",
            ("import xrai.plots", "import xrai.recipe", "import xrai.train", "import xrai.widgets"),
        ),
        parameters(
            'RUN_DIR = "runs/mura"  # the run folder 01_download.ipynb wrote; checkpoints go in it too\n'
            "USE_DRIVE = True  # Colab only: the run folder is on Google Drive (ignored elsewhere)\n"
            'BODY_PART = "all"  # all, or one of elbow, finger, forearm, hand, humerus, shoulder, wrist (or "wrist,hand")\n'
            'MODEL = "mobilenet_v2"  # see xrai.models.list_models(): resnet18, densenet169, efficientnet_b0, ...\n'
            "PRETRAINED = True  # start from ImageNet weights (downloaded once)\n"
            "EPOCHS = 10\n"
            "IMG_SIZE = None  # crop side fed to the model; None: 224 (128 on the synthetic set)\n"
            "BATCH_SIZE = 64\n"
            'RECIPE = "v2"  # docs/recipe.md: v2 (lr 2e-3, stretch, flip TTA), chosen by grouped CV from scratch; v1: the old one\n'
            "SEED = 0\n"
            "ALLOW_CPU = False  # train without a GPU anyway (hours on real data)"
        ),
        *run_folder(read=False),
        md(GPU_STOP_MD),
        code('RUNTIME = xrai.env.require_gpu(allow_cpu=ALLOW_CPU, dataset=xrai.data.manifest_info(RUN_DIR)["source"])'),
        md("## Images\n\n" + IMAGES_MD),
        code(READ_MANIFEST),
        md(
            "## Body part and model\n\nPick a body part and a model below, then run the cells after this one "
            "(**Run > Run selected cell and all below**). *Run all* does not wait for a click: the pickers start at "
            "`BODY_PART` and `MODEL`, so a non-interactive run (papermill, Kaggle's *Save & Run All*) uses the "
            "parameters, and a saved version shows them as text."
        ),
        code(
            "part_picker = xrai.widgets.body_part_picker(manifest, default=BODY_PART)\n"
            "model_choice = xrai.widgets.model_picker(default=MODEL)\n"
            "xrai.widgets.show(part_picker, model_choice)"
        ),
        code(
            "config = xrai.recipe.recipe_config(\n"
            "    RECIPE,\n"
            '    data=manifest.attrs["source"] or "mura",\n'
            '    root=manifest.attrs["root"] or None,\n'
            "    body_part=xrai.widgets.selected_body_part(part_picker, fallback=BODY_PART),\n"
            "    model=xrai.widgets.selected_model(model_choice, fallback=MODEL),\n"
            "    pretrained=PRETRAINED,\n"
            "    epochs=EPOCHS,\n"
            "    img_size=IMG_SIZE,\n"
            "    batch_size=BATCH_SIZE,\n"
            "    seed=SEED,\n"
            ")\n"
            'print(f"body part: {config.body_part}, model: {config.model}, image size: {config.image_size}")'
        ),
        md("The images this run trains, validates and tests on:"),
        code(
            "run_rows = xrai.data.filter_body_parts(manifest, config.body_parts())\n"
            'pd.crosstab([run_rows["body_part"], run_rows["split"]], run_rows["label"].map({0: "normal", 1: "abnormal"}),\n'
            '            margins=True, margins_name="total")'
        ),
        md(
            "## Train\n\nA run found unfinished in `RUN_DIR` (a `checkpoints/last.pt`) is resumed exactly where it "
            "stopped, in this runtime or a fresh one; a finished one returns at once. To start over, use a new "
            "`RUN_DIR`. With two GPUs (Kaggle's *GPU T4 x2*) it trains on both: torchrun runs in a subprocess, "
            "its progress shows here, and `BATCH_SIZE` is shared between them."
        ),
        code(FIT),
        md("## Curves"),
        code("result.history"),
        code(CURVES),
        md("Next: **04_evaluate.ipynb**."),
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
            "the published MURA DenseNet-169 baseline.",
            "GPU T4 (a CPU works, slower) · about 3 minutes on a T4 for MURA (an estimate) · "
            "run **03_train.ipynb** first (same `RUN_DIR`).",
            ("import xrai.evaluate", "import xrai.plots"),
        ),
        parameters(
            'RUN_DIR = "runs/mura"  # the run folder 03_train.ipynb trained in\n'
            "USE_DRIVE = True  # Colab only: the run folder is on Google Drive (ignored elsewhere)\n"
            "TTA = None  # average each image with its mirror image: None as the run's recipe says (v2: yes), or True/False"
        ),
        *run_folder(),
        md(
            "## Validation, then test\n\nOn validation only: a calibration of the probabilities (Platt scaling, used only where it helps), then "
            "an image threshold (on images) and a study threshold (on study means), each at Youden's J and at a "
            "screening sensitivity of 0.95. Test uses them unchanged."
        ),
        code("report_valid = xrai.evaluate.evaluate_run(RUN_DIR, split=\"valid\", tta=TTA)"),
        code("report_test = xrai.evaluate.evaluate_run(RUN_DIR, split=\"test\", tta=TTA)"),
        md("## Image level"),
        code(
            'print(f"threshold {report_test[\'threshold\']:.3f} (chosen on {report_test[\'threshold_from\']}); '
            'split: {report_test[\'split_method\']}; audit: {report_test[\'audit\']}")\n'
            'pd.DataFrame({"valid": report_valid["image"], "test": report_test["image"]}).drop(index="confusion_matrix")'
        ),
        code(CLASS_REPORT),
        md("## Study level (MURA's protocol: a study's probability is the mean of its images')"),
        code(STUDY_TABLE),
        md("## Thresholds and calibration\n\nWhich threshold made which figure, and ECE before and after calibration."),
        code("xrai.evaluate.thresholds_table(report_test)"),
        code("xrai.evaluate.calibration_table(report_valid, report_test)"),
        md("## Figures (test)"),
        code('FIGURES = xrai.plots.save_run_figures(RUN_DIR, "test")\nFIGURES'),
        code('display(Image(filename=str(Path(RUN_DIR, "confusion_matrix_test.png"))))'),
        code('display(Image(filename=str(Path(RUN_DIR, "roc_test.png"))))'),
        code('display(Image(filename=str(Path(RUN_DIR, "pr_test.png"))))'),
        code('display(Image(filename=str(Path(RUN_DIR, "reliability_test.png"))))'),
        md("## Per body part\n\n" + BASELINE_MD),
        code(BASELINE),
        code('display(Image(filename=str(Path(RUN_DIR, "per_body_part_test.png"))))'),
        md("Next: **05_gradcam.ipynb** (where the model looks)."),
    ]


def nb05() -> list:
    name = "05_gradcam"
    return [
        *header(
            name,
            "05 · Grad-CAM: where the model looks",
            "Galleries of the most confident true positives, false positives and false negatives with the "
            "Grad-CAM heatmap over the original X-ray and the actual and predicted labels, then an interactive "
            "browser: pick a body part, an outcome (TP, FP, FN, TN) and an image.",
            "GPU T4 (a CPU works) · about 2 minutes on a T4 (an estimate) · run **04_evaluate.ipynb** first "
            "(same `RUN_DIR`).",
            ("import xrai.evaluate", "import xrai.widgets"),
        ),
        parameters(
            'RUN_DIR = "runs/mura"  # the run folder 04_evaluate.ipynb scored\n'
            "USE_DRIVE = True  # Colab only: the run folder is on Google Drive (ignored elsewhere)\n"
            'SPLIT = "test"\n'
            "GALLERY_N = 4  # images per gallery\n"
            'CAM_METHOD = "gradcam"  # gradcam, gradcam++ or eigencam'
        ),
        *run_folder(),
        md(
            "## Galleries\n\nWritten to `RUN_DIR/gradcam/`. Red text marks a wrong call. A heatmap on the bone "
            "where the fracture is is reassuring; one on a marker, the text or the image edge is a shortcut."
        ),
        code("GALLERY = xrai.evaluate.gallery(RUN_DIR, split=SPLIT, n=GALLERY_N, method=CAM_METHOD)"),
        *(code(cell) for cell in SHOW_GALLERY.values()),
        md(
            "## Measured, not only shown\n\nFaithfulness (grad-cam's ROAD and confidence change; higher ROAD is more "
            "faithful; a noise map for reference), the randomisation check (maps from random weights must differ) "
            "and, on the synthetic set, the pointing game: from `report_<SPLIT>.json` (04_evaluate)."
        ),
        code("xrai.evaluate.explanation_table(RUN_DIR, SPLIT)"),
        md(
            "## Browser\n\nPick a body part, an outcome and an image; images are ordered from the most confident. "
            "Each overlay is computed when first shown. A saved version (no widgets there) shows the most "
            "confident image of each outcome instead."
        ),
        code("browser = xrai.widgets.gradcam_browser(RUN_DIR, split=SPLIT, method=CAM_METHOD)\n"
             "xrai.widgets.show(browser)"),
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
