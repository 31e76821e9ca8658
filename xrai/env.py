"""Where are we running (Colab, Kaggle, local), which GPUs are there, is one of them a T4, and where the
run folder can live (Google Drive in Colab; a writable copy in Kaggle's working folder)."""

from __future__ import annotations

import contextlib
import logging
import os
import platform as _platform
import random
import shutil
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from xrai.runs.layout import MANIFEST_CSV

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

# The menu paths to a T4. tools/make_notebooks.py writes them into each notebook's first cell too,
# which runs before xrai is installed and so cannot import them.
GPU_MENUS = {
    "colab": "Runtime > Change runtime type > Hardware accelerator: T4 GPU > Save",
    "kaggle": "Settings > Accelerator > GPU T4 x2",
}
T4_HINTS = {
    "colab": f"In Colab: {GPU_MENUS['colab']}, then run all again.",
    "kaggle": f"In Kaggle: {GPU_MENUS['kaggle']}, then run all again "
    "(a phone-verified account is needed for GPUs).",
    "local": "No T4 here. Open the notebook in Colab or Kaggle with the badges at its top to get a free T4, "
    "or run on this machine's CPU/GPU (slower, but everything works).",
}


@dataclass(frozen=True)
class GPUInfo:
    name: str
    memory_gb: float
    capability: tuple[int, int]

    @property
    def is_t4(self) -> bool:
        return "T4" in self.name.upper()


@dataclass(frozen=True)
class RuntimeInfo:
    """What this kernel runs on."""

    platform: str  # "colab", "kaggle" or "local"
    kaggle_batch: bool  # Kaggle's "Save & Run All" (no one is watching)
    gpus: tuple[GPUInfo, ...] = field(default_factory=tuple)
    python: str = ""
    torch: str = ""
    cpu_count: int = 1

    @property
    def has_gpu(self) -> bool:
        return bool(self.gpus)

    @property
    def has_t4(self) -> bool:
        return any(g.is_t4 for g in self.gpus)

    @property
    def device(self) -> str:
        return "cuda" if self.gpus else "cpu"

    @property
    def amp_dtype(self) -> str | None:
        """'float16' on Volta/Turing (T4), 'bfloat16' on Ampere and newer, None on CPU."""
        if not self.gpus:
            return None
        return amp_dtype_for(self.gpus[0].capability)

    def summary(self) -> str:
        where = {"colab": "Google Colab", "kaggle": "Kaggle", "local": "local machine"}[self.platform]
        if self.platform == "kaggle":
            where += " (batch run)" if self.kaggle_batch else " (interactive)"
        lines = [f"runtime : {where}, Python {self.python}, torch {self.torch}, {self.cpu_count} CPU cores"]
        if self.gpus:
            for i, g in enumerate(self.gpus):
                lines.append(
                    f"gpu {i}   : {g.name}, {g.memory_gb:.1f} GiB, compute {g.capability[0]}.{g.capability[1]}"
                )
        else:
            lines.append("gpu     : none (training runs on the CPU: fine for the synthetic demo, slow for real data)")
        lines.append(f"device  : {self.device}, mixed precision: {self.amp_dtype or 'off'}")
        if self.has_t4:
            lines.append("T4      : yes")
        else:
            lines.append("T4      : no. " + T4_HINTS[self.platform])
        return "\n".join(lines)


def amp_dtype_for(capability: tuple[int, int]) -> str | None:
    """The autocast dtype for a CUDA compute capability: bf16 from Ampere (8.0) on, fp16 from Volta (7.0)."""
    major = capability[0]
    if major >= 8:
        return "bfloat16"
    if major >= 7:
        return "float16"
    return None


def detect_platform(environ: dict[str, str] | None = None) -> tuple[str, bool]:
    """Return (platform, kaggle_batch) from environment variables and the modules loaded."""
    env = os.environ if environ is None else environ
    if "KAGGLE_KERNEL_RUN_TYPE" in env or "KAGGLE_URL_BASE" in env or "KAGGLE_DATA_PROXY_TOKEN" in env:
        return "kaggle", env.get("KAGGLE_KERNEL_RUN_TYPE", "Interactive") == "Batch"
    if "COLAB_RELEASE_TAG" in env or "COLAB_GPU" in env or (environ is None and "google.colab" in sys.modules):
        return "colab", False
    return "local", False


def list_gpus() -> tuple[GPUInfo, ...]:
    """The CUDA devices torch can see."""
    import torch  # on use only: the ground floor imports no torch (tests/test_layout.py)

    if not torch.cuda.is_available():
        return ()
    gpus = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        gpus.append(GPUInfo(name=p.name, memory_gb=p.total_memory / 2**30, capability=(p.major, p.minor)))
    return tuple(gpus)


def gpu_count() -> int:
    """How many CUDA devices torch can see (0 without CUDA)."""
    import torch  # on use only: the ground floor imports no torch (tests/test_layout.py)

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def runtime_info() -> RuntimeInfo:
    import torch  # on use only: the ground floor imports no torch (tests/test_layout.py)

    plat, batch = detect_platform()
    return RuntimeInfo(
        platform=plat,
        kaggle_batch=batch,
        gpus=list_gpus(),
        python=_platform.python_version(),
        torch=torch.__version__,
        cpu_count=cpu_count(),
    )


