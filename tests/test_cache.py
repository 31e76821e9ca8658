"""The decode-once cache and its loader: keying, staleness, interrupted builds, bad files, batches."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from _checks import child_env
from PIL import Image

from xrai.data import cache as cache_mod
from xrai.data.augment import GpuAugment
from xrai.data.batches import BadImageWarning
from xrai.data.cache import (
    CacheSpaceError,
    ImageCache,
    build_cache,
    cache_fits,
    find_cache,
)
from xrai.data.decode import images as images_mod
from xrai.data.loader import CachedBatches


@pytest.fixture
def image_set(tmp_path) -> pd.DataFrame:
    """12 small PNG/JPEG files of assorted shapes and modes; label = row number (to trace rows)."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(12):
        h, w = int(rng.integers(20, 70)), int(rng.integers(20, 70))
        pixels = rng.integers(0, 256, (h, w, 3) if i % 3 == 0 else (h, w), dtype=np.uint8)
        path = tmp_path / "img" / f"{i:02d}.{'jpg' if i % 4 == 1 else 'png'}"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(pixels).save(path)
        paths.append(str(path))
    return pd.DataFrame({"path": paths, "label": np.arange(12)})


@pytest.fixture
def decode_count(monkeypatch) -> list[int]:
    calls = [0]
    real = images_mod.read_image

    def counting(path, **kw):
        calls[0] += 1
        return real(path, **kw)

    monkeypatch.setattr(images_mod, "read_image", counting)
    return calls


def _build(manifest, tmp_path, **kw):
    kw.setdefault("size", 32)
    return build_cache(manifest, cache_dir=tmp_path / "cache", workers=1, progress=False, **kw)


def _complete_caches(tmp_path) -> list[Path]:
    return sorted(p for p in (tmp_path / "cache").glob("*px-*") if (p / "meta.json").exists())


def test_build_stores_letterboxed_rows_and_reuses(image_set, tmp_path, decode_count):
    cache = _build(image_set, tmp_path)
    assert cache.built and decode_count[0] == 12 and len(cache.bad) == 0
    array = cache.array
    assert isinstance(array, np.memmap) and array.shape == (12, 32, 32) and array.dtype == np.uint8
    assert not array.flags.writeable  # opened read-only: pages come in on demand
    for path, row in zip(image_set["path"], cache.rows(image_set["path"])):
        np.testing.assert_array_equal(array[row], images_mod.letterbox(images_mod.read_image(path), 32))
    decode_count[0] = 0
    again = _build(image_set.sample(frac=1, random_state=1), tmp_path)  # other order, same files
    assert not again.built and decode_count[0] == 0 and again.path == cache.path
    # a subset of a cached set is served from it, no decoding either
    part = _build(image_set.iloc[:5], tmp_path)
    assert not part.built and decode_count[0] == 0 and part.path == cache.path


def test_changed_file_size_or_decoder_version_rebuilds(image_set, tmp_path, decode_count, monkeypatch):
    first = _build(image_set, tmp_path)
    path = image_set["path"][3]
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched
    touched = _build(image_set, tmp_path)
    assert touched.built and touched.path != first.path and decode_count[0] == 24
    Image.fromarray(np.full((30, 30), 200, np.uint8)).save(path)  # replaced
    replaced = _build(image_set, tmp_path)
    assert replaced.built and replaced.array[replaced.rows([path])[0]].max() == 200
    bigger = _build(image_set, tmp_path, size=40)
    assert bigger.built and bigger.array.shape == (12, 40, 40)
    monkeypatch.setattr(images_mod, "DECODER_VERSION", "test-next")
    decoder = _build(image_set, tmp_path)
    assert decoder.built and decoder.path not in {first.path, touched.path, replaced.path}
    assert len({first.key, touched.key, replaced.key, bigger.key, decoder.key}) == 5


