"""Patient-grouped, label-stratified, seeded splits, and the body-part filter.

No patient, study or duplicate group ever lands in two splits: rows are merged into groups through
every link they share (patient id, study id, a caller's groups such as the audit's duplicate groups,
the file path), and whole groups are assigned. Assignment is a greedy, label-aware bin packing in
the spirit of scikit-learn's StratifiedGroupKFold: largest groups first, each into the split that
keeps every split's size and label mix closest to its target. StratifiedGroupKFold itself only
makes k equal folds, not train/valid/test shares of 70/15/15, hence this small version.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

SPLITS = ("train", "valid", "test")


def connected_groups(n: int, *links: np.ndarray) -> np.ndarray:
    """Component id (0..k-1, numbered by first row) of each of ``n`` rows joined by equal keys.

    Each array in ``links`` holds one key per row; rows with equal keys are joined, and a key of -1
    joins nothing. Union-find over all links at once, done as scipy's connected components on the
    sparse graph row -> first row with the same key (vectorised; a Python union-find loop is slow on
    MURA's 40k rows).
    """
    rows, cols = [np.arange(n)], [np.arange(n)]
    for key in links:
        key = np.asarray(key)
        ok = np.flatnonzero(key >= 0)
        if ok.size == 0:
            continue
        _, first = np.unique(key[ok], return_index=True)
        _, inverse = np.unique(key[ok], return_inverse=True)
        rows.append(ok)
        cols.append(ok[first][inverse])
    r, c = np.concatenate(rows), np.concatenate(cols)
    graph = coo_matrix((np.ones(r.size, dtype=np.int8), (r, c)), shape=(n, n)).tocsr()
    _, labels = connected_components(graph, directed=False)
    # Renumber by first appearance so ids do not depend on scipy's internal order.
    _, first_row, inverse = np.unique(labels, return_index=True, return_inverse=True)
    order = np.argsort(np.argsort(first_row))
    return order[inverse].astype(np.int64)


def group_ids(manifest: pd.DataFrame, groups: pd.Series | Sequence | None = None) -> np.ndarray:
    """One integer per row: rows sharing a patient, a study, a ``groups`` value or a path get the same id.

    Empty keys ("" where a source has none) join nothing, so a row with no key is its own group.
    """
    links = [_codes(manifest[c]) for c in ("patient_id", "study_id", "path") if c in manifest.columns]
    if groups is not None:
        links.append(_codes(_aligned(groups, manifest)))
    return connected_groups(len(manifest), *links)


def _aligned(groups: pd.Series | Sequence, manifest: pd.DataFrame) -> pd.Series:
    """``groups`` as a Series on the manifest's index (a Series by index, anything else by position)."""
    n = len(manifest)
    if isinstance(groups, pd.Series):
        if groups.index.equals(manifest.index):
            return groups
        if len(groups) == n and groups.index.isin(manifest.index).all() and groups.index.is_unique:
            return groups.reindex(manifest.index)
        if len(groups) == n:
            return pd.Series(groups.to_numpy(), index=manifest.index)
        raise ValueError(f"groups has {len(groups)} values for a manifest of {n} rows")
    values = list(groups)
    if len(values) != n:
        raise ValueError(f"groups has {len(values)} values for a manifest of {n} rows")
    return pd.Series(values, index=manifest.index)


def _codes(values: pd.Series) -> np.ndarray:
    """Integer code per row, -1 for empty / missing."""
    text = values.astype("string").fillna("")
    codes, _ = pd.factorize(text)
    codes = codes.astype(np.int64)
    codes[(text == "").to_numpy()] = -1
    return codes


def split_manifest(
    manifest: pd.DataFrame,
    *,
    seed: int = 0,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    groups: pd.Series | Sequence | None = None,
) -> pd.DataFrame:
    """Fill the splits a manifest lacks, keeping every patient, study and group within one split.

    - Every row already has train/valid/test and both valid and test exist: returned as is ("official").
    - Rows with split "" are assigned to train/valid/test (``val_fraction``, ``test_fraction`` of them).
    - Official train with valid but no test (MURA): ``test`` is carved out of train (``test_fraction``
      of the train rows); valid is kept untouched. Likewise valid is carved from train when only
      train and test exist.
    Groups join rows by patient_id, study_id, ``groups`` (a Series aligned to the manifest's index,
    or a sequence in row order; e.g. :func:`xrai.data.duplicate_groups`) and path. A group that
    touches an official valid or test row is never moved. Splits are label-stratified, seeded and
    deterministic. ``attrs["split_method"]`` says what was done, e.g. "official + test carved from
    train, patient-grouped stratified, seed 0".

    Returns:
        A new DataFrame (the input is never changed).
    Raises:
        ValueError: fractions out of range, an unknown split name, or misaligned ``groups``.
    """
    _check_fractions(val_fraction, test_fraction)
    out = manifest.copy()
    out.attrs = dict(manifest.attrs)
    split = _split_names(out["split"])
    labels = out["label"].to_numpy(dtype=np.int64)
    group, how = _split_groups(out, groups)
    present = set(split) - {""}
    empty = split == ""
    rng = np.random.default_rng(seed)
    if empty.any():
        _fill_empty(split, group, labels, val_fraction, test_fraction, rng)
        method = f"{how}, seed {seed}" if not present else f"official + rest {how}, seed {seed}"
    else:
        wanted = {"valid": val_fraction, "test": test_fraction}
        missing = [s for s in ("valid", "test") if s not in present and wanted[s] > 0]
        if not missing or "train" not in present:
            method = "official"
        else:
            _carve_from_train(split, group, labels, {s: wanted[s] for s in missing}, rng)
            method = f"official + {' and '.join(missing)} carved from train, {how}, seed {seed}"
    out["split"] = pd.Series(split, index=out.index, dtype=object).astype(out["split"].dtype)
    out.attrs["split_method"] = method
    return out


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value}")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(f"val_fraction + test_fraction must be < 1, got {val_fraction} + {test_fraction}")


