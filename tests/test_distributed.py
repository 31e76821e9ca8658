"""Several processes on the CPU (torchrun, gloo): sharding, one writer, equality with one process (one step of
the whole network; four epochs of the head), kill-and-resume, a failing rank. The torchrun runs share one
tiny synthetic set and a few batches per epoch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from _checks import child_env

from xrai.config import TrainConfig
from xrai.data.batches import epoch_batches, per_rank_batch
from xrai.train.launcher import (
    LaunchError,
    failure_line,
    resolve_nproc,
    run_torchrun,
    torchrun_command,
)

WORKER = Path(__file__).with_name("_ddp_worker.py")
REPO = WORKER.parents[1]
WALL_CLOCK = ["seconds", "images_per_s"]
# How far the 2-process "learn" run may drift from the 1-process one: float32 rounding, summed in another
# order (4e-8 of the losses and 3e-7 of the distance the head moved, measured).
LEARN_RTOL = 1e-5
# 35 training images (the conftest's synthetic set): 4 global batches of 8 per epoch, 4 images per rank and step.
SMALL = ["--no-pretrained", "--device", "cpu", "--img-size", "32", "--batch-size", "8", "--num-workers", "0"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _worker(*args: str | Path) -> list[str]:
    return torchrun_command(2, [str(WORKER), *map(str, args)])


def _train_args(root: Path, out: Path, *extra: str) -> list[str]:
    # Without SyncBatchNorm: on 2 shared CPU cores its ~100 small all-reduces a step cost more than the
    # step (the "step" run covers it); this way the runs also cover rank 0's buffers being shared.
    return ["--", "train", "--data", "synthetic", "--root", str(root), "--out", str(out), *SMALL, "--no-sync-bn",
            *extra]


def test_cpu_sync_batchnorm_equals_one_batchnorm_over_the_global_batch(tmp_path):
    """CpuSyncBatchNorm on 2 gloo ranks (float32, shards of 4+4, 3+5, (N, C) input, no affine) gives the
    outputs, input gradients, summed parameter gradients and running statistics of one float64
    BatchNorm over the whole batch: its hand-written backward is checked against autograd's."""
    out = tmp_path / "syncbn.json"
    run_torchrun(torchrun_command(2, [str(REPO / "tests" / "_syncbn_worker.py"), str(out)]), env=child_env(OMP_NUM_THREADS="1"), timeout=300)
    results = json.loads(out.read_text())
    assert set(results) == {"2d channels_last", "uneven shards", "(N, C) input", "not affine"}
    for case, result in results.items():
        assert result["ranks_agree"], case
        assert set(result["relative_diff"]) >= {"out", "grad_x", "running_mean", "running_var"}
        worst = {k: v for k, v in result["relative_diff"].items() if v > 1e-5}
        assert not worst, (case, worst)


# ---- sharding, without processes ------------------------------------------------------------------


