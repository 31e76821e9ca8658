"""train.fit and its parts: optimisers, schedulers, pos_weight, atomic checkpoints, NaN, early stopping, loggers."""

from __future__ import annotations

import math
import os
import warnings

import pandas as pd
import pytest
import torch
from torch import nn

import xrai.train.trainer as train
from xrai.config import OPTIMIZERS, SCHEDULERS, TrainConfig
from xrai.models.checkpoint import (
    atomic_save,
    config_differences,
    load_checkpoint,
    rng_state,
    set_rng_state,
)
from xrai.train.trainer import (
    HISTORY_COLUMNS,
    TrainingDivergedError,
    build_optimizer,
    build_scheduler,
    fit,
    make_sources,
    pos_weight_from_labels,
    train_one_epoch,
)


def _config(**changes) -> TrainConfig:
    """A seconds-long run: 32 px crops, one or two batches per epoch, images decoded in this process."""
    base = dict(data="synthetic", pretrained=False, epochs=1, img_size=32, batch_size=16, num_workers=0,
                input_path="classic", max_batches=1, warmup_epochs=0, patience=0)
    base.update(changes)
    return TrainConfig(**base)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine is shared; tiny models gain nothing from more
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_epoch_run(synthetic_manifest, tmp_path_factory):
    config = _config(max_batches=2)
    run_dir = tmp_path_factory.mktemp("run")
    return config, run_dir, fit(config, synthetic_manifest, run_dir, progress=False)


# ---- the run folder and the checkpoint ----------------------------------------------------------


def test_run_folder_and_config_round_trip(one_epoch_run):
    config, run_dir, result = one_epoch_run
    for name in ("config.json", "manifest.csv", "history.csv", "checkpoints/last.pt", "checkpoints/best.pt"):
        assert (run_dir / name).is_file(), name
    assert TrainConfig.from_json(run_dir / "config.json") == config
    assert len(pd.read_csv(run_dir / "manifest.csv")) > 0 and (run_dir / "manifest.json").is_file()
    last = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert TrainConfig.from_dict(last["config"]) == config
    assert {"model", "optimizer", "scheduler", "scaler", "epoch", "best_metric", "bad_epochs", "history", "rng",
            "config", "model_name"} <= set(last)
    assert last["epoch"] == 1 and last["model_name"] == config.model
    best = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)
    assert best["epoch"] == 1 and all(torch.equal(best["model"][k], v) for k, v in last["model"].items())
    history = pd.read_csv(run_dir / "history.csv")
    assert list(history.columns) == HISTORY_COLUMNS and len(history) == 1
    assert list(result.history.columns) == HISTORY_COLUMNS and result.best_epoch == 1
    assert all(math.isfinite(v) for v in history.drop(columns="val_auroc").iloc[0])


def test_finished_run_resumed_just_returns(one_epoch_run, synthetic_manifest):
    config, run_dir, result = one_epoch_run
    stamp = os.stat(run_dir / "checkpoints" / "last.pt").st_mtime_ns
    again = fit(config, synthetic_manifest, run_dir, resume=True, progress=False)
    assert os.stat(run_dir / "checkpoints" / "last.pt").st_mtime_ns == stamp
    pd.testing.assert_frame_equal(again.history, result.history)


def test_resume_with_a_different_config_names_the_fields(one_epoch_run, synthetic_manifest):
    config, run_dir, _ = one_epoch_run
    with pytest.raises(ValueError, match=rf"(?s)lr: {config.lr} in the checkpoint, 0.01 now.*optimizer"):
        fit(config.replace(lr=0.01, optimizer="sgd", epochs=2), synthetic_manifest, run_dir, resume=True,
            progress=False)
    with pytest.raises(FileExistsError, match="resume=True"):
        fit(config, synthetic_manifest, run_dir, progress=False)


