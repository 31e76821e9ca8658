"""``python -m xrai evaluate``: score a run on its splits (or an external dataset), with figures and the model card."""

from __future__ import annotations

from pathlib import Path

from xrai import plots
from xrai.cli.data_cmds import load_manifest
from xrai.cli.report_lines import print_report
from xrai.evaluate.run import evaluate_external, evaluate_run
from xrai.runs.layout import THRESHOLD_JSON, RunFolder

__all__ = ["cmd_evaluate", "evaluate_splits"]


def evaluate_splits(run_dir: Path, splits: list[str], *, tta: bool | None = None) -> dict[str, dict]:
    """Evaluate each split in turn; the explanation scores (tens of seconds on a CPU) on the last one."""
    reports = {}
    for split in splits:
        explain = None if split == splits[-1] else 0  # None: the default sample
        reports[split] = evaluate_run(run_dir, split=split, tta=tta, explain_images=explain)
        plots.save_run_figures(run_dir, reports[split]["split"])  # a CV run's "valid" is its "oof"
    return reports


def cmd_evaluate(args) -> int:
    run_dir = Path(args.run)
    folder = RunFolder(run_dir)
    if args.data:
        report = evaluate_external(run_dir, load_manifest(args.data, args.root))
        print_report(report)
        print(f"wrote {folder.report_json('external')}")
        return 0
    # A final fit has no valid split (its threshold is its CV's out-of-fold one, given to it: the rule
    # evaluate_run refuses "valid" by); a CV run's "valid" is its out-of-fold report.
    final_fit = folder.operating_point_file.name == THRESHOLD_JSON
    splits = [args.split] if args.split else ["test"] if final_fit else ["valid", "test"]
    for report in evaluate_splits(run_dir, splits, tta=args.tta).values():
        print_report(report)
    print(f"reports and figures in {run_dir}; model card: {folder.model_card}")
    return 0
