"""The classic input path: XrayDataset and ClassicBatches (shapes, determinism per (seed, epoch), bad files)."""

from __future__ import annotations

import warnings

import pytest
import torch

from xrai.data.dataset import IMAGENET_MEAN, IMAGENET_STD, BadImageWarning, ClassicBatches, XrayDataset

SIZE, RESIZE = 32, 40


@pytest.fixture(scope="module")
def rows(synthetic_manifest):
    return synthetic_manifest[synthetic_manifest["split"] == "train"].reset_index(drop=True).head(24)


def _batches(rows, **options):
    kw = dict(image_size=SIZE, resize_size=RESIZE, batch_size=8, train=True, seed=0, num_workers=0, device="cpu")
    kw.update(options)
    return ClassicBatches(rows, **kw)


@pytest.mark.parametrize("train", [True, False])
def test_item_shape_dtype_and_normalisation(rows, train):
    ds = XrayDataset(rows, image_size=SIZE, resize_size=RESIZE, train=train)
    x, y = ds[0]
    assert x.shape == (3, SIZE, SIZE) and x.dtype == torch.float32
    assert y.dtype == torch.float32 and float(y) == float(rows["label"][0])
    # grey replicated before normalising: un-normalised channels are equal and within [0, 1]
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    raw = x * std + mean
    assert torch.allclose(raw[0], raw[1], atol=1e-5) and torch.allclose(raw[0], raw[2], atol=1e-5)
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5


def test_augmentation_depends_on_seed_epoch_index_only(rows):
    ds = XrayDataset(rows, image_size=SIZE, resize_size=RESIZE, train=True, seed=3)
    torch.manual_seed(123)
    a = ds[(2, 5)][0]
    before = torch.get_rng_state()
    torch.manual_seed(999)  # global state must not matter ...
    b = ds[(2, 5)][0]
    assert torch.equal(a, b)
    torch.set_rng_state(before)
    ds[(2, 5)]
    assert torch.equal(torch.get_rng_state(), before)  # ... nor be consumed
    assert not all(torch.equal(a, ds[(e, 5)][0]) for e in (3, 4, 5))  # a new epoch, new crops
    eval_ds = XrayDataset(rows, image_size=SIZE, resize_size=RESIZE, train=False)
    assert torch.equal(eval_ds[(1, 5)][0], eval_ds[(7, 5)][0])


def test_eval_keeps_order_and_last_partial_batch(rows):
    source = _batches(rows.head(19), train=False)
    batches = list(source.epoch(0))
    assert len(source) == len(batches) == 3 and [len(y) for _, y in batches] == [8, 8, 3]
    labels = torch.cat([y for _, y in batches])
    assert labels.tolist() == rows["label"].head(19).astype(float).tolist()


def test_train_shuffles_drops_last_and_caps(rows):
    source = _batches(rows.head(19))
    assert len(source) == 2 and all(len(y) == 8 for _, y in source.epoch(1))
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


def test_bad_image_becomes_black_with_a_warning(rows, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"")
    manifest = rows.head(2).copy()
    manifest.loc[1, "path"] = str(bad)
    ds = XrayDataset(manifest, image_size=SIZE, resize_size=RESIZE, train=False)
    with pytest.warns(BadImageWarning, match="broken.png"):
        x, y = ds[1]
    black = (-torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD)).view(3, 1, 1).expand(3, SIZE, SIZE)
    assert torch.allclose(x, black) and float(y) == float(manifest["label"][1])
    with warnings.catch_warnings():
        warnings.simplefilter("error", BadImageWarning)
        ds[0]  # good files stay silent


def test_resize_smaller_than_crop_is_refused(rows):
    with pytest.raises(ValueError, match="resize_size"):
        XrayDataset(rows, image_size=64, resize_size=32, train=False)