def _split_names(column: pd.Series) -> np.ndarray:
    """The split column as an object array of "train", "valid", "test" or "" ("val" read as "valid")."""
    split = column.astype("string").fillna("").str.strip().str.lower().replace({"val": "valid"})
    unknown = sorted(set(split.unique()) - set(SPLITS) - {""})
    if unknown:
        raise ValueError(f"unknown split value(s) {unknown} in the manifest; expected one of {SPLITS} or ''")
    return split.to_numpy(dtype=object)


def _split_groups(out: pd.DataFrame, groups: pd.Series | Sequence | None) -> tuple[np.ndarray, str]:
    """(group id per row, how the split is grouped: "patient-grouped stratified", ...)."""
    links = []
    kinds = []
    for column, kind in (("patient_id", "patient"), ("study_id", "study")):
        if column in out.columns:
            codes = _codes(out[column])
            if (codes >= 0).any():
                links.append(codes)
                kinds.append(kind)
    if groups is not None:
        links.append(_codes(_aligned(groups, out)))
        kinds.append("duplicate")
    links.append(_codes(out["path"]))
    group = connected_groups(len(out), *links)
    grouping = next((k for k in kinds if k == "patient"), kinds[0] if kinds else None)
    return group, f"{grouping}-grouped stratified" if grouping else "image-level stratified"


def _fill_empty(split: np.ndarray, group: np.ndarray, labels: np.ndarray, val_fraction: float,
                test_fraction: float, rng: np.random.Generator) -> None:
    """Assign the rows with split "" in place; groups holding official rows keep that split (the first
    official one, by row order)."""
    empty = split == ""
    pinned: dict[int, str] = {}
    for g, s in zip(group[~empty], split[~empty]):
        pinned.setdefault(int(g), s)
    free = np.array([int(g) not in pinned for g in group]) & empty
    for i in np.flatnonzero(empty & ~free):
        split[i] = pinned[int(group[i])]
    fractions = {"train": 1.0 - val_fraction - test_fraction, "valid": val_fraction, "test": test_fraction}
    split[free] = _assign(group[free], labels[free], fractions, rng)


def _carve_from_train(split: np.ndarray, group: np.ndarray, labels: np.ndarray, wanted: dict[str, float],
                      rng: np.random.Generator) -> None:
    """Move the ``wanted`` shares of train into the missing splits, in place, never a group that touches
    another split."""
    touches_other = np.zeros(group.max() + 1, dtype=bool)
    touches_other[group[split != "train"]] = True
    movable = (split == "train") & ~touches_other[group]
    fractions = {"train": 1.0 - sum(wanted.values()), **wanted}
    split[movable] = _assign(group[movable], labels[movable], fractions, rng)


def _assign(group: np.ndarray, labels: np.ndarray, fractions: dict[str, float], rng: np.random.Generator) -> np.ndarray:
    """Split name per row: whole groups, greedily, towards each split's share of rows and of each label."""
    names = [s for s, f in fractions.items() if f > 0]
    share = np.array([fractions[s] for s in names])
    ids, inverse = np.unique(group, return_inverse=True)
    size = np.bincount(inverse, minlength=ids.size).astype(float)
    pos = np.bincount(inverse, weights=labels, minlength=ids.size)
    neg = size - pos
    totals = np.array([size.sum(), pos.sum(), neg.sum()])
    target = share[:, None] * totals[None, :]  # (splits, [rows, positives, negatives])
    scale = 1.0 / np.maximum(totals, 1.0)  # each count weighs by its total, so a rare label still counts
    # Largest groups first (hardest to place); a seeded shuffle breaks ties, which is what the seed changes.
    order = rng.permutation(ids.size)
    order = order[np.argsort(-size[order], kind="stable")]
    current = np.zeros_like(target)
    chosen = np.empty(ids.size, dtype=np.int64)
    for g in order:
        add = np.array([size[g], pos[g], neg[g]])
        before = ((current - target) * scale) ** 2
        after = ((current + add - target) * scale) ** 2
        best = int(np.argmin((after - before).sum(axis=1)))
        chosen[g] = best
        current[best] += add
    return np.array(names, dtype=object)[chosen[inverse]]


def filter_body_parts(manifest: pd.DataFrame, parts: str | Sequence[str] | None) -> pd.DataFrame:
    """Rows of the given body parts (case-insensitive); None, [] or "all" keeps every row.

    Returns a new DataFrame with a fresh index and the same attrs.

    Raises:
        ValueError: a part that is not in the manifest; the message lists the parts present with counts.
    """
    if isinstance(parts, str):
        parts = [p for p in parts.split(",")]
    wanted = [p.strip().lower() for p in (parts or []) if p and p.strip()]
    if not wanted or wanted == ["all"]:
        out = manifest.reset_index(drop=True)
        out.attrs = dict(manifest.attrs)
        return out
    column = manifest["body_part"].astype("string").fillna("").str.lower()
    counts = column.value_counts()
    unknown = [p for p in wanted if p not in counts.index]
    if unknown:
        listing = ", ".join(f"{part} ({count})" for part, count in sorted(counts.items()))
        raise ValueError(f"unknown body part(s) {unknown}; parts present: {listing}")
    out = manifest[column.isin(wanted).to_numpy()].reset_index(drop=True)
    out.attrs = dict(manifest.attrs)
    return out
