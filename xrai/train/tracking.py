"""Optional experiment tracking for `train.fit`: MLflow and Weights & Biases, each used only when installed.

`config.loggers = ["mlflow"]` logs the config as params, the history row as metrics each epoch and
best.pt as an artifact, to whatever tracking URI MLflow is set to (MLFLOW_TRACKING_URI or its default).
`["wandb"]` calls wandb.init(project=config.experiment, config=...) and logs each epoch. The tracker's
run id is kept in RUN_DIR/tracking.json, so a resumed fit() carries on in the same tracked run.
A logger whose package is missing is skipped with a warning; the run goes on.
"""

from __future__ import annotations

import importlib.util
import json
import time
import warnings
from pathlib import Path
from typing import Any

__all__ = ["MlflowTracker", "Tracker", "WandbTracker", "open_trackers"]

TRACKING_FILE = "tracking.json"


class Tracker:
    """The interface fit() drives; the base class does nothing."""

    def log_epoch(self, row: dict[str, Any], *, epoch: int) -> None:
        """Log one history row."""

    def log_artifact(self, path: Path) -> None:
        """Attach a file (best.pt) to the tracked run."""

    def finish(self, *, failed: bool = False) -> None:
        """Close the tracked run."""


def _run_ids(run_dir: Path) -> dict[str, str]:
    path = run_dir / TRACKING_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _remember(run_dir: Path, key: str, value: str) -> None:
    ids = _run_ids(run_dir)
    ids[key] = value
    (run_dir / TRACKING_FILE).write_text(json.dumps(ids, indent=2) + "\n")


class MlflowTracker(Tracker):
    """MLflow through its client API (no global "active run", so nothing leaks into the caller's MLflow)."""

    def __init__(self, config_dict: dict[str, Any], run_dir: Path, *, experiment: str, resume: bool) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient()
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        run_id = _run_ids(run_dir).get("mlflow_run_id") if resume else None
        if run_id is None:
            run_id = self.client.create_run(experiment_id, run_name=run_dir.name).info.run_id
            _remember(run_dir, "mlflow_run_id", run_id)
            params = [Param(k, str(v)) for k, v in sorted(config_dict.items())]
            self.client.log_batch(run_id, params=params)
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.run_id = run_id

    def log_epoch(self, row: dict[str, Any], *, epoch: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, epoch) for k, v in row.items() if k != "epoch"]
        self.client.log_batch(self.run_id, metrics=metrics)

    def log_artifact(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def finish(self, *, failed: bool = False) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


class WandbTracker(Tracker):
    """Weights & Biases: one wandb run per run folder, resumed with it."""

    def __init__(self, config_dict: dict[str, Any], run_dir: Path, *, experiment: str, resume: bool) -> None:
        import wandb

        run_id = _run_ids(run_dir).get("wandb_run_id") if resume else None
        self.run = wandb.init(
            project=experiment,
            config=config_dict,
            dir=str(run_dir),
            name=run_dir.name,
            id=run_id,
            resume="allow" if run_id else None,
        )
        _remember(run_dir, "wandb_run_id", self.run.id)

    def log_epoch(self, row: dict[str, Any], *, epoch: int) -> None:
        self.run.log({k: v for k, v in row.items() if k != "epoch"}, step=epoch)

    def log_artifact(self, path: Path) -> None:
        self.run.save(str(path), base_path=str(path.parent), policy="now")

    def finish(self, *, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


_TRACKERS = {"mlflow": ("mlflow", MlflowTracker), "wandb": ("wandb", WandbTracker)}


def open_trackers(loggers: list[str], config_dict: dict[str, Any], run_dir: Path, *, experiment: str,
                  resume: bool) -> list[Tracker]:
    """Start a tracker per name in `loggers` whose package is installed; warn about and skip the others."""
    trackers: list[Tracker] = []
    for name in loggers:
        if name not in _TRACKERS:
            raise ValueError(f"unknown logger {name!r}; choose from: {', '.join(_TRACKERS)}")
        module, cls = _TRACKERS[name]
        if importlib.util.find_spec(module) is None:
            warnings.warn(
                f"logger {name!r} asked for but the {module} package is not installed "
                f"(pip install {'mlflow-skinny' if name == 'mlflow' else 'wandb'}); training without it",
                stacklevel=3,
            )
            continue
        trackers.append(cls(config_dict, run_dir, experiment=experiment, resume=resume))
    return trackers