class NoT4Error(RuntimeError):
    """Raised by check_runtime(strict=True) when no T4 is attached."""


class NoGPUError(RuntimeError):
    """Raised by require_gpu() when no GPU is attached and the CPU was not allowed."""


def require_gpu(*, allow_cpu: bool = False, dataset: str = "") -> RuntimeInfo:
    """Stop a training notebook that has no GPU, unless the CPU is allowed or the data is the synthetic set.

    Args:
        allow_cpu: the notebook's ALLOW_CPU parameter (train on the CPU anyway: hours on real data).
        dataset: the run's source; "synthetic" is small enough for a CPU.
    Raises:
        NoGPUError: no CUDA GPU; the message gives the menu path to a T4 and the way to go on without one.
    """
    info = runtime_info()
    if info.has_gpu or allow_cpu or dataset == "synthetic":
        return info
    raise NoGPUError(f"no GPU is attached: training {dataset or 'real X-rays'} on the CPU takes hours. "
                     f"{T4_HINTS[info.platform]} (Or set ALLOW_CPU = True to train on the CPU anyway.)")


def check_runtime(strict: bool = False, *, show: bool = True) -> RuntimeInfo:
    """Print a short block on this runtime and, with no T4, how to get one.

    Args:
        strict: raise NoT4Error instead of carrying on without a T4.
        show: print the block (notebooks want it; tests may not).
    Raises:
        NoT4Error: strict is set and no T4 is attached.
    """
    info = runtime_info()
    if show:
        print(info.summary())
    if strict and not info.has_t4:
        raise NoT4Error("no T4 GPU is attached. " + T4_HINTS[info.platform])
    return info


def cpu_count() -> int:
    """CPUs this process may use (the affinity mask, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def get_device(preference: str = "auto"):
    """torch.device for 'auto' (CUDA when there, else CPU), 'cpu', 'cuda' or 'cuda:N'."""
    import torch  # on use only: the ground floor imports no torch (tests/test_layout.py)

    if preference in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(preference)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but no CUDA GPU is visible; use device='cpu' or 'auto'")
    return device


def autocast_dtype(device) -> torch.dtype | None:
    """The autocast dtype for a torch.device, or None where mixed precision is off (CPU)."""
    import torch  # on use only: the ground floor imports no torch (tests/test_layout.py)

    if getattr(device, "type", str(device)) != "cuda":
        return None
    index = device.index if getattr(device, "index", None) is not None else torch.cuda.current_device()
    name = amp_dtype_for(torch.cuda.get_device_capability(index))
    return None if name is None else getattr(torch, name)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA). Deterministic kernels are `backend_settings`' job."""
    import torch  # on use only: the ground floor imports no torch (tests/test_layout.py)

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


CUBLAS_WORKSPACE = ":4096:8"  # what CUDA's docs ask for deterministic cuBLAS (":16:8" works too, slower)


