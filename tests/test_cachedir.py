"""One builder per cache (two real processes), last-use records, and `python -m xrai cache [--prune]`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from _checks import child_env
from PIL import Image

from xrai.cli.commands import main
from xrai.data.cache import LAST_USED, build_cache
from xrai.data.cachedir import list_caches, prune_caches

BUILDER = textwrap.dedent("""
    import json, os, sys, time
    from pathlib import Path
    from xrai.data.cache import build_cache
    paths, cache_dir, go = json.loads(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    (go.parent / f"ready-{os.getpid()}").touch()  # imported: the parent opens the barrier once both are
    while not go.exists():  # a barrier: both processes ask for the cache at the same moment
        time.sleep(0.005)
    cache = build_cache(paths, size=32, cache_dir=cache_dir, workers=1, progress=False)
    print(json.dumps({"built": cache.built, "path": str(cache.path), "n": len(cache)}))
""")


def _slow_image_set(folder: Path, n: int) -> list[str]:
    """n paths (links to one 1600 x 1600 noise PNG, each decoded on its own): a build of ~1-3 s."""
    folder.mkdir(parents=True)
    big = folder / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (1600, 1600), dtype=np.uint8)).save(big,
                                                                                               compress_level=1)
    paths = []
    for i in range(n):
        link = folder / f"img{i:03d}.png"
        os.symlink(big, link)
        paths.append(str(link))
    return paths


@pytest.mark.skipif(not hasattr(os, "symlink") or sys.platform == "win32", reason="needs symlinks")
def test_two_processes_one_build(tmp_path):
    paths = _slow_image_set(tmp_path / "img", 60)
    cache_dir, go = tmp_path / "cache", tmp_path / "go"
    env = child_env()
    procs = [subprocess.Popen([sys.executable, "-c", BUILDER, json.dumps(paths), str(cache_dir), str(go)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    deadline = time.monotonic() + 240  # both imported (torch, under CI load) and spinning on the barrier:
    while len(list(tmp_path.glob("ready-*"))) < 2 and time.monotonic() < deadline:  # a late one could
        time.sleep(0.05)  # otherwise find the cache already built and never wait
    go.touch()
    outputs = [proc.communicate(timeout=300) for proc in procs]
    for proc, (_out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert sorted(r["built"] for r in results) == [False, True]  # one decoded, the other reused it
    assert results[0]["path"] == results[1]["path"] and results[0]["n"] == 60
    builder = next(p for p, r in zip(procs, results) if r["built"])
    waiter_err = next(err for (_, err), r in zip(outputs, results) if not r["built"])
    assert f"waiting for process {builder.pid}" in waiter_err
    assert len(list(cache_dir.glob("32px-*"))) == 1 and not list(cache_dir.glob(".build-*"))


def _image_paths(folder: Path, n: int, seed: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = folder / f"{seed}_{i}.png"
        Image.fromarray(rng.integers(0, 256, (40, 30), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def _age(cache_path: Path, days: float) -> None:
    then = time.time() - days * 86400
    os.utime(cache_path / LAST_USED, (then, then))


def test_opening_records_the_last_use(tmp_path):
    paths = _image_paths(tmp_path / "a", 3, 0)
    cache = build_cache(paths, size=16, cache_dir=tmp_path / "c", workers=1, progress=False)
    _age(cache.path, 10)
    again = build_cache(paths, size=16, cache_dir=tmp_path / "c", workers=1, progress=False)
    assert not again.built and time.time() - (cache.path / LAST_USED).stat().st_mtime < 60


def test_list_and_prune_by_age_and_size(tmp_path):
    root = tmp_path / "caches"
    old = build_cache(_image_paths(tmp_path / "old", 4, 1), size=16, cache_dir=root, workers=1, progress=False)
    mid = build_cache(_image_paths(tmp_path / "mid", 4, 2), size=16, cache_dir=root, workers=1, progress=False)
    new = build_cache(_image_paths(tmp_path / "new", 4, 3), size=16, cache_dir=root, workers=1, progress=False)
    _age(old.path, 40)
    _age(mid.path, 5)
    stale = root / "16px-0123456789abcdef0123"  # an older xrai's cache: never reused, always pruned
    stale.mkdir()
    (stale / "meta.json").write_text(json.dumps({"format": 0, "key": "x", "size": 16, "n": 1}))

    listed = list_caches(root)
    assert [c.path for c in listed if c.current] == [new.path, mid.path, old.path]  # most recently used first
    assert {c.images for c in listed if c.current} == {4} and not next(c for c in listed if c.path == stale).current
    assert all(c.bytes >= 4 * 16 * 16 for c in listed if c.current)

    assert {c.path for c in prune_caches(root, dry_run=True)} == {old.path, stale}
    assert old.path.exists()  # dry run
    assert {c.path for c in prune_caches(root)} == {old.path, stale}
    assert not old.path.exists() and not stale.exists() and mid.path.exists()
    # A cap below both: the least recently used goes first, until the rest fits.
    cap_gb = next(c.bytes for c in list_caches(root) if c.path == new.path) * 1.2 / 1e9  # room for one
    assert [c.path for c in prune_caches(root, older_than_days=None, max_gb=cap_gb)] == [mid.path]
    assert new.path.exists()


def test_prune_skips_a_cache_being_built(tmp_path):
    from xrai.data.cache import build_lock_path
    from xrai.fileio import exclusive_lock

    root = tmp_path / "caches"
    cache = build_cache(_image_paths(tmp_path / "a", 2, 4), size=16, cache_dir=root, workers=1, progress=False)
    _age(cache.path, 400)
    with exclusive_lock(build_lock_path(root, cache.path.name)):  # another process is (re)building it
        assert prune_caches(root) == []
    assert [c.path for c in prune_caches(root)] == [cache.path]


def test_cache_command_lists_and_prunes(tmp_path, capsys):
    root = tmp_path / "caches"
    cache = build_cache(_image_paths(tmp_path / "a", 3, 5), size=16, cache_dir=root, workers=1, progress=False)
    assert main(["cache", "--dir", str(root)]) == 0
    out = capsys.readouterr().out
    assert f"{root}: 1 cache(s)" in out and cache.path.name in out and "3 images at 16 px" in out
    _age(cache.path, 12)
    assert main(["cache", "--dir", str(root), "--prune", "--older-than", "30"]) == 0
    assert "removed 0 cache(s)" in capsys.readouterr().out and cache.path.exists()
    assert main(["cache", "--dir", str(root), "--prune", "--older-than", "7"]) == 0
    assert "removed 1 cache(s)" in capsys.readouterr().out and not cache.path.exists()
    assert main(["cache", "--dir", str(root), "--max-gb", "1"]) == 2  # without --prune: one line
    assert "go with --prune" in capsys.readouterr().err