def test_config_differences_allow_raising_epochs_only():
    saved = _config(epochs=3).to_dict()
    assert config_differences(saved, _config(epochs=5, num_workers=4).to_dict(), epochs_done=3) == []
    assert config_differences(saved, _config(epochs=2).to_dict(), epochs_done=2)[0].startswith("epochs")


def test_config_differences_of_a_checkpoint_older_than_a_setting():
    """A checkpoint from before the recipe fields ran letterboxed without TTA: resuming it under today's
    defaults (stretch, TTA) is refused; a newer non-recipe setting left at its default is the same run."""
    from xrai.config import PRE_RECIPE_VALUES

    current = _config().to_dict()
    saved = {k: v for k, v in current.items() if k not in PRE_RECIPE_VALUES and k != "sync_bn"}
    problems = config_differences(saved, current, epochs_done=1)
    changed = {k for k in PRE_RECIPE_VALUES if PRE_RECIPE_VALUES[k] != current[k]}
    assert changed and {line.split(":")[0] for line in problems} == changed
    assert config_differences(saved, {**current, **PRE_RECIPE_VALUES}, epochs_done=1) == []


def test_rng_state_round_trips_through_weights_only(tmp_path):
    import random

    import numpy as np

    state = rng_state()
    atomic_save(state, tmp_path / "rng.pt")
    expected = (random.random(), float(np.random.rand()), torch.rand(1).item())
    set_rng_state(load_checkpoint(tmp_path / "rng.pt"))
    assert (random.random(), float(np.random.rand()), torch.rand(1).item()) == expected


def test_atomic_save_failure_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    atomic_save({"epoch": 1}, path)

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"epoch": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind


# ---- optimisers, schedulers, loss ---------------------------------------------------------------


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_each_optimizer_builds_and_steps(name):
    model = nn.Linear(4, 1)
    optimizer = build_optimizer(model, _config(optimizer=name, lr=0.1))
    expected = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}[name]
    assert type(optimizer) is expected
    if name == "sgd":
        assert optimizer.param_groups[0]["momentum"] == 0.9 and optimizer.param_groups[0]["nesterov"]
    before = model.weight.detach().clone()
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    assert not torch.equal(before, model.weight)


def _lrs(scheduler_name: str, epochs: int, *, steps_per_epoch: int = 1, metric=None, **changes) -> list[float]:
    model = nn.Linear(2, 1)
    config = _config(scheduler=scheduler_name, lr=1.0, epochs=epochs, **changes)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config, steps_per_epoch=steps_per_epoch)
    lrs = []
    for _epoch in range(epochs):
        for _ in range(steps_per_epoch):
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            if scheduler_name in ("cosine", "onecycle"):
                scheduler.step()
        if scheduler_name in ("step", "exponential"):
            scheduler.step()
        elif scheduler_name == "plateau":
            scheduler.step(metric)
    return lrs


@pytest.mark.parametrize("name", SCHEDULERS)
def test_each_scheduler_builds_and_steps(name):
    if name == "none":
        assert build_scheduler(build_optimizer(nn.Linear(2, 1), _config()), _config(scheduler="none"),
                               steps_per_epoch=3) is None
        return
    lrs = _lrs(name, 7, steps_per_epoch=2 if name in ("cosine", "onecycle") else 1, metric=0.5, warmup_epochs=1,
               patience=2)
    if name == "step":  # x0.1 after 5 epochs
        assert lrs[:5] == [1.0] * 5 and lrs[5] == pytest.approx(0.1)
    elif name == "exponential":  # x0.99 per epoch
        assert [lrs[i + 1] / lrs[i] for i in range(6)] == pytest.approx([0.99] * 6)
    elif name == "cosine":  # linear warm-up over the first epoch's 2 steps, then down towards 0
        assert lrs[:3] == pytest.approx([0.5, 1.0, 1.0])
        assert all(a >= b for a, b in zip(lrs[2:], lrs[3:])) and lrs[-1] < 0.05
    elif name == "onecycle":  # up from lr/25 to the peak lr, then down far below the start
        assert lrs[0] == pytest.approx(1.0 / 25) and max(lrs) == pytest.approx(1.0, rel=0.05) and lrs[-1] < 1e-3
    else:  # plateau: a flat metric cuts the lr by 10 once patience (max(1, 2 // 2) = 1) runs out
        assert lrs[0] == 1.0 and lrs[-1] < 0.1


