"""Atomic file writes (the one helper every run-folder file goes through) and an inter-process file lock.

``atomic_write(path)`` yields a file in the target's folder; on a clean exit it is flushed, fsynced
and renamed over ``path``, so a reader (or a process killed mid-write, or a Colab disconnect with
the run folder on Google Drive) sees either the old file or the complete new one, never a torn one.
The temporary file is created with mode 0o666 and the process umask applies, as for any ``open()``:
0644 under the usual umask 022, so the container's non-root user can read a run made by another user
(``tempfile.mkstemp`` would give 0600). ``exclusive_lock`` serialises processes on a lock file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from xrai.errors import DiskFullError, disk_full_cause

__all__ = [
    "atomic_torch_save",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_csv",
    "atomic_write_json",
    "atomic_write_text",
    "atomic_write_with",
    "disk_full_message",
    "LockHeldError",
    "exclusive_lock",
    "free_bytes",
    "held_lock",
    "require_free_space",
    "sha256_file",
    "tensor_bytes",
    "try_lock",
]

TMP_PREFIX = "."  # temporary files are hidden: .<name>.<random>.tmp, next to the target
TMP_SUFFIX = ".tmp"


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", *, encoding: str | None = "utf-8",
                 size_hint: int | None = None) -> Iterator[IO]:
    """Open a temporary file next to ``path``; on success it replaces ``path`` atomically.

    Args:
        path: the file to write; its folder is created if missing.
        mode: "w" (text) or "wb" (bytes).
        encoding: for text mode.
        size_hint: about how many bytes the file will take, for the message when the disk is full.
    Yields:
        The open file. On an exception the temporary file is removed and ``path`` is left as it was.
    Raises:
        DiskFullError: no space or quota left (ENOSPC/EDQUOT anywhere in the error's chain, as torch's
            writer wraps it); one line naming the folder, its free space and about what is needed.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{secrets.token_hex(6)}{TMP_SUFFIX}")
    # O_EXCL: never write through a file (or link) that is already there. Mode 0o666: the kernel
    # applies the umask, so the file gets exactly the permissions a plain open() would give it.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with open(fd, mode, encoding=None if "b" in mode else encoding,
                  newline=None if "b" in mode else "") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        written = 0
        with contextlib.suppress(OSError):
            written = tmp.stat().st_size
            os.unlink(tmp)
        if disk_full_cause(error) is not None and not isinstance(error, DiskFullError):
            raise DiskFullError(disk_full_message(path, max(size_hint or 0, written))) from error
        raise
    _fsync_dir(path.parent)


def _size(n: float) -> str:
    """1234567 -> '1.2 MB' (decimal units, as df -H and file managers show them)."""
    if n < 1000:
        return f"{n:.0f} bytes"
    for unit in ("KB", "MB"):
        n /= 1000
        if n < 1000:
            return f"{n:.1f} {unit}"
    return f"{n / 1000:.1f} GB"


def free_bytes(folder: str | os.PathLike) -> int | None:
    """Free bytes on the disk of ``folder`` (its nearest existing parent); None where that cannot be read."""
    folder = Path(folder)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def disk_full_message(path: str | os.PathLike, needed: int | None = None) -> str:
    """'no space left in FOLDER for NAME: 3.1 MB free, about 45.0 MB needed; free some ...' (one line)."""
    path = Path(path)
    free = free_bytes(path.parent)
    room = "" if free is None else f"{_size(free)} free"
    if needed:
        room += (", " if room else "") + f"about {_size(needed)} needed"
    return (f"no space left in {path.parent} for {path.name}" + (f": {room}" if room else "") +
            f"; free some disk space or choose a folder on a larger disk ({path.name} was left as it was)")


def require_free_space(folder: str | os.PathLike, needed: int, what: str) -> None:
    """Raise DiskFullError (nothing written) when ``folder``'s disk has less than ``needed`` bytes free.

    ``what`` says what needs them ("this run's checkpoints"). Where the free space cannot be read, nothing
    is checked (the writes then fail, if they do, with the same one line).
    """
    free = free_bytes(folder)
    if free is not None and free < needed:
        raise DiskFullError(f"not enough space in {folder} for {what}: {_size(free)} free, about {_size(needed)} "
                            "needed; free some disk space or choose a folder on a larger disk (nothing was written)")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path."""
    with atomic_write(path, "wb", size_hint=len(data)) as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8, newlines as given) to ``path`` atomically; returns the path."""
    with atomic_write(path, "w", size_hint=len(text)) as f:
        f.write(text)
    return Path(path)