@pytest.mark.parametrize(("n", "batch", "world"), [(35, 8, 2), (100, 12, 3), (64, 16, 4)])
def test_rank_shards_cover_each_image_once_per_epoch(n, batch, world):
    for epoch in (1, 2):
        single = epoch_batches(n, batch, train=True, seed=3, epoch=epoch)
        shards = [epoch_batches(n, batch, train=True, seed=3, epoch=epoch, rank=r, world_size=world)
                  for r in range(world)]
        assert all(len(s) == len(single) for s in shards), "every rank takes the same number of steps"
        for step, whole in enumerate(single):
            parts = [s[step] for s in shards]
            assert {len(p) for p in parts} == {batch // world}
            assert np.array_equal(np.concatenate(parts), whole), "rank r holds the r-th slice of the global batch"
        seen = np.concatenate([np.concatenate(s) for s in shards])
        assert len(seen) == len(set(seen)) == n // batch * batch  # once each; the remainder (< batch) is dropped
    # evaluation keeps every row, also when the last batch leaves a rank with nothing
    rows = np.concatenate([np.concatenate(epoch_batches(n, batch, train=False, seed=3, epoch=0, rank=r,
                                                        world_size=world)) for r in range(world)])
    assert sorted(rows) == list(range(n))


def test_global_batch_must_split_evenly():
    assert per_rank_batch(32, 2) == 16
    with pytest.raises(ValueError, match=r"batch_size 30 does not divide among 4 processes.*multiple of 4"):
        per_rank_batch(30, 4)
    with pytest.raises(ValueError, match="no full batch of 16"):
        epoch_batches(10, 16, train=True, seed=0, epoch=1, rank=0, world_size=2)
    assert resolve_nproc("auto", "cpu") == 1 and resolve_nproc(3, "cpu") == 3
    with pytest.raises(ValueError, match="nproc must be 'auto'"):
        resolve_nproc("two", "cpu")


def test_failure_line_names_the_rank_and_its_error():
    lines = ["epoch 1:  50%",
             "xrai train [rank 1]: rank 0 failed (needs both labels); rank 1 stops too (-v shows the traceback)",
             "xrai train [rank 0]: the train split needs both labels (-v shows the traceback)",
             "xrai.train.launcher: failed: rank 1, exit code 2"]
    assert failure_line(lines, 2, nproc=2) == ("training on 2 processes failed (rank 1, exit code 2): "
                                               "the train split needs both labels")
    # The failed rank's own traceback, not the one of the rank that lost its peer afterwards.
    tracebacks = ["[rank1]: Traceback (most recent call last):", '[rank1]:   File "x.py", line 1',
                  "[rank1]: RuntimeError: injected", "[rank0]: RuntimeError: Connection reset by peer",
                  "xrai.train.launcher: failed: rank 1, exit code 1"]
    assert failure_line(tracebacks, 1) == "training failed (rank 1, exit code 1): RuntimeError: injected"
    assert failure_line(["Killed"], -9) == ("training failed (exit code -9): no error message; the output above "
                                            "says what happened")


def test_train_config_file_and_the_flags_that_override_it(tmp_path):
    from xrai.cli.commands import _run_config, build_parser

    saved = TrainConfig(data="fracatlas", model="resnet18", epochs=7, lr=0.01, batch_size=48, sync_bn=False,
                        max_batches=3, world_size=2)
    (tmp_path / "config.json").write_text(saved.to_json())
    args = build_parser().parse_args(["train", "--config", str(tmp_path / "config.json"), "--epochs", "9",
                                      "--device", "cpu"])
    config = _run_config(args)
    assert config == saved.replace(epochs=9, device="cpu")  # flags away from their defaults override the file
    plain = _run_config(build_parser().parse_args(["train", "--no-sync-bn", "--device", "cuda"]))
    assert (plain.sync_bn, plain.device, plain.data) == (False, "cuda", "synthetic")


def test_nproc_refusals_are_one_line(synthetic_root, tmp_path, capsys):
    from xrai.cli.commands import main

    out = tmp_path / "run"
    code = main(["train", "--data", "synthetic", "--root", str(synthetic_root), "--out", str(out), "--nproc", "2",
                 "--device", "cpu", "--batch-size", "7", "--no-pretrained"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "batch_size 7 does not divide among 2 processes" in err
    assert not out.exists()
    assert main(["bench", "--nproc", "auto", "--device", "cpu"]) == 2
    assert "compares 1 with N >= 2" in capsys.readouterr().err


# ---- two processes --------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_processes_train_with_one_writer(reference, synthetic_manifest):
    out, logs = reference
    history = pd.read_csv(out / "history.csv")
    assert list(history["world_size"]) == [2, 2] and list(history["epoch"]) == [1, 2]
    assert TrainConfig.from_json(out / "config.json").world_size == 2
    last = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert last["epoch"] == 2 and len(last["rng_ranks"]) == 2
    assert not any(k.startswith("module.") for k in last["model"]), "the checkpoint holds the plain model"
    # Only rank 0 writes into the run folders (this one and the other runs of the same torchrun).
    assert logs[1]["writes"] == [], logs[1]["writes"][:5]
    written = {Path(path).name for _, path in logs[0]["writes"] if Path(path).resolve().is_relative_to(out.resolve())}
    assert {"config.json", "history.csv", "manifest.csv"} <= written
    assert any(name.startswith(".last.pt.") for name in written), "rank 0 saved the checkpoint (atomically)"
    # Each epoch, the ranks' batches are disjoint halves of the global batches: every training image
    # is served once (the 35 % 8 = 3 left over are dropped, a different 3 each epoch).
    train = set(synthetic_manifest.loc[synthetic_manifest["split"] == "train", "path"])
    for epoch in ("1", "2"):
        batches = [logs[rank]["served"]["reference"][epoch] for rank in (0, 1)]
        assert len(batches[0]) == len(batches[1]) == 4 and all(len(b) == 4 for r in batches for b in r)
        paths = [p for r in batches for b in r for p in b]
        assert len(paths) == len(set(paths)) == 32 and set(paths) <= train


@pytest.fixture(scope="module")
def torchrun_runs(synthetic_root, synthetic_manifest, tmp_path_factory):
    """Four runs in one torchrun of 2 processes (its start-up, ~10 s on 2 cores, is paid once), every write
    and every served batch logged per rank, then one run on 1 process here:

    - "reference": two epochs through the CLI flags, augmentation on, without SyncBatchNorm (on 2 shared
      CPU cores its ~100 small all-reduces a step cost more than the step; "step" covers it, and this
      way rank 0's buffers being shared is covered too);
    - "step": one SGD step on one global batch of 8 (2 x 4, SyncBatchNorm), also run on 1 process here;
    - "learn": 4 epochs of AdamW with a cosine schedule, ResNet-18's head alone, also run on 1 process here;
    - "fail": rank 1 raises in its third step; the run's LaunchError ends the torchrun, so it is last.

    Augmentation is off in the last three because each rank draws it from its own stream (seed, epoch,
    rank): with it on, the 2-process and 1-process runs would see differently augmented pixels and could
    not agree. With the eval crop both see the very same inputs, so what is compared is the sharding, the
    gradient averaging and SyncBatchNorm.
    """
    tmp = tmp_path_factory.mktemp("ddp")
    log = tmp / "log"
    log.mkdir()
    common = dict(data="synthetic", root=str(synthetic_root), pretrained=False, batch_size=8, num_workers=0,
                  warmup_epochs=0, scheduler="none", device="cpu", patience=0)
    configs = {"step": TrainConfig(**common, img_size=32, epochs=1, max_batches=1, optimizer="sgd", lr=0.1,
                                   momentum=0.0, input_path="classic"),
               # the head alone on ResNet-18's features (frozen in eval mode; MobileNet's random ones are all ~0)
               "learn": TrainConfig(**common, model="resnet18", img_size=32, epochs=4, lr=1e-3, freeze=True)
               .replace(scheduler="cosine"),
               "fail": TrainConfig(**common, img_size=48, epochs=2, lr=1e-3)}
    args = _train_args(synthetic_root, tmp / "two" / "reference", "--epochs", "2")
    for name, config in configs.items():
        (tmp / f"{name}.json").write_text(config.to_json())
        args += ["--", "train", "--config", str(tmp / f"{name}.json"), "--out", str(tmp / "two" / name)]
    with pytest.raises(LaunchError) as failed:
        # A bound, not a speed target: rank 0 left waiting on rank 1 would sit out the process group's
        # 30-minute timeout; torchrun ends it within seconds.
        run_torchrun(_worker("--write-log", log, "--no-augment", "step,learn,fail", "--fail", "1:1:fail", *args),
                     env=child_env(OMP_NUM_THREADS="1"), timeout=900)
    logs = {rank: json.loads((log / f"rank{rank}.json").read_text()) for rank in (0, 1)}

    from xrai.data.augment import GpuAugment
    from xrai.train.trainer import fit

    original_init = GpuAugment.__init__
    GpuAugment.__init__ = lambda self, size, *, train, **kw: original_init(self, size, train=False, **kw)
    try:
        for name in ("step", "learn"):
            fit(configs[name], synthetic_manifest, tmp / "one" / name, progress=False)
    finally:
        GpuAugment.__init__ = original_init
    return configs, tmp / "one", tmp / "two", failed.value, logs


@pytest.fixture(scope="module")
def reference(torchrun_runs):
    """The "reference" run's folder and every rank's log of writes and served batches."""
    return torchrun_runs[2] / "reference", torchrun_runs[4]


@pytest.fixture(scope="module")
def same_inputs(torchrun_runs):
    """(configs, the 1-process runs' folder, the 2-process runs' folder, the "fail" run's LaunchError)."""
    return torchrun_runs[:4]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]


@pytest.mark.slow
def test_one_step_on_two_processes_equals_one_process(same_inputs):
    """SGD on one global batch of 8 (2 x 4 with SyncBatchNorm) moves the weights as one process does.

    From random weights, the first step's gradients in the early layers are ill-conditioned: float32
    rounding alone moves them by about 1% (the same one-process step in float32 and float64 differ that
    much). So the step is compared as a whole: the two runs' weights differ by under 2% of the distance
    they moved (0.8% measured; 1,650% with --no-sync-bn), and BatchNorm's running statistics, from the
    forward pass alone, by under 0.1% of theirs (0.008% measured; 69% with --no-sync-bn).
    """
    configs, one, two, _ = same_inputs
    a, b = _weights(one / "step"), _weights(two / "step")
    from xrai.models.factory import create_model

    torch.manual_seed(configs["step"].seed)  # fit's initial weights
    start = create_model(configs["step"].model, pretrained=False).state_dict()
    def distance(x, y, keys):
        return sum(float((x[k] - y[k]).norm()) ** 2 for k in keys) ** 0.5

    weights = [k for k, v in a.items() if v.is_floating_point() and "running_" not in k]
    statistics = [k for k in a if "running_" in k]
    assert distance(a, start, weights) > 1.0, "no step was taken"
    for keys, tolerance in ((weights, 0.02), (statistics, 1e-3)):
        apart = distance(a, b, keys) / distance(a, start, keys)
        assert apart <= tolerance, f"the 2-process step differs from the 1-process step by {apart:.2%}"
    assert all(torch.equal(b[k], v) for k, v in a.items() if not v.is_floating_point())  # num_batches_tracked


@pytest.mark.slow
def test_two_processes_train_as_one_process_does(same_inputs, reference, synthetic_manifest):
    """4 epochs on 2 processes (2 x 4 images a step) against the same run on 1 process.

    What fit() guarantees with N processes: the same global batches in the same order each epoch (rank r
    takes the r-th slice of each), gradients averaged over the whole global batch, the train loss reduced
    over every rank's images and validation scored on every rank's rows gathered, so the run is the one
    process's run up to float32 rounding. Here the head trains alone, as every epoch's order, the
    optimizer and scheduler state and the validation are what is compared: a whole network from random
    weights at batch 8 is too ill-conditioned for a tight comparison (BatchNorm's backward over a few
    values amplifies rounding; one step of it, with SyncBatchNorm, is test_one_step_...'s, to 2%).
    Rank 1 writes nothing, and each epoch serves every training image once (but the 35 % 8 = 3 left over).
    """
    configs, one, two, _ = same_inputs
    logs = reference[1]
    h1, h2 = pd.read_csv(one / "learn" / "history.csv"), pd.read_csv(two / "learn" / "history.csv")
    assert list(h1["world_size"]) == [1] * 4 and list(h2["world_size"]) == [2] * 4
    assert list(h1["epoch"]) == list(h2["epoch"]) == [1, 2, 3, 4]
    # (AUROC and accuracy are left out: a rounding-level change of a logit may swap two ranks or cross 0.5)
    for column in ("train_loss", "val_loss", "lr"):
        np.testing.assert_allclose(h2[column], h1[column], rtol=LEARN_RTOL, err_msg=column)
    a, b = _weights(one / "learn"), _weights(two / "learn")
    from xrai.models.factory import create_model

    torch.manual_seed(configs["learn"].seed)  # fit's initial weights
    start = create_model(configs["learn"].model, pretrained=False).state_dict()
    assert a.keys() == b.keys() == start.keys()
    assert all(torch.equal(a[k], start[k]) for k in a if not k.startswith("head.")), "the backbone is frozen"
    head = [k for k in a if k.startswith("head.")]
    moved = sum(float((a[k] - start[k]).norm()) ** 2 for k in head) ** 0.5
    apart = sum(float((a[k] - b[k]).norm()) ** 2 for k in head) ** 0.5
    assert moved > 0.01, f"the head hardly trained ({moved:.2e})"
    assert apart <= LEARN_RTOL * moved, f"the 2-process head differs from the 1-process one by {apart / moved:.2e}"
    assert logs[1]["writes"] == [], logs[1]["writes"][:5]
    train = set(synthetic_manifest.loc[synthetic_manifest["split"] == "train", "path"])
    assert sorted(logs[0]["served"]["learn"]) == ["1", "2", "3", "4"]
    for epoch in ("1", "2", "3", "4"):
        paths = [p for rank in (0, 1) for batch in logs[rank]["served"]["learn"][epoch] for p in batch]
        assert len(paths) == len(set(paths)) == 32 and set(paths) <= train, epoch


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL (POSIX)")
def test_kill_a_rank_then_resume_is_bit_identical(reference, synthetic_root, tmp_path):
    out, _ = reference
    killed, marker = tmp_path / "run", tmp_path / "hanging"
    victim = subprocess.Popen(_worker("--hang", f"1:2:{marker}", *_train_args(synthetic_root, killed, "--epochs", "2")),
                              env=child_env(OMP_NUM_THREADS="1"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while not marker.is_file() or not marker.read_text():
            assert victim.poll() is None, victim.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "rank 1 never reached epoch 2"
            time.sleep(0.2)
        assert torch.load(killed / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 1
        os.kill(int(marker.read_text()), signal.SIGKILL)  # rank 1 alone; torchrun ends rank 0
        output, _ = victim.communicate(timeout=120)
    finally:
        if victim.poll() is None:
            os.killpg(victim.pid, signal.SIGKILL) if hasattr(os, "killpg") else victim.kill()
            victim.communicate()
    assert victim.returncode != 0 and "rank 1, killed by SIGKILL" in output, output[-2000:]

    # The same command with --resume, through `python -m xrai train --nproc 2` this time.
    resume = subprocess.run([sys.executable, "-m", "xrai", "train", "--nproc", "2", "--resume",
                             *_train_args(synthetic_root, killed, "--epochs", "2")[2:]],
                            env=child_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert resume.returncode == 0, (resume.stdout + resume.stderr)[-3000:]
    a = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(killed / "checkpoints" / "last.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    unequal = [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])]
    assert not unequal, f"weights differ after resume: {unequal[:5]}"
    ha = pd.read_csv(out / "history.csv").drop(columns=WALL_CLOCK)
    hb = pd.read_csv(killed / "history.csv").drop(columns=WALL_CLOCK)
    pd.testing.assert_frame_equal(ha, hb, check_exact=True)


@pytest.mark.slow
def test_a_rank_that_raises_ends_the_run_in_one_line(same_inputs):
    """Rank 1 raises in the "fail" run; torchrun stops rank 0 (never left waiting) and one line says why."""
    two, error = same_inputs[2], same_inputs[3]
    message = str(error)
    assert "\n" not in message
    assert message.startswith("training on 2 processes failed (rank 1, exit code 1): RuntimeError: injected failure "
                              "on rank 1 in epoch 1"), message
    assert not (two / "fail" / "checkpoints" / "last.pt").exists()


@pytest.mark.slow
def test_resume_with_another_world_size_warns_once(reference, synthetic_manifest, tmp_path):
    """The 2-process run resumed by 1 process: one warning that the data order changes, then it carries on."""
    import shutil
    import warnings

    from xrai.train.trainer import fit

    out = tmp_path / "run"
    shutil.copytree(reference[0], out)
    config = TrainConfig.from_json(out / "config.json").replace(epochs=3)
    assert config.world_size == 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fit(config, synthetic_manifest, out, resume=True, progress=False)
    changed = [str(w.message) for w in caught if "data order changes" in str(w.message)]
    assert len(changed) == 1 and "\n" not in changed[0] and "trained by 2 processes) with 1" in changed[0], changed
    assert list(result.history["world_size"]) == [2, 2, 1]
    assert TrainConfig.from_json(out / "config.json").world_size == 1


# ---- the scaling bench ------------------------------------------------------------------------------


def test_scaling_figures_and_their_lines(synthetic_manifest, tmp_path):
    """train_rate on this one process (what the 1-process figure is), and how the bench reports the figures."""
    from test_bench import _fake

    from xrai.bench.run import format_table, markdown_table
    from xrai.bench.scaling import scaling_lines, train_rate
    from xrai.data.cache import build_cache

    rows = synthetic_manifest.iloc[:12]
    cache = build_cache(rows, size=36, cache_dir=tmp_path, progress=False)
    rate = train_rate(cache.path, rows, model="mobilenet_v2", img_size=32, batch_size=4, n_batches=2, device="cpu",
                      warmup=1)
    assert rate["processes"] == 1 and rate["images"] == 8 and rate["img_s"] > 0
    del cache
    scaling = {"nproc": 2, "per_process_batch": 64, "img_s_1": 100.0, "img_s_n": 170.0, "efficiency": 0.85}
    lines = scaling_lines(scaling, ceiling=120.0, device="cuda")
    assert [line.split()[:2] for line in lines] == [["training,", "1"], ["training,", "2"], ["scaling", "efficiency"],
                                                    ["single-device", "ceiling"]]
    assert "0.85" in lines[2] and "128 in all" in lines[1]
    result = {**_fake(), "scaling": scaling}
    assert "reported, not judged" in format_table(result).splitlines()[-2]
    assert "scaling efficiency 0.85 (the processes share" in markdown_table(result)