def test_pos_weight_from_labels():
    assert pos_weight_from_labels([0, 0, 0, 1]) == 3.0
    assert pos_weight_from_labels(pd.Series([1, 1, 0, 0, 0, 0])) == 2.0
    with pytest.raises(ValueError, match="both labels"):
        pos_weight_from_labels([0, 0])


class _FakeSource:
    """A BatchSource over fixed random batches."""

    def __init__(self, n=3, size=16):
        g = torch.Generator().manual_seed(0)
        self.batches = [(torch.randn(4, 3, size, size, generator=g), torch.tensor([0.0, 1.0, 0.0, 1.0]))
                        for _ in range(n)]

    def __len__(self):
        return len(self.batches)

    def epoch(self, epoch):
        yield from self.batches


@pytest.mark.parametrize("amp_dtype", [None, torch.bfloat16])
def test_amp_plumbing_on_cpu(amp_dtype):
    """The CPU path (no scaler) and autocast with bf16 run; fp16's GradScaler is the same calls, enabled."""
    from xrai.models.factory import create_model

    model = create_model("mobilenet_v2", pretrained=False)
    optimizer = build_optimizer(model, _config())
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    criterion = nn.BCEWithLogitsLoss(pos_weight=torch.tensor(1.0))
    stats = train_one_epoch(model, _FakeSource(), criterion, optimizer, scaler, epoch=1,
                            device=torch.device("cpu"), amp_dtype=amp_dtype, progress=False)
    assert math.isfinite(stats["train_loss"]) and stats["images"] == 12
    assert scaler.state_dict() == {}  # what fit() stores for CPU and bf16 runs; resume skips loading it


# ---- NaN, early stopping, best.pt --------------------------------------------------------------


class _NaNLoss(nn.BCEWithLogitsLoss):
    def forward(self, logits, target):
        return super().forward(logits, target) * float("nan")


def test_nan_loss_raises_and_keeps_the_last_good_checkpoint(one_epoch_run, synthetic_manifest, tmp_path,
                                                             monkeypatch):
    import shutil

    config, source_dir, _ = one_epoch_run
    run_dir = tmp_path / "run"
    shutil.copytree(source_dir, run_dir)
    before = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    monkeypatch.setattr(train.nn, "BCEWithLogitsLoss", _NaNLoss)
    with pytest.raises(TrainingDivergedError, match=r"(?s)loss became nan at epoch 2.*still holds epoch 1.*lower lr"):
        fit(config.replace(epochs=2), synthetic_manifest, run_dir, resume=True, progress=False)
    after = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert after["epoch"] == 1
    assert all(torch.equal(after["model"][k], v) for k, v in before["model"].items())
    assert all(torch.isfinite(v).all() for v in after["model"].values() if v.is_floating_point())


def _scripted_evaluate(monkeypatch, values):
    """Replace validation by a scripted sequence of metrics (training still runs for real)."""
    calls = iter(values)

    def fake(model, source, criterion, **kwargs):
        auroc, loss = next(calls)
        return {"val_loss": loss, "val_auroc": auroc, "val_accuracy": 0.5}

    monkeypatch.setattr(train, "validate", fake)