def atomic_write_json(path: str | os.PathLike, obj: Any, **dumps_kwargs: Any) -> Path:
    """``json.dumps(obj, indent=2, **dumps_kwargs)`` plus a newline, written atomically; returns the path."""
    dumps_kwargs.setdefault("indent", 2)
    return atomic_write_text(path, json.dumps(obj, **dumps_kwargs) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically; returns the path."""
    import torch  # deliberate: the ground floor stays torch-free at import

    with atomic_write(path, "wb", size_hint=tensor_bytes(obj)) as f:
        torch.save(obj, f)
    return Path(path)


def tensor_bytes(obj: Any) -> int:
    """The bytes of the tensors (and numpy arrays) in a nested dict/list/tuple: about its torch.save size."""
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    if hasattr(obj, "element_size") and hasattr(obj, "numel"):
        return int(obj.numel()) * int(obj.element_size())
    return int(getattr(obj, "nbytes", 0) or 0)


def atomic_write_with(path: str | os.PathLike, writer: Callable[[IO], Any], mode: str = "w") -> Path:
    """Call ``writer(file)`` on the temporary file (``DataFrame.to_csv``, ``Figure.savefig``...); atomic."""
    with atomic_write(path, mode) as f:
        writer(f)
    return Path(path)


def atomic_write_csv(path: str | os.PathLike, table: Any) -> Path:
    """``table.to_csv(index=False)`` (a pandas DataFrame; "\\n" line ends on every platform), atomic."""
    return atomic_write_with(path, lambda f: table.to_csv(f, index=False, lineterminator="\n"))


def _fsync_dir(folder: Path) -> None:
    """Persist the rename itself. Some file systems (FUSE mounts like Google Drive, Windows) cannot open
    or fsync a directory; there the rename is as durable as that file system makes it, so we carry on."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # see the docstring: directory fsync is unsupported there, the file itself is already synced
    finally:
        os.close(fd)


# ---- inter-process lock -------------------------------------------------------------------------


def _write_pid(handle: IO) -> None:
    """The lock file's content: the holder's pid (what a refused or waiting process names)."""
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n".encode())
    handle.flush()


def try_lock(handle: IO) -> bool:
    """Take an exclusive lock on the open file without waiting; False when another process holds it.

    The operating system drops the lock when the holder closes the file or dies, so a killed
    process never leaves a stale lock behind (fcntl.flock on POSIX, msvcrt.locking on Windows).

    Raises:
        OSError: the file system cannot lock at all (some network mounts).
    """
    if sys.platform == "win32":
        import msvcrt

        try:
            handle.seek(0)
            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
            return True
        except OSError:  # EACCES / EDEADLOCK: locked by another process
            return False
    import errno
    import fcntl

    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as error:
        if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise


PID_GRACE_S = 5.0  # how long a waiter waits for the holder's pid before naming it "?"


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, *, poll_s: float = 0.2,
                   on_wait: Callable[[str], Any] | None = None) -> Iterator[bool]:
    """Hold an exclusive lock on the file ``path`` (created if missing) for the ``with`` block.

    Waits, polling every ``poll_s`` seconds, while another process holds it; ``on_wait`` is called
    once with the holder's pid (as recorded in the file) when it has to wait.

    Yields:
        True when the lock is held; False when the file system cannot lock (the block then runs
        unlocked, which is what callers did before locks existed).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+b")  # noqa: SIM115 - closed in finally; "a" never truncates the holder's pid
    locked = False
    try:
        try:
            locked = try_lock(handle)
        except OSError:
            yield False
            return
        # The holder writes its pid just after it takes the lock, so a waiter that arrives in between
        # reads an empty file: keep reading while waiting, and name the holder as "?" only when no pid
        # has appeared within PID_GRACE_S (a holder that is that slow to write is still waited for).
        started, told = time.monotonic(), on_wait is None
        while not locked:
            if not told:
                handle.seek(0)
                holder = handle.read(32).decode("ascii", "replace").strip()
                if holder or time.monotonic() - started >= PID_GRACE_S:
                    on_wait(holder or "?")
                    told = True
            time.sleep(poll_s if told else min(poll_s, 0.05))
            locked = try_lock(handle)
        _write_pid(handle)
        yield True
    finally:
        if locked:  # leave no pid behind: a waiter that reads one knows it is the live holder's
            with contextlib.suppress(OSError):
                handle.seek(0)
                handle.truncate()
                handle.flush()
        handle.close()  # releases the lock


class LockHeldError(RuntimeError):
    """Another live process holds the lock; ``holder`` is its pid as it recorded it ("?" if unknown)."""

    def __init__(self, path: Path, holder: str) -> None:
        super().__init__(f"{path} is held by process {holder}")
        self.path, self.holder = path, holder


@contextlib.contextmanager
def held_lock(path: str | os.PathLike) -> Iterator[bool]:
    """Hold an exclusive lock on ``path`` for the ``with`` block without waiting; the file is removed after.

    Unlike ``exclusive_lock`` it does not wait: a lock held by a live process raises LockHeldError at
    once (naming its pid). A lock file left by a killed process holds no lock (the operating system
    dropped it) and is taken over. The file is created (its folder too) and removed on leaving, so a
    folder holds it only while the block runs; a process that locked the file just as it was removed
    notices (the path no longer names its file) and tries again.

    Yields:
        True when held; False when the file system cannot lock (the block then runs unlocked).
    Raises:
        LockHeldError: another process holds it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(10):
        handle = open(path, "a+b")  # noqa: SIM115 - closed below; "a" never truncates the holder's pid
        try:
            locked = try_lock(handle)
        except OSError:
            handle.close()
            yield False
            return
        if not locked:
            handle.seek(0)
            holder = handle.read(32).decode("ascii", "replace").strip() or "?"
            handle.close()
            raise LockHeldError(path, holder)
        try:
            same = os.path.samestat(os.stat(path), os.fstat(handle.fileno()))
        except OSError:  # removed by the holder that just let go
            same = False
        if same:
            break
        handle.close()  # locked a file the last holder had already removed: lock the new one
    else:
        raise LockHeldError(path, "?")
    try:
        _write_pid(handle)
        yield True
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)  # while still locked: a newcomer either saw it locked or makes a new file
        handle.close()


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, streamed in 1 MiB blocks (a 50 MB checkpoint takes about 0.1 s)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