def test_interrupted_build_is_never_read_as_complete(image_set, tmp_path, monkeypatch):
    real = images_mod.read_image
    calls = [0]

    def dies_midway(path, **kw):
        calls[0] += 1
        if calls[0] == 6:
            raise KeyboardInterrupt  # as a user stopping the cell
        return real(path, **kw)

    monkeypatch.setattr(images_mod, "read_image", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        _build(image_set, tmp_path)
    assert _complete_caches(tmp_path) == [] and not list((tmp_path / "cache").glob(".build-*"))
    monkeypatch.setattr(images_mod, "read_image", real)
    cache = _build(image_set, tmp_path)
    assert cache.built and len(_complete_caches(tmp_path)) == 1


def test_killed_build_leaves_nothing_that_reads_as_complete(image_set, tmp_path):
    """SIGKILL a real build mid-way; the next build_cache must build afresh and clear the leftovers."""
    manifest_csv = tmp_path / "manifest.csv"
    image_set.to_csv(manifest_csv, index=False)
    script = textwrap.dedent(f"""
        import time, pandas as pd
        from xrai.data.decode import images
        from xrai.data.cache import build_cache
        real = images.read_image
        def slow(path, **kw):
            time.sleep(0.5)
            return real(path, **kw)
        images.read_image = slow
        build_cache(pd.read_csv({str(manifest_csv)!r}), size=32, cache_dir={str(tmp_path / 'cache')!r},
                    workers=1, progress=False)
    """)
    env = child_env()
    proc = subprocess.Popen([sys.executable, "-c", script], env=env)
    try:
        deadline = time.time() + 60
        while not list((tmp_path / "cache").glob(".build-*/images.npy")):
            assert proc.poll() is None and time.time() < deadline, "the build subprocess never started"
            time.sleep(0.05)
        time.sleep(1.0)  # a couple of images in
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert _complete_caches(tmp_path) == [] and list((tmp_path / "cache").glob(".build-*"))
    cache = _build(image_set, tmp_path)
    assert cache.built and len(_complete_caches(tmp_path)) == 1
    assert not list((tmp_path / "cache").glob(".build-*"))  # the dead builder's folder is gone


def test_bad_files_are_listed_excluded_and_warned(image_set, tmp_path):
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    (bad_dir / "empty.png").write_bytes(b"")
    (bad_dir / "text.jpg").write_text("not an image")
    bad = [str(bad_dir / "empty.png"), str(bad_dir / "text.jpg"), str(bad_dir / "missing.png")]
    manifest = pd.concat([image_set, pd.DataFrame({"path": bad, "label": [100, 101, 102]})], ignore_index=True)
    with pytest.warns(UserWarning, match="3 of 15 images could not be decoded"):
        cache = _build(manifest, tmp_path)
    assert sorted(cache.bad["path"]) == sorted(bad) and (cache.path / "bad.csv").is_file()
    assert pd.read_csv(cache.path / "bad.csv")["reason"].str.len().min() > 0
    assert (cache.rows(bad) == -1).all()
    with pytest.warns(BadImageWarning, match="3 of 15 images could not be decoded and are left out") as seen:
        source = CachedBatches(cache, manifest, image_size=28, batch_size=5, train=False, seed=0, device="cpu")
    assert len(seen) == 1 and all(Path(p).name in str(seen[0].message) for p in bad)  # one warning names them
    labels = torch.cat([y for _, y in source.epoch(0)])
    assert labels.tolist() == list(range(12)) and len(source.manifest) == 12
    assert sorted(source.bad["path"]) == sorted(bad) and source.bad["reason"].str.len().min() > 0


def test_parallel_build_matches_in_process(image_set, tmp_path):
    one = _build(image_set, tmp_path)
    many = build_cache(image_set, size=32, cache_dir=tmp_path / "other", workers=2, progress=False)
    np.testing.assert_array_equal(np.asarray(one.array), np.asarray(many.array))


def test_disk_space_is_checked(image_set, tmp_path, monkeypatch):
    assert cache_fits(10, 64, tmp_path)
    assert not cache_fits(10**12, 256, tmp_path)
    monkeypatch.setattr(cache_mod, "_free_bytes", lambda path: 0)
    with pytest.raises(CacheSpaceError, match="GiB"):
        _build(image_set, tmp_path)


def test_find_cache_sees_what_build_would_reuse(image_set, tmp_path):
    assert find_cache(image_set, size=32, cache_dir=tmp_path / "cache") is None  # nothing built yet
    cache = _build(image_set, tmp_path)
    assert find_cache(image_set.iloc[3:7], size=32, cache_dir=tmp_path / "cache").path == cache.path  # a subset
    assert find_cache(image_set, size=48, cache_dir=tmp_path / "cache") is None  # another size
    Path(image_set["path"].iloc[0]).touch()  # a changed file makes it stale
    os.utime(image_set["path"].iloc[0], ns=(1, 1))
    assert find_cache(image_set, size=32, cache_dir=tmp_path / "cache") is None


def test_fit_caches_the_whole_manifest_and_reuses_a_cache_when_the_disk_is_full(image_set, tmp_path, monkeypatch):
    from xrai.config import TrainConfig
    from xrai.train.trainer import make_sources

    monkeypatch.setenv("XRAI_HOME", str(tmp_path / "home"))
    manifest = image_set.assign(label=np.arange(12) % 2, split=["train"] * 6 + ["valid"] * 3 + ["test"] * 3)
    train, valid = manifest[manifest.split == "train"], manifest[manifest.split == "valid"]
    config = TrainConfig(data="synthetic", img_size=32, batch_size=4, pretrained=False)

    def sources():
        return make_sources(config, train, valid, manifest=manifest, device=torch.device("cpu"), progress=False)

    monkeypatch.setattr(cache_mod, "_free_bytes", lambda path: 0)  # a full disk and no cache: classic
    assert sources()[2] == "classic"
    monkeypatch.undo()
    monkeypatch.setenv("XRAI_HOME", str(tmp_path / "home"))
    train_src, valid_src, path = sources()
    assert path == "cached" and len(train_src.cache) == 12  # test rows too, so evaluation and reruns reuse it
    monkeypatch.setattr(cache_mod, "_free_bytes", lambda path: 0)  # full disk now, but the cache exists
    train_src, _, path = sources()
    assert path == "cached" and not train_src.cache.built


def test_open_refuses_an_incomplete_folder(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(FileNotFoundError, match="not a complete"):
        ImageCache.open(tmp_path / "x")


# ---- CachedBatches ----------------------------------------------------------------------------


def _source(cache, manifest, **kw):
    kw = {"image_size": 28, "batch_size": 5, "train": True, "seed": 3, "device": "cpu", **kw}
    return CachedBatches(cache, manifest, **kw)


def _epoch(source, epoch):
    return [(x.clone(), y.clone()) for x, y in source.epoch(epoch)]


def test_training_epochs_replay_exactly_from_seed_and_epoch(image_set, tmp_path):
    cache = _build(image_set, tmp_path)
    a, b = _source(cache, image_set), _source(cache, image_set)
    assert len(a) == 2  # 12 // 5: the last partial batch is dropped in training
    first, again = _epoch(a, 1), _epoch(b, 1)  # a fresh source, as after a resume
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(first, again))
    assert first[0][0].shape == (5, 3, 28, 28) and first[0][1].dtype == torch.float32
    labels = torch.cat([y for _, y in first])
    assert len(set(labels.tolist())) == 10  # each image at most once per epoch
    other = _epoch(a, 2)
    assert not torch.equal(torch.cat([y for _, y in other]), labels) or not torch.equal(other[0][0], first[0][0])
    assert len(_source(cache, image_set, max_batches=1)) == 1
    assert len(_source(cache, image_set.iloc[:3])) == 1  # fewer images than a batch: one partial batch


def test_reused_buffers_give_the_same_batches(image_set, tmp_path, monkeypatch):
    cache = _build(image_set, tmp_path)
    plain = {train: _epoch(_source(cache, image_set, train=train), 0) for train in (True, False)}
    monkeypatch.setattr(CachedBatches, "reuse_buffers", True)  # the ring of (pinned on CUDA) buffers
    monkeypatch.setattr(CachedBatches, "prefetch", 1)
    for train in (True, False):
        ring = _epoch(_source(cache, image_set, train=train), 0)
        assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(plain[train], ring))