def test_early_stopping_and_best_by_auroc(synthetic_manifest, tmp_path, monkeypatch):
    _scripted_evaluate(monkeypatch, [(0.6, 1.0), (0.7, 0.9), (0.65, 0.8), (0.6, 0.7), (0.9, 0.6), (0.9, 0.5)])
    result = fit(_config(epochs=6, patience=2), synthetic_manifest, tmp_path, progress=False)
    assert result.stopped_early and len(result.history) == 4
    assert result.best_epoch == 2 and result.best_metric == 0.7
    best = load_checkpoint(tmp_path / "checkpoints" / "best.pt")
    assert best["epoch"] == 2 and best["best_metric"] == 0.7
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["bad_epochs"] == 2


def test_best_by_loss_is_the_minimum(synthetic_manifest, tmp_path, monkeypatch):
    _scripted_evaluate(monkeypatch, [(0.9, 1.0), (0.8, 0.8), (0.7, 0.9), (0.6, 0.7), (0.95, 0.95)])
    result = fit(_config(epochs=5, patience=5, monitor="loss"), synthetic_manifest, tmp_path, progress=False)
    assert not result.stopped_early and result.best_epoch == 4 and result.best_metric == 0.7
    assert load_checkpoint(tmp_path / "checkpoints" / "best.pt")["epoch"] == 4


# ---- input paths and loggers -----------------------------------------------------------------


def test_cached_input_path_runs(synthetic_manifest, tmp_path):
    result = fit(_config(input_path="cached", max_batches=2), synthetic_manifest, tmp_path, progress=False)
    assert len(result.history) == 1 and math.isfinite(result.history["train_loss"][0])


def test_auto_input_path_is_recorded_and_kept_on_resume(synthetic_manifest, tmp_path, monkeypatch):
    from xrai.data import cache as cache_mod

    monkeypatch.setenv("XRAI_HOME", str(tmp_path / "home"))  # no cache from other tests
    free_bytes = cache_mod._free_bytes
    monkeypatch.setattr(cache_mod, "_free_bytes", lambda path: 0)  # no room for a cache: "auto" picks classic
    run = tmp_path / "run"
    fit(_config(input_path="auto"), synthetic_manifest, run, progress=False)
    assert TrainConfig.from_json(run / "config.json").input_path == "classic"
    assert load_checkpoint(run / "checkpoints" / "last.pt")["config"]["input_path"] == "classic"
    monkeypatch.setattr(cache_mod, "_free_bytes", free_bytes)  # room now: a new "auto" run would pick the cache
    with pytest.raises(ValueError, match="input_path='cached'.*'classic' path") as refused:
        fit(_config(input_path="cached", epochs=2), synthetic_manifest, run, resume=True, progress=False)
    assert "\n" not in str(refused.value)
    picked = []
    monkeypatch.setattr(train, "make_sources", lambda config, *a, **k: picked.append(config.input_path)
                        or make_sources(config, *a, **k))
    result = fit(_config(input_path="auto", epochs=2), synthetic_manifest, run, resume=True, progress=False)
    assert picked == ["classic"] and len(result.history) == 2
    assert TrainConfig.from_json(run / "config.json").input_path == "classic"


def test_deterministic_run_sets_the_backends_while_training_and_restores_them(synthetic_manifest, tmp_path,
                                                                            monkeypatch):
    def flags():
        return (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
                torch.backends.cudnn.benchmark)

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    seen, original = [], train.train_one_epoch
    monkeypatch.setattr(train, "train_one_epoch", lambda *a, **k: seen.append(flags()) or original(*a, **k))
    before = flags()
    fit(_config(deterministic=True), synthetic_manifest, tmp_path / "exact", progress=False)
    assert seen == [(True, True, False)] and flags() == before
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert TrainConfig.from_json(tmp_path / "exact" / "config.json").deterministic is True
    fit(_config(), synthetic_manifest, tmp_path / "fast", progress=False)
    assert seen[1][0] is before[0] and flags() == before  # the default leaves deterministic mode alone


