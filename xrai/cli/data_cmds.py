"""``python -m xrai download | audit | cache``: the data stage's commands (no torch), and the manifest helpers the
training commands share."""

from __future__ import annotations

import time
from pathlib import Path

from xrai.config import TrainConfig
from xrai.data import audit, audit_summary, download, load, save_manifest
from xrai.data.cache import default_cache_dir
from xrai.data.cachedir import DEFAULT_PRUNE_DAYS, list_caches, prune_caches
from xrai.runs.layout import RunFolder

__all__ = ["cmd_audit", "cmd_cache", "cmd_download", "config_manifest", "load_manifest", "save_with_audit"]


def cmd_download(args) -> int:
    print(download(args.name, force=args.force))
    return 0


def load_manifest(data: str, root: str | None, seed: int = 0, *, val_fraction: float = TrainConfig.val_fraction,
                  test_fraction: float = TrainConfig.test_fraction):
    return load(data, root=root, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction)


def config_manifest(config: TrainConfig):
    """The split a config asks for: its data, root, seed and split fractions (train and cv both)."""
    return load_manifest(config.data, config.root, config.seed, val_fraction=config.val_fraction,
                         test_fraction=config.test_fraction)


def save_with_audit(manifest, out: Path) -> dict:
    """Write the manifest and its leakage audit (audit.csv) into `out`; the audit's summary counts."""
    save_manifest(manifest, out)
    table = audit(manifest)
    RunFolder(out).write_audit(table)
    return audit_summary(table)


def cmd_audit(args) -> int:
    out = Path(args.out)
    manifest = load_manifest(args.data, args.root, args.seed, val_fraction=args.val_fraction,
                             test_fraction=args.test_fraction)
    summary = save_with_audit(manifest, out)
    print(f"{len(manifest)} images; duplicate groups crossing splits: {summary['cross_split_groups']}, "
          f"crossing labels: {summary['cross_label_groups']}")
    print(f"wrote {RunFolder(out).manifest_csv} and {RunFolder(out).audit_csv}")
    return 0


def cmd_cache(args) -> int:
    root = Path(args.dir) if args.dir else default_cache_dir()
    if not args.prune:
        if args.older_than is not None or args.max_gb is not None or args.dry_run:
            raise ValueError("--older-than, --max-gb and --dry-run go with --prune")
        caches = list_caches(root)
        total = sum(c.bytes for c in caches) / 1e9
        print(f"{root}: {len(caches)} cache(s), {total:.2f} GB")
        for c in caches:
            print("  " + _cache_line(c))
        return 0
    days = DEFAULT_PRUNE_DAYS if args.older_than is None else args.older_than
    removed = prune_caches(root, older_than_days=days, max_gb=args.max_gb, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    for c in removed:
        print(f"{verb} " + _cache_line(c))
    cap = f" or beyond {args.max_gb:g} GB" if args.max_gb is not None else ""
    print(f"{verb} {len(removed)} cache(s), {sum(c.bytes for c in removed) / 1e9:.2f} GB "
          f"(unused for more than {days:g} days{cap}, or from an older xrai)")
    return 0


def _cache_line(c) -> str:
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(c.last_used))
    what = f"{c.images:,} images at {c.size_px} px" if c.current else "stale (an older xrai's format)"
    return f"{c.path.name}  {c.bytes / 1e9:.2f} GB  {what}  last used {when} ({c.days_unused:.0f} days ago)"
