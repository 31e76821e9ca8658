"""The one atomic-write helper: permissions others can read (respecting the umask), no torn files; the file lock."""

from __future__ import annotations

import os
import stat
import threading
import time
from pathlib import Path

import pytest
import torch

from xrai.fileio import (
    atomic_torch_save,
    atomic_write,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    exclusive_lock,
    try_lock,
)

pytestmark = pytest.mark.skipif(os.name == "nt", reason="POSIX permission bits")


@pytest.fixture()
def umask():
    """Set the process umask for one test (and restore it): umask(0o077) -> files 0600."""
    old = os.umask(0o022)
    os.umask(old)

    def set_mask(mask: int) -> None:
        os.umask(mask)

    yield set_mask
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _write_every_kind(folder: Path) -> list[Path]:
    import pandas as pd

    from xrai.data import save_manifest
    from xrai.models.checkpoint import atomic_save

    manifest = pd.DataFrame({"path": ["a.png"], "label": [1], "body_part": ["wrist"], "patient_id": ["p"],
                             "study_id": ["s"], "split": ["train"], "source": ["folder"]})
    return [
        atomic_write_bytes(folder / "a.bin", b"\x00\x01"),
        atomic_write_text(folder / "b.txt", "text\n"),
        atomic_write_json(folder / "c.json", {"x": 1}),
        atomic_torch_save({"w": torch.zeros(2)}, folder / "d.pt"),
        atomic_save({"epoch": 1}, folder / "checkpoints" / "last.pt"),
        save_manifest(manifest, folder),
        folder / "manifest.json",
    ]


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_files_get_the_mode_the_umask_gives(tmp_path, umask, mask, expected):
    umask(mask)
    for path in _write_every_kind(tmp_path):
        assert _mode(path) == expected, (path.name, oct(_mode(path)))
    assert not [p for p in tmp_path.rglob("*.tmp")]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = atomic_write_text(tmp_path / "report.json", "old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_write(path) as f:
            f.write("half of the new")
            raise RuntimeError("boom")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_text_is_written_as_given(tmp_path):
    path = atomic_write_text(tmp_path / "a.csv", "x,y\n1,2\n")
    assert path.read_bytes() == b"x,y\n1,2\n"  # no newline translation, on any OS
    assert atomic_write_json(tmp_path / "n.json", {"a": [1]}).read_text() == '{\n  "a": [\n    1\n  ]\n}\n'
    with pytest.raises(ValueError):
        atomic_write_json(tmp_path / "nan.json", {"a": float("nan")}, allow_nan=False)
    assert not (tmp_path / "nan.json").exists()


@pytest.mark.slow
def test_every_file_of_a_demo_run_is_readable_by_others(demo_run):
    """The README mounts a run read-only into a container running as another user: every file must be
    readable by 'other' under the usual umask (the demo ran with this process's umask)."""
    mask = os.umask(0)
    os.umask(mask)
    files = [p for p in demo_run.rglob("*") if p.is_file()]
    assert any(p.name == "best.pt" for p in files) and any(p.name == "report_test.json" for p in files)
    wrong = {str(p.relative_to(demo_run)): oct(_mode(p)) for p in files if _mode(p) != 0o666 & ~mask}
    assert not wrong
    if not mask & 0o004:
        assert all(_mode(p) & stat.S_IROTH for p in files)


def test_lock_is_exclusive_and_released_on_exit(tmp_path):
    lock = tmp_path / ".lock-x"
    order: list[str] = []
    waited: list[str] = []

    def second() -> None:
        with exclusive_lock(lock, poll_s=0.02, on_wait=waited.append):
            order.append("second")

    with exclusive_lock(lock) as held:
        assert held
        with open(lock, "a+b") as other:  # another open file: flock treats it as another holder
            assert not try_lock(other)
        thread = threading.Thread(target=second)
        thread.start()
        time.sleep(0.3)
        order.append("first done")
    thread.join(timeout=10)
    assert order == ["first done", "second"]
    assert waited == [str(os.getpid())]  # the waiter was told who holds it
    with open(lock, "a+b") as other:
        assert try_lock(other)  # released


def test_a_waiter_that_arrives_before_the_holder_wrote_its_pid_still_names_it(tmp_path):
    """The holder locks first and writes its pid a moment later; a waiter arriving in between must
    not report the holder as "?" (the CI race of stop 19), and a released lock leaves no stale pid."""
    lock = tmp_path / ".lock-y"
    taken, release = threading.Event(), threading.Event()

    def slow_holder() -> None:  # what a holder between flock and its pid write looks like
        with open(lock, "a+b") as handle:
            assert try_lock(handle)
            taken.set()
            time.sleep(0.4)
            handle.write(b"424242\n")
            handle.flush()
            release.wait(10)

    thread = threading.Thread(target=slow_holder)
    thread.start()
    assert taken.wait(10)
    waited: list[str] = []
    threading.Timer(1.0, release.set).start()
    with exclusive_lock(lock, poll_s=0.02, on_wait=waited.append):
        pass
    thread.join(timeout=10)
    assert waited == ["424242"]
    assert lock.read_bytes() == b""  # released: nobody's pid is left for the next waiter to misreport
