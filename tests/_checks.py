"""Shared test checks: a written figure is a real, non-blank picture; "no warning" means none of ours;
the environment of a child Python that imports this checkout's xrai."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
BLOCKER = Path(__file__).resolve().parent / "import_blocker"


def assert_picture(path: str | Path, *, min_side: int = 100, fmt: str = "PNG") -> np.ndarray:
    """Assert `path` is a `fmt` image at least min_side px a side and not blank; return it as RGB uint8."""
    path = Path(path)
    assert path.is_file(), f"{path} was not written"
    with Image.open(path) as im:
        assert im.format == fmt, f"{path} is {im.format}, not {fmt}"
        assert min(im.size) >= min_side, f"{path} is only {im.size[0]}x{im.size[1]} px"
        pixels = np.asarray(im.convert("RGB"))
    grey = pixels.mean(axis=2)
    # Blank = one flat colour (an empty canvas, an all-black overlay); a real figure has marks on it.
    assert grey.std() > 2.0 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 8, f"{path} is blank"
    return pixels


@contextlib.contextmanager
def strict_warnings() -> Iterator[None]:
    """Turn warnings into errors, except the deprecation notices libraries add from release to release.

    A test that promises "not a single warning" means ours (UserWarning and its kind, RuntimeWarning from
    our maths, scikit-learn's UndefinedMetricWarning); a DeprecationWarning or FutureWarning that a newer
    pandas, torch or scikit-learn emits inside the block is theirs, and must not fail the suite.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
            warnings.simplefilter("default", category)
        yield


def child_env(*, block: Iterable[str] = (), **extra: str) -> dict[str, str]:
    """os.environ for a subprocess that imports the xrai beside these tests (XRAI_HOME comes from conftest's
    environment), with `extra` set; `block`: packages made unimportable there (import_blocker goes first)."""
    first = [str(BLOCKER)] if block else []
    path = os.pathsep.join(filter(None, [*first, str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, **extra}
    if block:
        env["XRAI_BLOCK_IMPORTS"] = ",".join(block)
    return env
