"""Checkpoint I/O for `train.fit`: atomic writes, RNG state as plain tensors, resume compatibility checks.

Everything saved here loads with ``torch.load(path, weights_only=True)``: RNG states are converted to
tensors and Python numbers (no numpy arrays, no arbitrary objects in the pickle).
"""

from __future__ import annotations

import pickle
import random
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xrai.config import PRE_RECIPE_VALUES, TrainConfig
from xrai.errors import UserError
from xrai.fileio import atomic_torch_save
from xrai.runs.layout import CHECKPOINTS_DIR, CONFIG_JSON, RunFolder

__all__ = [
    "RESUME_MAY_CHANGE",
    "CheckpointError",
    "atomic_save",
    "config_differences",
    "load_checkpoint",
    "resume_state",
    "rng_state",
    "set_rng_state",
    "to_cpu",
]

# Fields that may differ between a checkpoint's config and the config a run is resumed with: they
# do not change the maths of the epochs already done. `epochs` may only grow. `world_size` changes
# the data order from the resumed epoch on (each rank's shard and augmentation stream), which fit()
# says in a warning.
RESUME_MAY_CHANGE = ("epochs", "num_workers", "loggers", "experiment", "root", "device", "world_size")

# What torch.load raises for a file that is not a whole checkpoint: a torn zip (RuntimeError from
# PytorchStreamReader), an empty or cut pickle (EOFError), foreign bytes (KeyError, ValueError...), or a
# pickle that asks for code (UnpicklingError from the weights_only unpickler, which refuses it).
_UNREADABLE = (pickle.UnpicklingError, EOFError, RuntimeError, KeyError, ValueError, IndexError, TypeError,
               AttributeError, zipfile.BadZipFile)


class CheckpointError(UserError, ValueError):
    """A checkpoint file that cannot be loaded (torn, foreign or refused); the message names the file."""


def atomic_save(obj: Any, path: str | Path) -> Path:
    """torch.save `obj` so that `path` holds either the old file or the complete new one, never a torn one.

    Written through ``xrai.fileio.atomic_write`` (temporary file in the same folder, fsync, rename): the
    file is readable by others as any file this process creates (0644 under umask 022).
    """
    return atomic_torch_save(obj, path)


def to_cpu(tree: Any) -> Any:
    """A copy of nested dicts/lists/tuples with every tensor on the CPU, so a checkpoint written on a
    GPU loads anywhere, even with a plain torch.load(path, weights_only=True)."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().cpu()
    if isinstance(tree, dict):
        return {k: to_cpu(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(to_cpu(v) for v in tree)
    return tree


def load_checkpoint(path: str | Path, *, map_location: str | torch.device = "cpu") -> Any:
    """torch.load(weights_only=True), with every way a file can fail turned into one clear error.

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: the file is torn, not a PyTorch checkpoint, or holds objects that a checkpoint
            never holds (code; refused without running it). The message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    # torch warns about unusual pickle protocols on its way to failing: the error below says it all.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            state = torch.load(path, map_location=map_location, weights_only=True)
        except _UNREADABLE as err:
            raise CheckpointError(_unreadable_message(path, err)) from err
    for warning in caught:
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return state


def _unreadable_message(path: Path, err: BaseException) -> str:
    text = str(err)
    refused = re.search(r"unsupported (GLOBAL [\w.]+)", text, re.IGNORECASE)
    if refused:
        return (f"refused to load {path}: it holds objects an xrai checkpoint never holds ({refused.group(1)}), "
                "and loading them could run code; it was not written by xrai, so delete it or retrain")
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    if isinstance(err, EOFError):
        reason = "it ends before its data does"
    elif isinstance(err, (pickle.UnpicklingError, KeyError)) or not first:
        reason = f"its data is not a checkpoint's: {type(err).__name__}"
    else:
        reason = first.split(". ")[0][:160]
    return (f"cannot read the checkpoint {path}: the file is torn (cut short while copying or saving) or "
            f"not a PyTorch checkpoint ({reason}); copy it again, or train the run again")


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch CPU (and CUDA, when initialised) RNG states as tensors and plain numbers."""
    version, internal, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": gauss_next},
        "numpy": {
            "name": str(name),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` saved. CUDA states are restored when this machine has as many GPUs."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss_next"]))
    npy = state["numpy"]
    np.random.set_state(
        (npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])


def config_differences(saved: dict[str, Any], current: dict[str, Any], *, epochs_done: int) -> list[str]:
    """Describe how `current` differs from the checkpoint's `saved` config in ways a resume cannot accept.

    Returns lines like "lr: 0.001 in the checkpoint, 0.01 now"; empty when the resume is fine.
    """
    # A setting newer than the checkpoint's xrai ran at its value then: the recipe fields at what xrai
    # did before they existed (PRE_RECIPE_VALUES), any other at its default (TrainConfig.from_dict alike).
    then = {**TrainConfig().to_dict(), **PRE_RECIPE_VALUES}
    problems = []
    for name in sorted(set(saved) | set(current)):
        old, new = saved.get(name, then.get(name, "<missing>")), current.get(name, "<missing>")
        if old == new:
            continue
        if (name == "epochs" and isinstance(new, int) and isinstance(old, int) and new >= old
                and saved.get("scheduler") != "onecycle"):  # a one-cycle schedule's length is fixed
            continue
        if name in RESUME_MAY_CHANGE and name != "epochs":
            continue
        if name == "input_path" and "auto" in (old, new):  # "auto" resumes on the recorded path (fit)
            continue
        note = f" (may only be raised; {epochs_done} done)" if name == "epochs" else ""
        problems.append(f"{name}: {old!r} in the checkpoint, {new!r} now{note}")
    return problems


def resume_state(config: dict[str, Any], last_path: Path, *, resume: bool) -> dict[str, Any] | None:
    """The checkpoint to resume from, or None to start a new run.

    Raises:
        FileExistsError: `last_path` exists but resume is False (a new run would overwrite it).
        ValueError: the checkpoint's config differs from `config` beyond RESUME_MAY_CHANGE.
    """
    run_dir = last_path.parent.parent
    if not resume:
        if last_path.is_file():
            raise FileExistsError(f"{run_dir} already holds a run ({CHECKPOINTS_DIR}/last.pt); pass resume=True "
                                  "(CLI: --resume) to continue it, or choose a new run folder")
        return None
    if not last_path.is_file():
        warnings.warn(f"resume=True but {last_path} does not exist; starting a new run", stacklevel=3)
        return None
    state = load_checkpoint(last_path)
    recorded, wanted = state["config"].get("input_path", "auto"), config.get("input_path", "auto")
    if "auto" not in (recorded, wanted) and recorded != wanted:
        raise ValueError(f"cannot resume {run_dir} with input_path={wanted!r}: it trained on the {recorded!r} path "
                         f"(see its {CONFIG_JSON}); resume with input_path='auto' or {recorded!r}")
    problems = config_differences(state["config"], config, epochs_done=state["epoch"])
    if problems:
        raise ValueError(f"cannot resume {run_dir} with a different config:\n  " + "\n  ".join(problems)
                         + f"\nResume with the config in {RunFolder(run_dir).config_json} (epochs may be raised), "
                         "or start a new run folder")
    return state
