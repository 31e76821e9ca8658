"""One recipe whatever the input path: the classic and the cached path give the same batches on the same images."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from xrai.data.batches import BadImageWarning
from xrai.data.cache import build_cache
from xrai.data.dataset import ClassicBatches
from xrai.data.loader import CachedBatches

SIZE, RESIZE, BATCH, SEED = 32, 40, 4, 5


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> pd.DataFrame:
    """15 readable PNG/JPEG files of assorted shapes and modes, with a broken file in the middle."""
    folder = tmp_path_factory.mktemp("parity")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(15):
        h, w = int(rng.integers(24, 80)), int(rng.integers(24, 80))
        pixels = rng.integers(0, 256, (h, w, 3) if i % 3 == 0 else (h, w), dtype=np.uint8)
        path = folder / f"{i:02d}.{'jpg' if i % 4 == 1 else 'png'}"
        Image.fromarray(pixels).save(path)
        paths.append(str(path))
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    paths.insert(7, str(folder / "broken.png"))
    return pd.DataFrame({"path": paths, "label": np.arange(len(paths)) % 2})


@pytest.fixture(scope="module")
def cache(images, tmp_path_factory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the build's own note about broken.png; the sources' warnings are tested
        return build_cache(images, size=RESIZE, cache_dir=tmp_path_factory.mktemp("cache"), workers=1, progress=False)


def _sources(images, cache, *, train: bool, num_workers: int = 0):
    common = dict(image_size=SIZE, batch_size=BATCH, train=train, seed=SEED, device="cpu")
    with pytest.warns(BadImageWarning) as cached_warnings:
        cached = CachedBatches(cache, images, **common)
    with pytest.warns(BadImageWarning) as classic_warnings:
        classic = ClassicBatches(images, resize_size=RESIZE, num_workers=num_workers, progress=False, **common)
    for caught in (cached_warnings, classic_warnings):  # one warning, naming the file, on either path
        assert len(caught) == 1 and "broken.png" in str(caught[0].message) and "1 of 16" in str(caught[0].message)
    return cached, classic


def _epoch(source, epoch):
    return [(x.clone(), y.clone()) for x, y in source.epoch(epoch)]


@pytest.mark.parametrize("train", [True, False])
def test_both_paths_drop_the_same_bad_image_and_batch_the_same_rows(images, cache, train):
    cached, classic = _sources(images, cache, train=train)
    assert cached.manifest["path"].tolist() == classic.manifest["path"].tolist()
    assert "broken.png" not in " ".join(classic.manifest["path"]) and len(classic.manifest) == 15
    assert cached.bad["path"].tolist() == classic.bad["path"].tolist() == [images["path"][7]]
    assert len(cached) == len(classic) == (3 if train else 4)  # 15 // 4 in training; every row in eval


def test_augmented_training_batches_are_identical(images, cache):
    """The same images and seed give the same augmented batches, so the same distribution: the two paths
    differ only in where the uint8 pixels come from (file decode or memmap)."""
    cached, classic = _sources(images, cache, train=True, num_workers=2)
    for epoch in (0, 1, 2):
        a, b = _epoch(cached, epoch), _epoch(classic, epoch)
        assert len(a) == len(b) == 3
        for (xa, ya), (xb, yb) in zip(a, b):
            assert xa.shape == xb.shape == (BATCH, 3, SIZE, SIZE)
            assert torch.equal(ya, yb)
            assert torch.equal(xa, xb), f"epoch {epoch}: max difference {float((xa - xb).abs().max()):.3g}"
    # The batches really are augmented (not two copies of a plain crop): a new epoch, new crops.
    means = torch.cat([x.mean(dim=(1, 2, 3)) for x, _ in _epoch(classic, 0)])
    assert means.std() > 0 and not torch.equal(_epoch(classic, 0)[0][0], _epoch(classic, 1)[0][0])


def test_eval_batches_are_identical(images, cache):
    cached, classic = _sources(images, cache, train=False)
    a, b = _epoch(cached, 0), _epoch(classic, 0)
    assert [len(y) for _, y in a] == [len(y) for _, y in b] == [4, 4, 4, 3]
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