def test_mlflow_logger_against_a_local_file_store(synthetic_manifest, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    store = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 wants a database; a folder is enough here
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # MLflow 3 deprecates the file store we test on
        fit(_config(epochs=2, loggers=["mlflow"], experiment="xrai-test"), synthetic_manifest, tmp_path / "run",
            progress=False)
        client = MlflowClient(store)
        experiment = client.get_experiment_by_name("xrai-test")
        (run,) = client.search_runs([experiment.experiment_id])
        assert run.data.params["model"] == "mobilenet_v2" and run.info.status == "FINISHED"
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")]
        assert sorted(steps) == [1, 2]
        assert "best.pt" in [a.path for a in client.list_artifacts(run.info.run_id)]


def test_missing_logger_package_warns_and_trains(synthetic_manifest, tmp_path, monkeypatch):
    import importlib.util

    import xrai.train.tracking

    real = importlib.util.find_spec
    monkeypatch.setattr(xrai.train.tracking.importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name))
    with pytest.warns(UserWarning, match="wandb package is not installed"):
        result = fit(_config(loggers=["wandb"]), synthetic_manifest, tmp_path, progress=False)
    assert len(result.history) == 1


def test_pruned_run_keeps_its_masks_through_resume(synthetic_manifest, tmp_path):
    config = _config(prune_sparsity=0.5, prune_iterations=2)
    fit(config, synthetic_manifest, tmp_path, progress=False)
    fit(config.replace(epochs=2), synthetic_manifest, tmp_path, resume=True, progress=False)
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    masks = [v for k, v in state["model"].items() if k.endswith("_mask")]
    assert state["epoch"] == 2 and masks
    kept = sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks)
    assert kept == pytest.approx(0.5, abs=0.01)


# ---- a full disk and a busy run folder (issue 25, faults 7 and 8) ---------------------------------------


def _cli_train(tmp_path, synthetic_root, out, *extra) -> list[str]:
    """`python -m xrai train` arguments for a seconds-long run (the settings of _config, via --config)."""
    config = tmp_path / "fast.json"
    _config().to_json(config)
    return ["train", "--config", str(config), "--root", str(synthetic_root), "--out", str(out), *extra]


