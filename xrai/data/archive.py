"""The run folder's copy of the images 04 and 05 need: ``RUN_DIR/split_images.zip``.

Colab gives every notebook a fresh runtime, and MURA is 3.3 GB: notebooks 04 (valid and test) and 05
(test) would download all of it again to score a few thousand images. So when the manifest is saved on
Colab (``save_manifest(..., keep_split_images=True)``, the default there; notebook 01's call), the
original files of the valid and test images go, byte for byte and under their manifest-relative paths,
into ONE uncompressed zip in the run folder: Drive is slow with many small files, and PNG and JPEG are
compressed already. ``read_manifest(run_dir, splits=...)`` extracts it once into a folder on this
machine's own disk (``xrai_home()/split_images/<digest>/``, never Drive) when the images are nowhere on
this machine, before anything would be downloaded (see xrai.data.locate).

The zip's last member is an index (its splits and each file's size). Reading checks the zip's members
and their sizes against it, extraction checks each member's CRC into a temporary folder renamed into
place when complete, and a zip that fails a check is ignored with one logged line: the images are then
found as without it, never half from it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import secrets
import shutil
import zipfile
from collections.abc import Iterable
from pathlib import Path

from xrai.env import xrai_home
from xrai.fileio import atomic_write, free_bytes

__all__ = ["ARCHIVE_SPLITS", "INDEX_MEMBER", "extract_root", "leads_outside", "open_split_images",
           "write_split_images"]

logger = logging.getLogger(__name__)

ARCHIVE_SPLITS = ("valid", "test")  # what 04 (valid, then test) and 05 (test) score
INDEX_MEMBER = ".xrai-split-images.json"  # the zip's last member: {"version", "splits", "files": {path: bytes}}
_VERSION = 1
_COMPLETE = ".complete"  # written last into an extracted folder, before it is renamed into place
_CHUNK = 1 << 20


def leads_outside(path: str) -> bool:
    """Whether a manifest's relative path leads out of the dataset folder: absolute (``/x``, ``C:x``,
    ``\\server``) or climbing above it (``../x``, ``a/../../x``)."""
    path = path.replace("\\", "/")
    if path.startswith("/") or (len(path) > 1 and path[1] == ":"):
        return True
    normal = posixpath.normpath(path)
    return normal == ".." or normal.startswith("../")


def extract_root() -> Path:
    """Where archives are extracted: ``xrai_home()/split_images`` (this machine's disk; in Colab, the runtime's)."""
    return xrai_home() / "split_images"


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def write_split_images(zip_path: str | os.PathLike, files: Iterable[tuple[str, str]],
                       splits: Iterable[str] = ARCHIVE_SPLITS) -> Path | None:
    """Write ``zip_path`` (uncompressed, atomic) holding ``files``: (manifest-relative path, file here).

    Kept as it is when it already holds exactly these paths with these sizes (a re-run of 01 writes
    nothing to Drive). Never raises for a missing image or a full disk: it logs one line and returns None
    (04 and 05 then find the images as without it).
    """
    zip_path = Path(zip_path)
    files = dict(files)
    missing = [f for f in files.values() if not os.path.isfile(f)]
    if missing:
        logger.warning("%s not written: %d of the %d images to keep are not on this machine (first: %s)",
                       zip_path, len(missing), len(files), missing[0])
        return None
    index = {"version": _VERSION, "splits": list(splits), "files": {p: os.path.getsize(f) for p, f in files.items()}}
    total = sum(index["files"].values())
    if _read_index(zip_path) == index:
        logger.info("%s kept: it holds these %d images already (%s)", zip_path, len(files), _mb(total))
        return zip_path
    try:
        with atomic_write(zip_path, "wb", size_hint=total) as f, \
                zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True, strict_timestamps=False) as zf:
            for path, file in files.items():
                zf.write(file, arcname=path)
            zf.writestr(INDEX_MEMBER, json.dumps(index, sort_keys=True))
    except OSError as error:
        logger.warning("%s not written (%s); 04 and 05 will find the images as without it", zip_path, error)
        return None
    logger.info("%s: the %s images (%d files, %s), for 04 and 05 in a fresh runtime", zip_path,
                "+".join(index["splits"]), len(files), _mb(total))
    return zip_path


def _read_index(zip_path: Path) -> dict | None:
    """The index of a readable archive whose members and sizes agree with it; None otherwise (no reason)."""
    try:
        with zipfile.ZipFile(zip_path) as zf:
            index, _ = _checked_index(zf)
    except (OSError, zipfile.BadZipFile):
        return None
    return index


def _checked_index(zf: zipfile.ZipFile) -> tuple[dict | None, str]:
    """(the index, "") when the zip's members and their sizes are the index's; (None, why) otherwise."""
    try:
        index = json.loads(zf.read(INDEX_MEMBER))
        files = index["files"]
        if index.get("version") != _VERSION or not isinstance(files, dict):
            return None, f"an index of another version ({index.get('version')!r})"
    except KeyError:
        return None, f"no {INDEX_MEMBER} in it (not written by xrai, or cut short)"
    except (ValueError, TypeError, zipfile.BadZipFile) as error:
        return None, f"its index is unreadable ({error})"
    members = {i.filename: i.file_size for i in zf.infolist() if i.filename != INDEX_MEMBER}
    if members != files:
        differ = sorted(set(members.items()) ^ set(files.items()))
        return None, f"{len(differ)} member(s) differ from its index in name or size (first: {differ[0][0]})"
    outside = [p for p in files if leads_outside(p)]
    if outside:
        return None, f"member {outside[0]!r} leads outside the dataset folder"
    return index, ""


def open_split_images(zip_path: str | os.PathLike, needed: Iterable[str]) -> tuple[Path, str] | None:
    """The folder (on this machine's disk) holding the archive's images, extracted now or earlier, and a
    line saying where they came from ("valid+test images from runs-fracatlas/split_images.zip, 12.3 MB, no
    download"); None when there is no archive, or it is damaged or lacks a ``needed`` path (one line logged).

    Args:
        zip_path: the run folder's split_images.zip.
        needed: the manifest-relative paths the caller needs.
    """
    zip_path = Path(zip_path)
    if not zip_path.is_file():
        return None
    try:
        with zipfile.ZipFile(zip_path) as zf:
            index, why = _checked_index(zf)
            if index is None:
                return _ignored(zip_path, why)
            lacking = set(needed) - set(index["files"])
            if lacking:
                return _ignored(zip_path, f"it lacks {len(lacking)} of the images asked for (first: {min(lacking)})")
            digest = hashlib.sha256(b"".join(f"{i.filename}\0{i.file_size}\0{i.CRC}\n".encode()
                                             for i in zf.infolist())).hexdigest()[:20]
            folder = extract_root() / digest
            if not (folder / _COMPLETE).is_file():
                _extract(zf, index["files"], folder)
    except (OSError, zipfile.BadZipFile, EOFError) as error:
        return _ignored(zip_path, f"{type(error).__name__}: {error}")
    size = zip_path.stat().st_size
    return folder, f"{'+'.join(index['splits'])} images from {zip_path.parent.name}/{zip_path.name}, {_mb(size)}, no download"


def _ignored(zip_path: Path, why: str) -> None:
    logger.warning("%s ignored: %s; the images are looked for as without it", zip_path, why)


def _extract(zf: zipfile.ZipFile, files: dict[str, int], folder: Path) -> None:
    """Every member into a temporary folder beside ``folder`` (each CRC and size checked), renamed into place."""
    needed = sum(files.values())
    free = free_bytes(folder.parent)
    if free is not None and free < needed:
        raise OSError(f"{_mb(free)} free in {folder.parent}, {_mb(needed)} needed to extract it")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        for name, size in files.items():
            target = tmp / name
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(name) as source, open(target, "wb") as out:
                shutil.copyfileobj(source, out, _CHUNK)  # zipfile raises BadZipFile on a CRC mismatch at the end
            if target.stat().st_size != size:
                raise zipfile.BadZipFile(f"{name}: {target.stat().st_size} bytes extracted, {size} in its index")
        (tmp / _COMPLETE).write_text(json.dumps({"files": len(files), "bytes": needed}) + "\n", encoding="utf-8")
        if folder.exists() and not (folder / _COMPLETE).is_file():
            shutil.rmtree(folder)  # not ours to keep: only complete folders are ever renamed into place
        try:
            os.replace(tmp, folder)
        except OSError:
            if not (folder / _COMPLETE).is_file():  # another process finished first: use theirs
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