def test_eval_keeps_manifest_order_and_the_last_batch(image_set, tmp_path):
    cache = _build(image_set, tmp_path)
    manifest = image_set.iloc[::-1].reset_index(drop=True)  # not the cache's row order
    source = _source(cache, manifest, train=False, channels_last=True)
    batches = list(source.epoch(0))
    assert len(source) == 3 and [len(y) for _, y in batches] == [5, 5, 2]
    assert torch.cat([y for _, y in batches]).tolist() == manifest["label"].tolist()
    assert batches[0][0].is_contiguous(memory_format=torch.channels_last)
    rows = torch.from_numpy(np.asarray(cache.array[cache.rows(manifest["path"])])).unsqueeze(1)
    expected = GpuAugment(28, train=False)(rows)
    assert torch.allclose(torch.cat([x for x, _ in batches]), expected)


def test_host_batches_and_early_stop(image_set, tmp_path):
    cache = _build(image_set, tmp_path)
    source = _source(cache, image_set, train=False)
    x, y = next(iter(source.host_batches(0)))
    assert x.dtype == torch.uint8 and x.shape == (5, 1, 32, 32) and y.tolist() == [0, 1, 2, 3, 4]
    for _ in source.epoch(0):
        break  # leaving early must stop the prefetch thread
    deadline = time.monotonic() + 10  # the thread notices within a batch; a loaded CI machine may be slow
    while [t for t in threading.enumerate() if t.name == "xrai-cache-prefetch"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [t for t in threading.enumerate() if t.name == "xrai-cache-prefetch"]
