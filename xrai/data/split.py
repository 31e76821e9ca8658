"""Patient-grouped, label-stratified, seeded splits; no patient, study or duplicate group in two splits."""

from __future__ import annotations

import numpy as np
import pandas as pd

SPLITS = ("train", "valid", "test")


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = np.arange(n)

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:  # path compression
            self.parent[i], i = root, self.parent[i]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def group_ids(manifest: pd.DataFrame, groups: pd.Series | None = None) -> np.ndarray:
    """One integer per row: rows sharing a patient, a study or a duplicate group get the same id.

    Keys that are empty ("" where a source has none) join nothing; a row with no key at all is its
    own group.
    """
    n = len(manifest)
    uf = _UnionFind(n)
    keys: list[pd.Series] = []
    for column in ("patient_id", "study_id"):
        if column in manifest:
            keys.append(manifest[column].fillna("").astype(str).reset_index(drop=True))
    if groups is not None:
        if len(groups) != n:
            raise ValueError(f"groups has {len(groups)} values for a manifest of {n} rows")
        keys.append(pd.Series(groups).fillna("").astype(str).reset_index(drop=True))
    for key in keys:
        for rows in pd.Series(np.arange(n)).groupby(key.values).indices.values():
            if len(rows) < 2:
                continue
            for other in rows[1:]:
                uf.union(int(rows[0]), int(other))
    # rows whose keys are all empty would be joined through the "" bucket: undo that by grouping
    # them on the path instead
    empty = np.ones(n, dtype=bool)
    for key in keys:
        empty &= (key == "").to_numpy()
    roots = np.array([uf.find(i) for i in range(n)])
    if empty.any():
        # rebuild without the empty-key unions
        uf = _UnionFind(n)
        for key in keys:
            valid = key != ""
            for rows in pd.Series(np.arange(n))[valid.values].groupby(key[valid].values).indices.values():
                idx = np.flatnonzero(valid.values)[rows]
                for other in idx[1:]:
                    uf.union(int(idx[0]), int(other))
        roots = np.array([uf.find(i) for i in range(n)])
    _, ids = np.unique(roots, return_inverse=True)
    return ids


def _assign(group: np.ndarray, label: np.ndarray, fractions: dict[str, float], seed: int) -> np.ndarray:
    """Greedy stratified assignment of whole groups to splits, largest groups first.

    Each group goes to the split whose shortfall (target minus current, per label) it reduces most;
    ties broken by a seeded shuffle. Works when one label is rare, since shortfalls are per label.
    """
    rng = np.random.default_rng(seed)
    names = list(fractions)
    target = np.array([[fractions[s] * np.sum(label == c) for c in (0, 1)] for s in names])  # (S, 2)
    have = np.zeros_like(target)
    n_groups = group.max() + 1 if len(group) else 0
    counts = np.zeros((n_groups, 2))
    np.add.at(counts, (group, label), 1)
    order = rng.permutation(n_groups)
    order = order[np.argsort(-counts[order].sum(1), kind="stable")]
    out = np.empty(n_groups, dtype=object)
    for g in order:
        c = counts[g]
        # gain = how much of the remaining per-label need this split has, weighted by what the group holds
        need = np.clip(target - have, 0, None)
        gain = (need * c).sum(1) / max(c.sum(), 1)
        # relative need breaks ties towards the split furthest behind its target
        rel = (need.sum(1) / np.maximum(target.sum(1), 1e-9))
        best = int(np.lexsort((rel, gain))[-1])
        out[g] = names[best]
        have[best] += c
    return out[group]


def split_manifest(
    manifest: pd.DataFrame,
    *,
    seed: int = 0,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    groups: pd.Series | None = None,
) -> pd.DataFrame:
    """Fill the manifest's splits, grouped and label-stratified; returns a new frame.

    - Rows with no split ("") are divided into train/valid/test.
    - A source with an official train and valid but no test (MURA) keeps valid as it is and has test
      carved out of train by patient.
    - Rows that share a patient, a study or a duplicate group (``groups``, aligned to the manifest)
      always land in one split; an official split is moved only where a group already straddles it.

    Sets ``attrs["split_method"]``.
    """
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise ValueError(f"val_fraction {val_fraction} + test_fraction {test_fraction} must be below 1")
    out = manifest.copy().reset_index(drop=True)
    out.attrs = dict(manifest.attrs)
    split = out["split"].fillna("").astype(str).to_numpy(dtype=object)
    label = out["label"].astype(int).to_numpy()
    gids = group_ids(out, None if groups is None else pd.Series(groups).reset_index(drop=True))
    grouped_by = "patient-grouped" if (out.get("patient_id", pd.Series(dtype=str)).fillna("") != "").any() else (
        "duplicate-grouped" if groups is not None else "image-level")
    present = set(split) - {""}

    if not present:
        fractions = {"train": 1 - val_fraction - test_fraction, "valid": val_fraction, "test": test_fraction}
        fractions = {k: v for k, v in fractions.items() if v > 0}
        out["split"] = _assign(gids, label, fractions, seed)
        method = f"{grouped_by} stratified, seed {seed}"
    else:
        unknown = present - set(SPLITS)
        if unknown:
            raise ValueError(f"unknown split name(s) {sorted(unknown)}; use train, valid or test")
        split = _official_groups_whole(gids, split)
        method = "official"
        if "test" not in present and "train" in present and test_fraction > 0:
            rows = np.flatnonzero(split == "train")
            _, local = np.unique(gids[rows], return_inverse=True)
            share = test_fraction / max(1e-9, 1 - val_fraction) if "valid" in present else test_fraction
            carved = _assign(local, label[rows], {"train": 1 - share, "test": share}, seed)
            split[rows] = carved
            method = f"official + test carved from train, {grouped_by} stratified, seed {seed}"
        if (split == "").any():  # a few rows without a split beside official ones: follow their group or train
            split[split == ""] = "train"
        out["split"] = split
    out.attrs["split_method"] = method
    return out


def _official_groups_whole(gids: np.ndarray, split: np.ndarray) -> np.ndarray:
    """Where a group straddles official splits, move it whole to the split most of its rows are in."""
    split = split.copy()
    frame = pd.DataFrame({"g": gids, "s": split})
    spread = frame[frame["s"] != ""].groupby("g")["s"].agg(lambda s: s.value_counts().index[0])
    mixed = frame.groupby("g")["s"].nunique()
    for g in mixed[mixed > 1].index:
        if g in spread.index:
            split[gids == g] = spread[g]
    return split


def filter_body_parts(manifest: pd.DataFrame, parts: list[str] | str | None) -> pd.DataFrame:
    """Keep the rows of the given body parts (None or "all": everything).

    Raises:
        ValueError: a part has no images; the message lists the parts present with their counts.
    """
    if parts is None or parts == "all" or parts == ["all"]:
        return manifest
    if isinstance(parts, str):
        parts = [p.strip() for p in parts.split(",") if p.strip()]
    wanted = [p.lower() for p in parts]
    counts = manifest["body_part"].value_counts()
    missing = [p for p in wanted if p not in counts.index]
    if missing:
        have = ", ".join(f"{p} ({n})" for p, n in counts.sort_index().items())
        raise ValueError(f"no images for body part(s) {missing}; this dataset has: {have}")
    out = manifest[manifest["body_part"].isin(wanted)].reset_index(drop=True)
    out.attrs = dict(manifest.attrs)
    return out
