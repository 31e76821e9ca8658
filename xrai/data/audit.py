"""Leakage audit: exact and near-duplicate images, and the groups that cross splits or labels.

Exact duplicates share decoded pixels (a hash of read_image's array, so a PNG and a JPEG re-save of
the same picture differ, as they should). Near duplicates share a 64-bit perceptual hash (pHash: the
sign of the low 8x8 DCT coefficients of a 32x32 thumbnail against their median) within a small
Hamming distance; pHash survives re-encoding, small brightness changes and rescaling, which is what
the duplicated copies in the public Kaggle sets go through. On X-rays pHash alone is too loose (a
dark frame and one bright limb make many different studies hash alike: on the real FracAtlas subset,
distance <= 4 paired a hand with a foot), so every pHash candidate pair is confirmed by the Pearson
correlation of the two 32x32 thumbnails (>= 0.99: re-saves, crops and marker edits score 0.99-1.0,
different studies of the same view 0.97 and below). Written here rather than taken from the
`imagehash` package: it is 20 lines of numpy, and the package would add scipy and PyWavelets to a
Colab install for one function.

Near pairs are found without comparing all n^2 pairs: the 64 bits are cut into near_distance + 1
bands, and two hashes within near_distance bits agree exactly on at least one band (pigeonhole), so
only hashes that share a band value are compared.
"""

from __future__ import annotations

import hashlib
import warnings
from concurrent.futures import ProcessPoolExecutor
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from xrai.data.decode.images import ImageError, read_image
from xrai.env import cpu_count
from xrai.errors import outside_package_stacklevel

if TYPE_CHECKING:
    import pandas as pd

AUDIT_COLUMNS = ["group", "path", "label", "split", "kind", "crosses"]
NEAR_DISTANCE = 4  # pHash bits that may differ for a candidate pair (the contract's default)
MIN_CORRELATION = 0.99  # thumbnail correlation that confirms a candidate


def _dct_matrix(n: int = 32) -> np.ndarray:
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2 / n)
    m[0] /= np.sqrt(2)
    return m


_DCT = _dct_matrix(32)


def phash(image: np.ndarray, *, thumb: np.ndarray | None = None) -> np.uint64:
    """64-bit perceptual hash of a uint8 grey image."""
    thumb = _thumbnail(image) if thumb is None else thumb
    low = (_DCT @ thumb @ _DCT.T)[:8, :8].ravel()
    bits = low > np.median(low[1:])  # the DC term is left out of the median: it only says how bright
    return np.packbits(bits).view(">u8")[0].astype(np.uint64)


def _thumbnail(image: np.ndarray) -> np.ndarray:
    thumb = np.asarray(Image.fromarray(image).resize((32, 32), Image.Resampling.BOX), dtype=np.float64)
    return thumb


def _standardise(thumb: np.ndarray) -> np.ndarray:
    flat = thumb.ravel()
    return ((flat - flat.mean()) / (flat.std() + 1e-6) / np.sqrt(flat.size)).astype(np.float32)


def _hash_one(path: str) -> tuple[str, int, np.ndarray | None, str]:
    """(exact pixel digest, phash, standardised thumbnail, error) for one file; never raises on a bad image."""
    # The whole image is decoded (no JPEG draft mode): "exact" means the same decoded pixels, which a
    # reduced decode cannot tell. Decoding is the floor cost: about 0.5 s per 1,000 FracAtlas JPEGs and
    # 1.4 s per 1,000 512 px PNGs with 2 workers on this 2-core machine.
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # truncated files are reported by the loaders, not here
            image = read_image(path)
    except (ImageError, OSError) as e:
        return "", 0, None, str(e)
    digest = hashlib.blake2b(image.tobytes(), digest_size=16)
    digest.update(str(image.shape).encode())
    thumb = _thumbnail(image)
    return digest.hexdigest(), int(phash(image, thumb=thumb)), _standardise(thumb), ""