def _error_line(err: str) -> str:
    """The CLI's one error line (stderr also holds progress bars); no traceback anywhere."""
    lines = [line for line in err.splitlines() if line.startswith("xrai ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _full_disk_save(obj, f, *args, **kwargs):
    """torch.save on a full disk: part of the file lands, then torch's writer raises its own RuntimeError
    with the OSError (errno 28) only chained inside (as __context__)."""
    f.write(b"\0" * 4096)
    try:
        raise OSError(28, "No space left on device")
    except OSError:
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4096 vs 4032") from None


def test_a_full_disk_while_saving_is_one_line_exit_2_and_leaves_out_as_it_was(synthetic_root, tmp_path, capsys,
                                                                               monkeypatch):
    from xrai.cli.commands import main

    out = tmp_path / "run"
    monkeypatch.setattr(torch, "save", _full_disk_save)
    assert main(_cli_train(tmp_path, synthetic_root, out)) == 2
    err = _error_line(capsys.readouterr().err)
    assert f"no space left in {out / 'checkpoints'}" in err and "free" in err and "needed" in err, err
    # a fresh run whose first checkpoint could not be written leaves --out as it was: not there
    assert not out.exists(), sorted(p.name for p in out.rglob("*"))


def test_the_error_chain_is_searched_for_a_full_disk():
    from xrai.errors import disk_full_cause, is_user_error, one_line

    try:
        _full_disk_save(None, open(os.devnull, "wb"))
    except RuntimeError as error:
        wrapped = error
    assert disk_full_cause(wrapped).errno == 28 and is_user_error(wrapped)
    assert one_line(wrapped) == "no space left on device (free some disk space or choose a folder on a larger disk)"
    assert not is_user_error(RuntimeError("unexpected pos 1 vs 2"))


def test_a_disk_too_small_for_the_checkpoints_is_refused_before_anything_is_written(synthetic_root, tmp_path,
                                                                                    capsys, monkeypatch):
    import xrai.fileio
    from xrai.cli.commands import main

    out = tmp_path / "run"
    monkeypatch.setattr(xrai.fileio, "free_bytes", lambda folder: 1_000_000)
    assert main(_cli_train(tmp_path, synthetic_root, out)) == 2
    err = _error_line(capsys.readouterr().err)
    assert f"not enough space in {out}" in err and "1.0 MB free" in err, err
    assert not out.exists()


def test_a_failed_last_pt_never_leaves_best_pt_alone(tmp_path, monkeypatch):
    from xrai.errors import DiskFullError
    from xrai.runs.layout import RunFolder

    folder = RunFolder(tmp_path)
    calls = []

    def save(obj, f, *args, **kwargs):
        calls.append(obj["epoch"])
        if len(calls) == 2:  # best.pt lands, last.pt does not
            _full_disk_save(obj, f)
        f.write(b"ok")

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(DiskFullError, match="no space left in .*checkpoints for last.pt"):
        train._save_checkpoints(folder, {"epoch": 1}, {"epoch": 1}, 1)
    assert not folder.checkpoints.exists() or sorted(p.name for p in folder.checkpoints.iterdir()) == []


def test_a_second_train_into_a_busy_folder_fails_at_once_naming_the_holder(synthetic_root, tmp_path):
    import subprocess
    import sys

    from _checks import child_env

    from xrai.fileio import held_lock
    from xrai.runs.layout import RunFolder

    out = tmp_path / "run"
    lock = RunFolder(out).train_lock
    with held_lock(lock):  # a `train` running in this process
        proc = subprocess.run([sys.executable, "-m", "xrai", *_cli_train(tmp_path, synthetic_root, out)],
                              capture_output=True, text=True, timeout=300, env=child_env())
        assert lock.read_text() == f"{os.getpid()}\n"  # the holder's lock untouched by the refused one
    assert proc.returncode == 2, proc.stderr
    line = _error_line(proc.stderr)
    assert f"{out} is being trained into by process {os.getpid()}" in line, line
    assert list(out.iterdir()) == []  # the lock went with its holder; the refused run wrote nothing


def test_a_stale_lock_file_does_not_block(synthetic_root, synthetic_manifest, tmp_path):
    from xrai.runs.layout import RunFolder

    folder = RunFolder(tmp_path / "run")
    folder.path.mkdir()
    folder.train_lock.write_text("999999\n")  # left by a killed process: no live flock on it
    fit(_config(), synthetic_manifest, folder.path, progress=False)
    assert folder.checkpoint("last").is_file() and not folder.train_lock.exists()


def test_a_pretrained_run_records_the_weights_file_it_started_from(synthetic_manifest, tmp_path, monkeypatch):
    import torchvision

    import xrai.models.weights as weights

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(weights, "_can_reach", lambda url, timeout=3.0: False)  # offline: the cached file only
    cached = tmp_path / "hub" / "checkpoints" / "mobilenet_v2-7ebf99e0.pth"
    cached.parent.mkdir(parents=True)
    torch.save(torchvision.models.mobilenet_v2().state_dict(), cached)
    run_dir = tmp_path / "run"
    fit(_config(model="mobilenet_v2", pretrained=True), synthetic_manifest, run_dir, progress=False)
    expected = {"weights": "MobileNet_V2_Weights.IMAGENET1K_V2", "file": cached.name,
                "sha256": weights.sha256_file(cached)}
    for which in ("best", "last"):
        assert torch.load(run_dir / "checkpoints" / f"{which}.pt", weights_only=False)["pretrained_weights"] == expected
    scratch = tmp_path / "scratch"
    fit(_config(), synthetic_manifest, scratch, progress=False)
    assert torch.load(scratch / "checkpoints" / "best.pt", weights_only=False)["pretrained_weights"] is None
