"""Kill a real training process with SIGKILL during epoch 3, resume it, and get the uninterrupted run's bits."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from _checks import child_env

WORKER = Path(__file__).with_name("_resume_worker.py")
WALL_CLOCK = ["seconds", "images_per_s"]


def _start(*args: str | Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(WORKER), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=child_env())


def _finish(process: subprocess.Popen, timeout: float = 180) -> None:
    out, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, out


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL (POSIX)")
def test_sigkill_during_epoch_3_then_resume_is_bit_identical(synthetic_root, tmp_path):
    reference, killed, marker = tmp_path / "reference", tmp_path / "killed", tmp_path / "epoch3-started"
    uninterrupted = _start(synthetic_root, reference)
    victim = _start(synthetic_root, killed, "--hang-epoch", 3, "--marker", marker)
    try:
        deadline = time.monotonic() + 180
        while not marker.exists():
            assert victim.poll() is None, victim.communicate()[0]
            assert time.monotonic() < deadline, "the worker never reached epoch 3"
            time.sleep(0.1)
        # Epoch 3 is under way (two batches trained); the last checkpoint is epoch 2's.
        assert torch.load(killed / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 2
        os.kill(victim.pid, signal.SIGKILL)
        victim.communicate(timeout=30)
        assert victim.returncode == -signal.SIGKILL
        assert not list((killed / "checkpoints").glob(".*.tmp"))  # the kill fell mid-epoch, not mid-save

        _finish(_start(synthetic_root, killed, "--resume"))
        _finish(uninterrupted)
    finally:
        for process in (uninterrupted, victim):  # never leave a worker behind when an assertion fails
            if process.poll() is None:
                process.kill()
                process.communicate()

    a = torch.load(reference / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(killed / "checkpoints" / "last.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 4
    assert a["model"].keys() == b["model"].keys()
    unequal = [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])]
    assert not unequal, f"weights differ after resume: {unequal[:5]}"
    for key in ("best_metric", "best_epoch", "bad_epochs"):
        assert a[key] == b[key], key
    ha = pd.read_csv(reference / "history.csv").drop(columns=WALL_CLOCK)
    hb = pd.read_csv(killed / "history.csv").drop(columns=WALL_CLOCK)
    pd.testing.assert_frame_equal(ha, hb, check_exact=True)
    pd.testing.assert_frame_equal(pd.DataFrame(a["history"]).drop(columns=WALL_CLOCK),
                                  pd.DataFrame(b["history"]).drop(columns=WALL_CLOCK), check_exact=True)