def image_hashes(paths: list[str], *, workers: int | None = None, progress: bool = True) -> pd.DataFrame:
    """Exact digest, pHash and thumbnail per path (columns path, digest, phash, thumb, error), in parallel."""
    import pandas as pd  # here, not at import: xrai.data (the decoder) imports this module
    from tqdm.auto import tqdm  # not at import either: the ONNX server imports xrai.data and has no tqdm

    workers = workers or cpu_count()
    chunk = max(1, min(64, len(paths) // (workers * 8) or 1))
    if workers > 1 and len(paths) > 64:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = list(tqdm(pool.map(_hash_one, paths, chunksize=chunk), total=len(paths),
                                desc="hashing images", unit="img", disable=not progress))
    else:
        results = [_hash_one(p) for p in tqdm(paths, desc="hashing images", unit="img", disable=not progress)]
    frame = pd.DataFrame(results, columns=["digest", "phash", "thumb", "error"])
    frame.insert(0, "path", list(paths))
    frame["phash"] = frame["phash"].astype(np.uint64)
    return frame


def _popcount(x: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x)
    x = x.astype(np.uint64)
    table = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)
    return sum(table[(x >> np.uint64(8 * k)) & np.uint64(255)] for k in range(8))


def near_pairs(hashes: np.ndarray, near_distance: int, *, chunk: int = 4_000_000) -> np.ndarray:
    """Index pairs (i < j) whose 64-bit hashes differ in at most near_distance bits; shape (P, 2).

    Multi-index hashing: within each of the near_distance + 1 bands, rows are sorted by the band's
    value and each row is compared with the next 1, 2, 3, ... rows for as long as any of them still
    shares its band value, all in numpy (work grows with the candidate pairs, not with n^2, and with
    no Python loop over buckets). ``chunk`` bounds the candidates held at once.
    """
    hashes = np.asarray(hashes, dtype=np.uint64)
    n = len(hashes)
    if n < 2 or near_distance < 0:
        return np.empty((0, 2), dtype=np.int64)
    edges = np.linspace(0, 64, min(near_distance + 1, 64) + 1).astype(int)
    found: list[np.ndarray] = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        mask = np.uint64((1 << (hi - lo)) - 1)
        band = (hashes >> np.uint64(lo)) & mask
        order = np.argsort(band, kind="stable")
        sorted_band = band[order]
        active = np.arange(n - 1)  # positions whose run of equal band values may reach further
        offset = 1
        while active.size:
            active = active[active + offset < n]
            active = active[sorted_band[active] == sorted_band[active + offset]]
            for part in np.array_split(active, max(1, active.size // chunk + 1)):
                i, j = order[part], order[part + offset]
                close = _popcount(hashes[i] ^ hashes[j]) <= near_distance
                if close.any():
                    found.append(np.stack([np.minimum(i, j)[close], np.maximum(i, j)[close]], axis=1))
            offset += 1
    if not found:
        return np.empty((0, 2), dtype=np.int64)
    pairs = np.concatenate(found).astype(np.int64)
    keys = np.unique(pairs[:, 0] * n + pairs[:, 1])  # the same pair found in several bands counts once
    return np.stack([keys // n, keys % n], axis=1)


def _components(n: int, pairs: np.ndarray) -> np.ndarray:
    """Connected component per node (union-find over the pairs), via scipy's sparse graph routine."""
    # scipy here, not at import: xrai.data (the decoder) imports this module, and the ONNX server has no scipy
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    graph = coo_matrix((np.ones(len(pairs), dtype=np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def _grouping(hashes: pd.DataFrame, near_distance: int, min_correlation: float) -> np.ndarray:
    """Component id per row (-1 for rows that did not decode)."""
    ok = hashes["error"] == ""
    idx = np.flatnonzero(ok.to_numpy())
    digests = hashes["digest"].to_numpy()[idx]
    candidates = near_pairs(hashes["phash"].to_numpy()[idx], near_distance)
    if len(candidates):
        thumbs = np.stack(hashes["thumb"].to_numpy()[idx])
        corr = np.einsum("ij,ij->i", thumbs[candidates[:, 0]], thumbs[candidates[:, 1]])
        candidates = candidates[corr >= min_correlation]
    pairs = [candidates]
    _, inverse = np.unique(digests, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    same = inverse[order][1:] == inverse[order][:-1]
    pairs.append(np.stack([order[:-1][same], order[1:][same]], axis=1))
    comp_local = _components(len(idx), np.concatenate(pairs))
    comp = np.full(len(hashes), -1)
    comp[idx] = comp_local
    return comp


def _report_bad(hashes: pd.DataFrame) -> None:
    bad = hashes[hashes["error"] != ""]
    if len(bad):
        listed = "; ".join(f"{p}: {e}" for p, e in zip(bad["path"].head(10), bad["error"].head(10)))
        more = f" (and {len(bad) - 10} more)" if len(bad) > 10 else ""
        warnings.warn(f"audit skipped {len(bad)} unreadable image(s): {listed}{more}", UserWarning, stacklevel=outside_package_stacklevel())


def duplicate_groups(manifest: pd.DataFrame, *, near_distance: int = NEAR_DISTANCE,
                     min_correlation: float = MIN_CORRELATION, workers: int | None = None,
                     progress: bool = True, hashes: pd.DataFrame | None = None) -> pd.Series:
    """A group id per manifest row ("dup<N>" shared by duplicates, the row's own id otherwise)."""
    import pandas as pd  # here, not at import: xrai.data (the decoder) imports this module

    hashes = image_hashes(manifest["path"].astype(str).tolist(), workers=workers, progress=progress) \
        if hashes is None else hashes
    _report_bad(hashes)
    comp = _grouping(hashes, near_distance, min_correlation)
    sizes = pd.Series(comp).map(pd.Series(comp).value_counts())
    ids = [f"dup{c}" if c >= 0 and s > 1 else f"img{i}" for i, (c, s) in enumerate(zip(comp, sizes))]
    return pd.Series(ids, index=manifest.index, name="duplicate_group")


def audit(manifest: pd.DataFrame, *, near_distance: int = NEAR_DISTANCE, min_correlation: float = MIN_CORRELATION,
          workers: int | None = None, progress: bool = True, hashes: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per image that has a duplicate: group, path, label, split, kind, crosses (docs/design.md).

    ``kind`` is "exact" when every image of the group has the same pixels, else "near"; ``crosses``
    is "", "split", "label" or "split+label". Unreadable images are skipped with a warning.
    ``hashes`` (``image_hashes`` of the manifest's paths) spares hashing the images again.
    """
    import pandas as pd  # here, not at import: xrai.data (the decoder) imports this module

    hashes = image_hashes(manifest["path"].astype(str).tolist(), workers=workers, progress=progress) \
        if hashes is None else hashes
    _report_bad(hashes)
    comp = _grouping(hashes, near_distance, min_correlation)
    frame = pd.DataFrame({
        "component": comp,
        "path": manifest["path"].astype(str).to_numpy(),
        "label": manifest["label"].astype(int).to_numpy(),
        "split": manifest["split"].fillna("").astype(str).to_numpy() if "split" in manifest else "",
        "digest": hashes["digest"].to_numpy(),
    })
    frame = frame[frame["component"] >= 0]
    sizes = frame.groupby("component")["path"].transform("size")
    frame = frame[sizes > 1]
    if frame.empty:
        return pd.DataFrame(columns=AUDIT_COLUMNS)
    per = frame.groupby("component").agg(n_digest=("digest", "nunique"), n_split=("split", "nunique"),
                                         n_label=("label", "nunique"), size=("path", "size"))
    per["kind"] = np.where(per["n_digest"] == 1, "exact", "near")
    per["crosses"] = _crosses(per["n_split"], per["n_label"])
    # number groups worst first: crossing both, then labels, then splits, then by size
    rank = per["crosses"].map({"split+label": 0, "label": 1, "split": 2, "": 3})
    per = per.assign(rank=rank).sort_values(["rank", "size"], ascending=[True, False], kind="stable")
    per["group"] = np.arange(len(per))
    out = frame.join(per[["group", "kind", "crosses"]], on="component")
    out = out.sort_values(["group", "path"], kind="stable")[AUDIT_COLUMNS].reset_index(drop=True)
    return out


def _crosses(n_split: pd.Series, n_label: pd.Series) -> list[str]:
    """"", "split", "label" or "split+label" per group from its counts of distinct splits and labels."""
    return ["+".join(x for x in ("split" if s > 1 else "", "label" if l > 1 else "") if x)
            for s, l in zip(n_split, n_label)]


def with_splits(table: pd.DataFrame, splits: pd.Series) -> pd.DataFrame:
    """An audit table with each image's split replaced and ``crosses`` recomputed: the audit of the same
    images under another split (a cross-validation fold) without hashing them again.

    Args:
        table: an ``audit`` table (or audit.csv read back).
        splits: the new split of each image, indexed by path; images it lacks get "".
    """
    import pandas as pd  # here, not at import: xrai.data (the decoder) imports this module

    out = table.copy()
    out["split"] = out["path"].map(splits).fillna("").astype(str)
    if out.empty:
        return out
    per = out.groupby("group").agg(n_split=("split", "nunique"), n_label=("label", "nunique"))
    out["crosses"] = out["group"].map(pd.Series(_crosses(per["n_split"], per["n_label"]), index=per.index))
    return out


def audit_summary(table: pd.DataFrame) -> dict[str, int]:
    """{"cross_split_groups": n, "cross_label_groups": n} from an audit table (or audit.csv read back)."""
    if table is None or len(table) == 0:
        return {"cross_split_groups": 0, "cross_label_groups": 0}
    crosses = table.drop_duplicates("group")["crosses"].fillna("").astype(str)
    return {
        "cross_split_groups": int(crosses.str.contains("split").sum()),
        "cross_label_groups": int(crosses.str.contains("label").sum()),
    }