@contextlib.contextmanager
def backend_settings(device, *, deterministic: bool = False) -> Iterator[None]:
    """Run a block with the backend settings training wants; the previous global settings come back after.

    deterministic=False: cuDNN autotuning on CUDA (``cudnn.benchmark``, the fastest kernels, which may
    differ from run to run). deterministic=True: no autotuning, ``cudnn.deterministic``,
    ``torch.use_deterministic_algorithms(True, warn_only=True)`` (an op with no deterministic kernel
    warns, naming itself, instead of stopping a long run) and ``CUBLAS_WORKSPACE_CONFIG`` set when unset.
    cuBLAS reads that variable when CUDA starts, so it is set before any CUDA work where possible; a
    warning says so when CUDA was already in use.
    """
    import torch  # on use only: the ground floor imports no torch (tests/test_layout.py)

    cudnn = torch.backends.cudnn
    saved = (cudnn.benchmark, cudnn.deterministic, torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        if deterministic:
            if "CUBLAS_WORKSPACE_CONFIG" not in os.environ:
                os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE
                if torch.cuda.is_available() and torch.cuda.is_initialized():
                    warnings.warn("deterministic=True: CUDA was already in use when CUBLAS_WORKSPACE_CONFIG was set, "
                                  f"so cuBLAS may not honour it; set CUBLAS_WORKSPACE_CONFIG={CUBLAS_WORKSPACE} "
                                  "before the first CUDA call (first cell / shell) for bit-exact runs", stacklevel=3)
            cudnn.benchmark, cudnn.deterministic = False, True
            torch.use_deterministic_algorithms(True, warn_only=True)
        elif getattr(device, "type", str(device)) == "cuda":
            cudnn.benchmark = True
        yield
    finally:
        cudnn.benchmark, cudnn.deterministic = saved[0], saved[1]
        torch.use_deterministic_algorithms(saved[2], warn_only=saved[3])


def xrai_home() -> Path:
    """Where xrai keeps caches (synthetic data, decoded-image caches): $XRAI_HOME or ~/.cache/xrai."""
    return Path(os.environ.get("XRAI_HOME", Path.home() / ".cache" / "xrai")).expanduser()


# ---- the run folder -------------------------------------------------------------------------------

DRIVE_MOUNT = Path("/content/drive")
DRIVE_FOLDER = DRIVE_MOUNT / "MyDrive" / "xrai"
_RUN_MARKER = MANIFEST_CSV  # every run folder of the series holds one (notebook 01 writes it)
_SEARCH_DEPTH = 5  # <input>/notebooks/<owner>/<slug>/versions/N above an attached run folder


def kaggle_input_dir() -> Path:
    """Kaggle's read-only folder of attached data ($XRAI_KAGGLE_INPUT overrides it, for tests)."""
    return Path(os.environ.get("XRAI_KAGGLE_INPUT", "/kaggle/input"))


def is_under(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    """Whether ``path`` is ``folder`` or lies inside it (both made absolute, symlinks not followed)."""
    path, folder = os.path.abspath(path), os.path.abspath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def prepare_run_dir(run_dir: str | os.PathLike, *, use_drive: bool = True, show: bool = True) -> str:
    """The run folder this notebook should use: on Google Drive in Colab, and always writable.

    - Colab with ``use_drive``: a relative ``run_dir`` goes under MyDrive/xrai/ (Drive is mounted here,
      Colab asks once for access), so every notebook's fresh runtime finds what the last one wrote.
    - A ``run_dir`` under Kaggle's input folder, or one that is not writable (a previous notebook's
      output attached as an input), is copied into the working folder first; the copy is used and
      nothing is ever written under the input folder.
    - A relative ``run_dir`` that is not in the working folder, while a notebook output holding it is
      attached (Kaggle, one notebook per step), is copied from there.

    Args:
        run_dir: the notebook's RUN_DIR parameter.
        use_drive: the USE_DRIVE parameter (Colab only).
        show: print one line saying which folder is used (and where it was copied from).
    Returns:
        The folder to use, as a string.
    """
    platform, _ = detect_platform()
    path = Path(run_dir).expanduser()
    if platform == "colab" and use_drive and (not path.is_absolute() or is_under(path, DRIVE_MOUNT)):
        _mount_drive()  # also for a path the user wrote under /content/drive: unmounted, it is a local folder
        path = DRIVE_FOLDER / path if not path.is_absolute() else path
    path = Path(os.path.abspath(path))
    inputs, source, why = kaggle_input_dir(), None, ""
    if is_under(path, inputs) or (path.exists() and not _writable(path)):
        source = path
        why = "the input folder is read-only" if is_under(path, inputs) else "it is not writable"
        path = Path(os.path.abspath(os.path.join("runs", path.name)))
    elif not path.exists() and not Path(run_dir).is_absolute() and inputs.is_dir():
        source = _attached_run_dir(inputs, Path(run_dir))
        why = "a notebook output attached as an input"
    if source is not None:
        if path.exists() and any(path.iterdir()):
            why = f"kept: it already holds {sum(1 for _ in path.rglob('*'))} entries, not copied again from {source}"
        else:
            n = copy_tree(source, path)
            why = f"{n} files copied from {source} ({why})"
    line = f"run folder: {path}" + (f"; {why}" if source is not None else "")
    logger.info(line)
    if show:
        print(line)
    return str(path)


def _mount_drive() -> None:
    from google.colab import drive  # type: ignore[import-not-found]  # exists only in Colab

    drive.mount(str(DRIVE_MOUNT))


def _writable(path: Path) -> bool:
    return os.access(path, os.W_OK | os.X_OK)


def _attached_run_dir(inputs: Path, relative: Path) -> Path | None:
    """The attached copy of ``relative`` (e.g. runs/mura) holding a manifest: the fullest when there are several."""
    found = []
    for depth in range(1, _SEARCH_DEPTH + 1):
        found += [Path(p).parent for p in sorted(inputs.glob("/".join(["*"] * depth + [str(relative), _RUN_MARKER])))]
    if not found:
        return None
    # A later notebook's output holds everything an earlier one wrote, and more.
    ranked = sorted(found, key=lambda d: (sum(1 for _ in d.rglob("*")), str(d)), reverse=True)
    if len(ranked) > 1:
        logger.warning("several attached copies of %s: using %s (the fullest); also found: %s", relative,
                       ranked[0], ", ".join(map(str, ranked[1:])))
    return ranked[0]


def copy_tree(source: str | os.PathLike, target: str | os.PathLike) -> int:
    """Copy the files under ``source`` into ``target`` (created), writable whatever the source's modes.

    shutil.copytree would carry over the read-only modes of an attached input, leaving folders that
    the notebook could not write its results into. Returns the number of files copied.
    """
    source, target = Path(source), Path(target)
    count = 0
    for folder, _, files in os.walk(source):
        out = target / Path(folder).relative_to(source)
        out.mkdir(parents=True, exist_ok=True)
        for name in files:
            shutil.copyfile(os.path.join(folder, name), out / name)
            count += 1
    return count
