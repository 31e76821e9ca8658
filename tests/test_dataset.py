"""The classic input path: XrayDataset and ClassicBatches (shapes, determinism per (seed, epoch), bad files)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from xrai.data.augment import IMAGENET_MEAN, IMAGENET_STD
from xrai.data.dataset import (
    BadImageWarning,
    ClassicBatches,
    XrayDataset,
    find_bad_images,
)
from xrai.data.decode.images import letterbox, read_image

SIZE, RESIZE = 32, 40


@pytest.fixture(scope="module")
def rows(synthetic_manifest):
    return synthetic_manifest[synthetic_manifest["split"] == "train"].reset_index(drop=True).head(24)


def _batches(rows, **options):
    kw = dict(image_size=SIZE, resize_size=RESIZE, batch_size=8, train=True, seed=0, num_workers=0, device="cpu",
              progress=False)
    kw.update(options)
    return ClassicBatches(rows, **kw)


def test_item_is_the_letterboxed_uint8_image(rows):
    ds = XrayDataset(rows, resize_size=RESIZE)
    x, y = ds[3]
    assert x.dtype == torch.uint8 and x.shape == (1, RESIZE, RESIZE)
    assert np.array_equal(x[0].numpy(), letterbox(read_image(rows["path"][3]), RESIZE))  # what the cache stores
    assert y.dtype == torch.float32 and float(y) == float(rows["label"][3])


@pytest.mark.parametrize("train", [True, False])
def test_batch_shape_dtype_and_normalisation(rows, train):
    x, y = next(_batches(rows, train=train).epoch(0))
    assert x.shape == (8, 3, SIZE, SIZE) and x.dtype == torch.float32 and y.dtype == torch.float32
    # grey replicated before normalising: un-normalised channels are equal and within [0, 1]
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    raw = x * std + mean
    assert torch.allclose(raw[:, 0], raw[:, 1], atol=1e-5) and torch.allclose(raw[:, 0], raw[:, 2], atol=1e-5)
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5


def test_epochs_depend_on_seed_and_epoch_only_and_leave_the_global_rng_alone(rows):
    source = _batches(rows, seed=3)
    torch.manual_seed(123)
    a = [x for x, _ in source.epoch(2)]
    before = torch.get_rng_state()
    b = [x for x, _ in source.epoch(2)]
    assert torch.equal(torch.get_rng_state(), before)  # nothing drawn from the global RNG (dropout's)
    torch.manual_seed(999)  # ... and its state does not matter
    c = [x for x, _ in source.epoch(2)]
    assert all(torch.equal(p, q) and torch.equal(p, r) for p, q, r in zip(a, b, c))
    assert not all(torch.equal(p, q) for p, q in zip(a, (x for x, _ in source.epoch(3))))  # a new epoch, new crops
    evaluation = _batches(rows, train=False)
    assert all(torch.equal(p, q) for (p, _), (q, _) in zip(evaluation.epoch(1), evaluation.epoch(7)))


def test_eval_keeps_order_and_last_partial_batch(rows):
    source = _batches(rows.head(19), train=False)
    batches = list(source.epoch(0))
    assert len(source) == len(batches) == 3 and [len(y) for _, y in batches] == [8, 8, 3]
    labels = torch.cat([y for _, y in batches])
    assert labels.tolist() == rows["label"].head(19).astype(float).tolist()


def test_train_shuffles_drops_last_and_caps(rows):
    source = _batches(rows.head(19))
    assert len(source) == 2 and all(len(y) == 8 for _, y in source.epoch(1))
    served = [i for batch in source.sampler for i in batch]
    assert len(set(served)) == 16 and served != sorted(served)  # 16 distinct rows of 19, shuffled
    assert len(list(_batches(rows, max_batches=1).epoch(1))) == 1


def test_channels_last(rows):
    x, _ = next(_batches(rows, channels_last=True).epoch(0))
    assert x.is_contiguous(memory_format=torch.channels_last)


def test_same_batches_for_same_seed_and_epoch_with_workers(rows):
    """Epoch k is the same whenever (and with however many workers) it runs: resume relies on it."""
    with_workers = _batches(rows, num_workers=2)
    first = list(with_workers.epoch(4))
    again = list(with_workers.epoch(4))
    in_process = list(_batches(rows, num_workers=0).epoch(4))
    other_epoch = list(with_workers.epoch(5))
    for (xa, ya), (xb, yb), (xc, yc) in zip(first, again, in_process):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert torch.equal(xa, xc) and torch.equal(ya, yc)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first, other_epoch))


def test_bad_image_is_dropped_before_batching_with_one_warning(rows, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"")
    manifest = rows.head(9).copy()
    manifest.loc[4, "path"] = str(bad)
    with pytest.warns(BadImageWarning, match=r"1 of 9 images could not be decoded.*broken\.png") as seen:
        source = _batches(manifest, train=False)
    assert len(seen) == 1
    assert source.bad["path"].tolist() == [str(bad)] and "broken.png" in source.bad["reason"][0]
    assert source.manifest["path"].tolist() == manifest["path"].drop(index=4).tolist()
    labels = torch.cat([y for _, y in source.epoch(0)])  # no black stand-in: 8 rows, in order
    assert labels.tolist() == manifest["label"].drop(index=4).astype(float).tolist()
    with warnings.catch_warnings():
        warnings.simplefilter("error", BadImageWarning)
        _batches(rows.head(9))  # good files stay silent


def test_find_bad_images_in_workers_matches_in_process(rows, tmp_path):
    (tmp_path / "text.jpg").write_text("not an image")
    paths = [*rows["path"].head(5), str(tmp_path / "text.jpg"), str(tmp_path / "missing.png")]
    in_process = find_bad_images(paths, num_workers=0, progress=False)
    assert in_process["path"].tolist() == paths[5:] and in_process["reason"].str.len().min() > 0
    in_workers = find_bad_images(paths, num_workers=2, progress=False)
    assert in_workers["path"].tolist() == paths[5:] and in_workers["reason"].str.len().min() > 0


def test_no_readable_image_and_small_resize_are_refused(rows, tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    with pytest.raises(ValueError, match="none of the 1 images"):
        _batches(rows.head(1).assign(path=str(tmp_path / "a.png")))
    with pytest.raises(ValueError, match="resize_size"):
        _batches(rows, image_size=64, resize_size=32)
